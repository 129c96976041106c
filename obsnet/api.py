"""The Python API: put an observer beside a segmentation network you already have.

    import obsnet
    observed = obsnet.observe(my_segmenter, width_mult=0.5)      # frozen segmenter + observer
    obsnet.train_observer(observed, loader, epochs=5,
                          settings=obsnet.TrainingSettings(epsilon=0.025))
    prob = observed.score(images)        # B×1×H×W: probability that the segmenter is wrong
    meter = obsnet.OODMeter()
    meter.update(prob, is_error)         # streaming AUROC / AUPR / FPR95 over many batches
    print(meter.compute())

``images`` are what the segmenter takes (normalised with ``mean`` / ``std``); the loader
yields (images, labels) with labels B×H×W class indices.

Everything is checked where it enters (a ValueError or TypeError naming the argument and
saying what is expected), cheaply: tensors' shapes and dtypes, and one ``isfinite``
reduction per batch of images (on the device, read once per epoch, for batches that are not
on the CPU). Messages name this API's arguments, never the command line's flags.
"""
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from obsnet.attacks import AttackConfig, attack_choices, parse_attack
from obsnet.losses import CRITERIA
from obsnet.models.generic import FeatureTap, Naming, layer_observer, tap_network
from obsnet.models.segnet import freeze
from obsnet.train import ObserverConfig, ObserverJob, make_scaler, train_observer_epoch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The attack's region and shape sizes, as shares of the image's height: CamVid's at 360×480.
PATCH_SHARES = (128 / 360, 128 / 360, 60 / 360, 80 / 360)
# converted, not refused (float64 rounds to float32: harmless for images)
CONVERTED_TO_FLOAT32 = (torch.float16, torch.bfloat16, torch.float64)


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
        """B×1×H×W probabilities that the segmenter is wrong (observer in eval mode).

        ``images``: a float B×3×H×W tensor on the networks' device (float64 and half are
        converted to float32); NaN or infinite values are a ValueError (one host
        synchronisation per call)."""
        images = checked_images(images, "images")
        device = next(self.parameters()).device
        if images.device != device:
            raise ValueError(f"images: on {images.device}, and the networks on {device}; move "
                             f"them with images.to({str(device)!r})")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images: hold NaN or infinite values")
        training = self.observer.training
        self.observer.eval()
        try:
            return torch.sigmoid(self(images)[1].float())
        finally:
            self.observer.train(training)


def api_naming(segmenter: nn.Module) -> Naming:
    """How the shared model code names what this API's user gave (its arguments)."""
    return Naming(f"segmenter ({type(segmenter).__name__})", layers="layers",
                  size="image_size", amp="torch.autocast")


def observe(segmenter: nn.Module, layers=None, width_mult: float = 1.0,
            image_size=None) -> Observed:
    """Freeze ``segmenter`` (any float32 ``nn.Module`` whose output is B×C×H×W logits or
    ``{"out": ...}``) and build an observer reading ``layers`` (module names: a sequence, or
    one string of comma-separated names; None: the default of its family, else its top-level
    layers), with ``width_mult`` times 64 channels.

    One forward pass of a random image of ``image_size`` (H, W; default 64×64) finds the
    observed maps' channels; give your images' size when the segmenter takes only some sizes.
    """
    if not isinstance(segmenter, nn.Module):
        raise TypeError(f"segmenter: expected a torch.nn.Module, got {type(segmenter).__name__}")
    names = layer_names(layers)
    width_mult = positive_number(width_mult, "width_mult")
    size = image_size if image_size is None else checked_size(image_size)
    tap = tap_network(segmenter, type(segmenter).__name__, names, naming=api_naming(segmenter),
                      probe_size=size)
    return Observed(freeze(tap), layer_observer(tap, width_mult))


def layer_names(layers) -> tuple[str, ...] | None:
    """``observe``'s ``layers`` as a tuple of module names (None stays None): a string is
    comma-separated names, a sequence holds names; TypeError for anything else."""
    if layers is None:
        return None
    if isinstance(layers, str):
        names = tuple(name.strip() for name in layers.split(",") if name.strip())
    elif isinstance(layers, Sequence) and all(isinstance(name, str) for name in layers):
        names = tuple(layers)
    else:
        raise TypeError(f"layers: expected module names, as a str of comma-separated names or "
                        f"a list of str, got {type(layers).__name__}"
                        + (" holding non-str items" if isinstance(layers, Sequence) else ""))
    if not names:
        raise ValueError("layers: no module name given (None observes the default layers)")
    return names


def positive_number(value, name: str) -> float:
    """``value`` as a float, when it is a finite positive number; else a TypeError or
    ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a positive finite number (got {value})")
    return float(value)


def checked_size(size) -> tuple[int, int]:
    """``image_size`` as (H, W): two positive ints."""
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        raise TypeError(f"image_size: expected (H, W), two ints, got {size!r}")
    if min(size) < 1:
        raise ValueError(f"image_size: both sides must be at least 1 (got {tuple(size)})")
    return tuple(size)


def checked_images(images, subject: str) -> torch.Tensor:
    """``images`` as a float32 B×3×H×W tensor (float64 and half converted);
    TypeError or ValueError naming ``subject`` for anything else, e.g. uint8 (un-normalised)
    or channels-last images. Shapes and dtypes only: no pass over the values."""
    if not torch.is_tensor(images):
        hint = (" (torch.from_numpy(a).permute(0, 3, 1, 2) for B×H×W×3 arrays)"
                if type(images).__module__ == "numpy" else "")
        raise TypeError(f"{subject}: expected a torch.Tensor B×3×H×W, got "
                        f"{type(images).__module__}.{type(images).__name__}{hint}")
    shape = "×".join(map(str, images.shape))
    if images.dim() == 4 and images.shape[1] != 3 and images.shape[-1] == 3:
        raise ValueError(f"{subject}: shape {shape} (B×H×W×3, channels last), expected B×3×H×W; "
                         f"use images.permute(0, 3, 1, 2)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{subject}: shape {shape}, expected B×3×H×W")
    if images.dtype in CONVERTED_TO_FLOAT32:
        return images.float()
    if images.dtype != torch.float32:
        raise TypeError(f"{subject}: {str(images.dtype).removeprefix('torch.')} values, expected "
                        f"float images normalised as the segmenter takes them (from uint8: "
                        f"images.float() / 255, then the mean and std)")
    return images


def checked_labels(labels, images: torch.Tensor, subject: str) -> torch.Tensor:
    """``labels`` as an int64 B×H×W tensor matching ``images`` (other integer types converted);
    TypeError or ValueError naming ``subject`` for anything else."""
    if not torch.is_tensor(labels):
        raise TypeError(f"{subject}: expected a torch.Tensor B×H×W of class indices, got "
                        f"{type(labels).__module__}.{type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{subject}: {str(labels.dtype).removeprefix('torch.')} values, expected "
                        f"integer class indices (int64)")
    want = (images.shape[0], *images.shape[-2:])
    if tuple(labels.shape) != want:
        hint = "; use labels.squeeze(1)" if labels.dim() == 4 and labels.shape[1] == 1 else ""
        raise ValueError(f"{subject}: shape {'×'.join(map(str, labels.shape))}, expected B×H×W "
                         f"= {'×'.join(map(str, want))}, the images'{hint}")
    return labels.long()


def _describe(batch) -> str:
    if isinstance(batch, Mapping):
        return f"a dict (keys: {', '.join(map(str, batch))})"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


class CheckedBatches:
    """``loader``'s batches checked at the API's edge (``checked_images``,
    ``checked_labels``), and their images' values: NaN or infinite images in a CPU batch are
    a ValueError at once; in a batch already on an accelerator they are noted on the device
    (no synchronisation) and ``check`` reports them."""

    def __init__(self, loader):
        self.loader = loader
        self.first_bad = None  # on the device: the index of the first non-finite batch, or -1

    def __len__(self) -> int:
        return len(self.loader) if hasattr(self.loader, "__len__") else 0

    def __iter__(self):
        self.first_bad = None
        for index, batch in enumerate(self.loader):
            images, labels = self.checked(batch, index)
            finite = torch.isfinite(images).all()
            if images.device.type == "cpu":
                if not finite:
                    raise self.nonfinite(index)
            else:
                self.note(finite, index)
            yield images, labels

    @staticmethod
    def checked(batch, index: int):
        """(float32 images, int64 labels) of batch ``index``."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"loader: batch {index} is {_describe(batch)}, expected an (images, "
                            f"labels) pair (a dataset that returns (image, label), or a "
                            f"collate_fn that makes one)")
        images = checked_images(batch[0], f"loader: batch {index}'s images")
        return images, checked_labels(batch[1], images, f"loader: batch {index}'s labels")

    def note(self, finite: torch.Tensor, index: int) -> None:
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=finite.device)
        new = ~finite & (self.first_bad < 0)
        self.first_bad = torch.where(new, index, self.first_bad)

    def check(self) -> None:
        """ValueError for the first batch noted with NaN or infinite images (one
        synchronisation)."""
        if self.first_bad is not None and int(self.first_bad) >= 0:
            raise self.nonfinite(int(self.first_bad))

    @staticmethod
    def nonfinite(index: int) -> ValueError:
        return ValueError(f"loader: batch {index}'s images hold NaN or infinite values")


def first_batch(loader):
    """The first batch of ``loader`` (an iterable that can be read again, e.g. a
    DataLoader); TypeError or ValueError naming it when it is none or yields nothing."""
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(f"loader: expected an iterable of (images, labels) batches (e.g. a "
                        f"DataLoader), got {type(loader).__name__}") from None
    if iterator is loader:
        raise TypeError(f"loader: a {type(loader).__name__} can be read only once; give an "
                        f"iterable that can be read every epoch (a DataLoader, a list of batches)")
    batch = next(iterator, None)
    if batch is None:
        raise ValueError("loader: yields no batch (an empty dataset, or drop_last=True with "
                         "fewer samples than batch_size)")
    return batch


@dataclass(frozen=True)
class TrainingSettings:
    """How ``train_observer`` trains: attack (``--adv`` names), ε, optimiser and data.

    Checked when made: ValueError or TypeError naming the field."""

    attack: str = "min_random_patch"
    epsilon: float = 0.025
    lr: float = 0.05
    pos_weight: float = 2.0  # BCE weight of the segmenter's errors
    mean: tuple = IMAGENET_MEAN  # the normalisation the loader applied (the attack needs it)
    std: tuple = IMAGENET_STD
    ignore_index: int | None = 255  # label of pixels that count nowhere

    def __post_init__(self):
        choices = attack_choices()
        if not isinstance(self.attack, str) or self.attack not in choices:
            raise ValueError(f"attack: {self.attack!r} is not one of {', '.join(choices)}")
        for name in ("epsilon", "lr", "pos_weight"):
            object.__setattr__(self, name, positive_number(getattr(self, name), name))
        object.__setattr__(self, "mean", _three(self.mean, "mean", positive=False))
        object.__setattr__(self, "std", _three(self.std, "std", positive=True))
        if self.ignore_index is not None and (isinstance(self.ignore_index, bool)
                                              or not isinstance(self.ignore_index, int)):
            raise TypeError(f"ignore_index: expected an int or None, got "
                            f"{type(self.ignore_index).__name__}")


def _three(values, name: str, positive: bool) -> tuple[float, float, float]:
    """Three finite numbers, one per RGB channel (``positive``: each above 0)."""
    if (not isinstance(values, Sequence) or isinstance(values, str) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise TypeError(f"{name}: expected three numbers, one per RGB channel, got {values!r}")
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        kind = "positive finite" if positive else "finite"
        raise ValueError(f"{name}: each of the three values must be {kind} (got {tuple(values)})")
    return tuple(float(v) for v in values)


def attack_for(settings: TrainingSettings, nclass: int, height: int) -> AttackConfig | None:
    """The AttackConfig of ``settings`` for images ``height`` pixels high (None: no attack)."""
    parsed = parse_attack(settings.attack)
    if parsed is None:
        return None
    patch = tuple(max(1, round(share * height)) for share in PATCH_SHARES)
    return AttackConfig(**parsed._asdict(), epsilon=settings.epsilon,
                        patch_size=patch, nclass=nclass, mean=settings.mean, std=settings.std)


def train_observer(observed: Observed, loader, epochs: int = 1,
                   settings: TrainingSettings = TrainingSettings(), device=None,
                   progress: bool = True) -> list[dict]:
    """Train ``observed.observer`` with local adversarial attacks on ``loader``'s (images,
    labels) for ``epochs`` epochs (SGD, ``settings.lr``); returns each epoch's summary (mean
    loss, accuracies, the attack's flip rate ...).

    ``loader``: an iterable read once per epoch (a DataLoader) of (images, labels) pairs,
    images as ``Observed.score`` takes them, labels B×H×W integer class indices."""
    if not isinstance(observed, Observed):
        raise TypeError(f"observed: expected what obsnet.observe returns, got "
                        f"{type(observed).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int):
        raise TypeError(f"epochs: expected an int, got {type(epochs).__name__}")
    if epochs < 1:
        raise ValueError(f"epochs: must be at least 1 (got {epochs})")
    if not isinstance(settings, TrainingSettings):
        raise TypeError(f"settings: expected an obsnet.TrainingSettings, got "
                        f"{type(settings).__name__}")
    device = torch.device(device or next(observed.parameters()).device)
    observed.to(device)
    batches = CheckedBatches(loader)
    images = batches.checked(first_batch(loader), 0)[0].to(device)
    with torch.no_grad():
        nclass = observed.segmenter(images[:1]).shape[1]
    cfg = ObserverConfig(attack_for(settings, nclass, images.shape[-2]),
                         ignore_id=settings.ignore_index)
    optimizer = torch.optim.SGD(observed.observer.parameters(), lr=settings.lr)
    job = ObserverJob(model=observed.observer, loader=batches, optimizer=optimizer, device=device,
                      scaler=make_scaler(device, None), progress=progress, lr_name="settings.lr",
                      segnet=observed.segmenter, criterion=CRITERIA["bce"](settings.pos_weight).to(device),
                      config=cfg)
    history = []
    for epoch in range(epochs):
        try:
            history.append(train_observer_epoch(job, epoch))
        except FloatingPointError:
            batches.check()  # NaN images, not the learning rate, made the loss NaN
            raise
        batches.check()
    return history
