"""The Python API: put an observer beside a segmentation network you already have.

    import obsnet
    observed = obsnet.observe(my_segmenter, width_mult=0.5)      # frozen segmenter + observer
    obsnet.train_observer(observed, loader, epochs=5, epsilon=0.025)
    prob = observed.score(images)        # B×1×H×W: probability that the segmenter is wrong
    meter = obsnet.OODMeter()
    meter.update(prob, is_error)         # streaming AUROC / AUPR / FPR95 over many batches
    print(meter.compute())

``images`` are what the segmenter takes (normalised with ``mean`` / ``std``); the loader
yields (images, labels) with labels B×H×W class indices.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from obsnet.attacks import AttackConfig, parse_attack
from obsnet.losses import CRITERIA
from obsnet.models.generic import FeatureTap, tap_and_observer
from obsnet.models.segnet import freeze
from obsnet.train import ObserverConfig, make_scaler, train_observer_epoch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The attack's region and shape sizes, as shares of the image's height: CamVid's at 360×480.
PATCH_SHARES = (128 / 360, 128 / 360, 60 / 360, 80 / 360)


class Observed(nn.Module):
    """A frozen segmenter (``FeatureTap``) and its observer; ``forward`` gives (logits, the
    observer's logit per pixel), ``score`` the probability that the segmenter is wrong."""

    def __init__(self, segmenter: FeatureTap, observer: nn.Module):
        super().__init__()
        self.segmenter, self.observer = segmenter, observer

    def forward(self, images):
        feats = self.segmenter(images, return_feat=True)
        return feats[-1], self.observer(images, feats)

    @torch.no_grad()
    def score(self, images) -> torch.Tensor:
        """B×1×H×W probabilities that the segmenter is wrong (observer in eval mode)."""
        training = self.observer.training
        self.observer.eval()
        try:
            return torch.sigmoid(self(images)[1].float())
        finally:
            self.observer.train(training)


def observe(segmenter: nn.Module, layers=None, width_mult: float = 1.0) -> Observed:
    """Freeze ``segmenter`` (any module whose output is B×C×H×W logits or ``{"out": ...}``)
    and build an observer reading ``layers`` (module names; None: the default of its family,
    else its top-level layers), with ``width_mult`` times 64 channels."""
    tap, observer, _ = tap_and_observer(segmenter, type(segmenter).__name__, layers, width_mult)
    return Observed(freeze(tap), observer)


@dataclass(frozen=True)
class TrainingSettings:
    """How ``train_observer`` trains: attack (``--adv`` names), ε, optimiser and data."""

    attack: str = "min_random_patch"
    epsilon: float = 0.025
    lr: float = 0.05
    pos_weight: float = 2.0  # BCE weight of the segmenter's errors
    mean: tuple = IMAGENET_MEAN  # the normalisation the loader applied (the attack needs it)
    std: tuple = IMAGENET_STD
    ignore_index: int | None = 255  # label of pixels that count nowhere


def attack_for(settings: TrainingSettings, nclass: int, height: int) -> AttackConfig | None:
    """The AttackConfig of ``settings`` for images ``height`` pixels high (None: no attack)."""
    parsed = parse_attack(settings.attack)
    if parsed is None:
        return None
    patch = tuple(max(1, round(share * height)) for share in PATCH_SHARES)
    return AttackConfig(mode=parsed[0], mask=parsed[1], epsilon=settings.epsilon,
                        patch_size=patch, nclass=nclass, mean=settings.mean, std=settings.std)


def train_observer(observed: Observed, loader, epochs: int = 1,
                   settings: TrainingSettings = TrainingSettings(), device=None,
                   progress: bool = True) -> list[dict]:
    """Train ``observed.observer`` with local adversarial attacks on ``loader``'s (images,
    labels) for ``epochs`` epochs (SGD, ``settings.lr``); returns each epoch's summary (mean
    loss, accuracies, the attack's flip rate ...)."""
    device = torch.device(device or next(observed.parameters()).device)
    observed.to(device)
    images = next(iter(loader))[0].to(device)
    with torch.no_grad():
        nclass = observed.segmenter(images[:1]).shape[1]
    cfg = ObserverConfig(attack_for(settings, nclass, images.shape[-2]),
                         ignore_id=settings.ignore_index)
    optimizer = torch.optim.SGD(observed.observer.parameters(), lr=settings.lr)
    criterion = CRITERIA["bce"](settings.pos_weight).to(device)
    return [train_observer_epoch(epoch, observed.observer, observed.segmenter, loader, optimizer,
                                 criterion, device, cfg, progress=progress,
                                 scaler=make_scaler(device, None))
            for epoch in range(epochs)]
