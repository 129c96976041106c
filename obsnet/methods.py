"""Uncertainty methods: each maps a batch to a B×H×W score, higher = more likely wrong/OOD.

Every method has the same signature ``fn(batch, cfg)`` and reuses the SegNet forward pass
stored in ``batch`` when it needs one. ``Method.to_prob(score, cfg)`` maps a score to the
method's probability that the SegNet is wrong (used for ACE/ECE); it is ``None``, or returns
None, for scores that are no such probability (energy, max logit, entropy, ODIN's tempered
softmax, the void logit), and calibration is then not reported.

Rules every method follows: no method leaves a trace on the SegNet (weights, buffers and
train/eval mode are as before, even after an exception); no per-image state is taken from
one slot of the batch; the random draws of a pass (weight noise, augmentation) are shared by
the whole batch, so a batch scores like its images one by one under the same seed.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from obsnet.sml_post import dilated_smoothing, suppress_boundaries
from obsnet.stats import penultimate


@dataclass
class EvalBatch:
    """What every method may read: inputs, networks and the shared SegNet forward."""

    images: torch.Tensor
    segnet: torch.nn.Module
    obsnet: torch.nn.Module | None
    feats: list  # the SegNet's 10 block outputs, logits last
    ensemble: tuple = ()  # extra SegNet members for "ensemble" (already loaded, eval mode)


@dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters of the methods (filled from the CLI by main.py)."""

    mc_passes: int = 50  # --T: passes of mc_dropout, gauss, mcda
    temperature: float = 1.2  # --Temp, temp_scale
    odin_eps: float = 0.001  # --odin_eps
    odin_temp: float = 1000.0  # --odin_temp
    gauss_lambda: float = 0.002  # --gauss_lambda: std of the weight perturbation
    void_class: int | None = None  # the output whose raw logit "void" reads (spec.void_logit)
    sampling_score: str = "entropy"  # --sampling_score: of the mean softmax, "entropy" or "mcp"
    mean: tuple = (0.485, 0.456, 0.406)  # normalisation of the inputs (spec.mean/std), for mcda
    std: tuple = (0.229, 0.224, 0.225)
    progress: bool = False  # tqdm over passes
    # sml / mahalanobis: the SegNet's training statistics (obsnet.stats.ClassStats, --fit_stats)
    class_stats: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``to_prob(score, cfg)`` maps its score to a probability of error (ACE/ECE), or is
    ``None`` (or returns None) when the score has none. ``uses_shared_forward``: the method
    reads ``batch.feats`` (its time includes the shared SegNet forward). ``description``: one
    line for the README table.
    """

    fn: Callable
    to_prob: Callable | None
    description: str = ""
    uses_shared_forward: bool = True
    needs_obsnet: bool = False
    needs_ensemble: bool = False
    needs_void: bool = False


# --------------------------------------------------------------------------- helpers

def max_softmax_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """1 - max softmax probability over the class dimension (B×C×H×W -> B×H×W)."""
    return 1 - torch.softmax(logits.float(), dim=1).amax(dim=1)


SAMPLING_SCORES = ("entropy", "mcp")


def mean_softmax_uncertainty(logit_passes: Iterable[torch.Tensor], kind: str = "entropy") -> torch.Tensor:
    """A score of the softmax averaged over an iterable of B×C×H×W logits (B×H×W): its
    entropy in nats (``kind="entropy"``, the original's) or 1 - its max (``"mcp"``).

    Shared by mc_dropout, gauss, mcda and ensemble; the passes are consumed one at a time.
    """
    total, count = None, 0
    for logits in logit_passes:
        probs = torch.softmax(logits.float(), dim=1)
        total = probs if total is None else total.add_(probs)
        count += 1
    if count == 0:
        raise ValueError("mean_softmax_uncertainty: no pass to average (--T must be >= 1)")
    mean = total / count
    if kind == "entropy":
        return torch.special.entr(mean).sum(dim=1)
    if kind == "mcp":
        return 1 - mean.amax(dim=1)
    raise ValueError(f"--sampling_score {kind}: expected one of {', '.join(SAMPLING_SCORES)}")


def _passes(cfg: MethodConfig, desc: str):
    """range(cfg.mc_passes), with a progress bar when cfg.progress."""
    return tqdm(range(cfg.mc_passes), desc=desc, leave=False, disable=not cfg.progress)


def _logits(batch: EvalBatch) -> torch.Tensor:
    """The shared forward's logits (the last block output)."""
    return batch.feats[-1]


def _identity(x, cfg=None):
    return x


def _sigmoid(x, cfg=None):
    return torch.sigmoid(x)


def _sampling_prob(x, cfg: MethodConfig):
    """1 - max mean softmax is a probability of error; the entropy is none."""
    return x if cfg.sampling_score == "mcp" else None


# --------------------------------------------------------------------------- single forward

def obsnet_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """The observer's logit that the SegNet is wrong (it applies the ablations it was built
    with: ``obsnet.models.observer_spec.ObserverSpec``)."""
    return batch.obsnet(batch.images, batch.feats).squeeze(1).float()


def mcp_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """Maximum class probability (Hendrycks & Gimpel), as an uncertainty."""
    return max_softmax_uncertainty(_logits(batch))


def temp_scale_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """1 - max softmax of the logits divided by ``cfg.temperature`` (Guo et al. 2017)."""
    return max_softmax_uncertainty(_logits(batch).float() / cfg.temperature)


def entropy_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax."""
    log_p = torch.log_softmax(_logits(batch).float(), dim=1)
    return (-(log_p.exp() * log_p).sum(dim=1)).clamp_min(0)


def max_logit_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """Minus the largest logit (Hendrycks et al. 2022)."""
    return -_logits(batch).float().amax(dim=1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Free energy E = -T·logsumexp(logits / T) over classes; higher for OOD (Liu et al. 2020)."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def energy_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """The free energy at T = 1 (the paper's "negative energy score", negated)."""
    return energy(_logits(batch))


def void_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """The raw logit of the class ``cfg.void_class``, as the original (no softmax)."""
    logits = _logits(batch)
    if cfg.void_class is None:
        raise ValueError("method 'void' needs a dataset with a void class (its spec has no void_logit)")
    if not 0 <= cfg.void_class < logits.shape[1]:
        raise ValueError(f"method 'void': class {cfg.void_class} is not one of the "
                         f"{logits.shape[1]} predicted classes")
    return logits[:, cfg.void_class].float()


# --------------------------------------------------------------------------- fitted statistics

def _class_stats(cfg: MethodConfig, name: str, batch: EvalBatch):
    """``cfg.class_stats``, checked against the logits' class count and the penultimate map's
    channels (statistics of a segmenter of another width have other ones)."""
    stats, logits = cfg.class_stats, _logits(batch)
    if stats is None:
        raise ValueError(f"method '{name}' needs the SegNet's training statistics: run "
                         f"main.py --fit_stats with this --segnet_file first")
    if stats.nclass != logits.shape[1]:
        raise ValueError(f"method '{name}': statistics fitted for {stats.nclass} classes, the "
                         f"SegNet predicts {logits.shape[1]}")
    channels = batch.feats[-2].shape[1] if len(batch.feats) >= 2 else None
    if channels is not None and channels != stats.feat_dim:
        raise ValueError(f"method '{name}': statistics fitted on {stats.feat_dim}-channel "
                         f"features, the SegNet's penultimate map has {channels} (statistics "
                         f"of another segmenter: run main.py --fit_stats --overwrite)")
    return stats


def sml_score(batch: EvalBatch, cfg: MethodConfig, name: str = "sml") -> torch.Tensor:
    """Standardized max logit (Jung et al. 2021), negated: -(max logit - mu[c]) / sigma[c],
    c the predicted class, mu / sigma fitted over the training pixels predicted as c
    (``name``: the method named in errors)."""
    logits = _logits(batch).float()
    stats = _class_stats(cfg, name, batch)
    top, pred = logits.max(dim=1)
    mu = stats.logit_mean.to(logits.device, torch.float32)
    sigma = stats.logit_std.to(logits.device, torch.float32)
    return -(top - mu[pred]) / sigma[pred]


def sml_post_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """``sml`` after SML's boundary suppression and dilated smoothing (``obsnet/sml_post.py``,
    the paper's settings), in float32 even under autocast (its convolutions would run in
    float16 / bfloat16 there and tie scores)."""
    pred = _logits(batch).argmax(dim=1)
    sml = sml_score(batch, cfg, "sml_post")
    with torch.autocast(sml.device.type, enabled=False):
        return dilated_smoothing(suppress_boundaries(sml.float(), pred))


def mahalanobis_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """Min over classes of the squared Mahalanobis distance of each pixel's penultimate
    feature (resized to the logits' size) to the class means, tied covariance (Lee et al.
    2018). Computed as ||L^T (x - mu_c)||² with P = L L^T the fitted precision."""
    logits = _logits(batch)
    stats = _class_stats(cfg, "mahalanobis", batch)
    x = penultimate(batch.feats, logits.shape[-2:])
    chol = stats.whitening  # float64, D×D
    means = stats.feat_mean[stats.feat_present] @ chol  # rows: L^T mu_c
    chol, means = chol.to(x.device, torch.float32), means.to(x.device, torch.float32)
    with torch.autocast(x.device.type, enabled=False):  # float32 even under --amp
        z = torch.einsum("bdhw,de->behw", x, chol)
        best = None
        for m in means:
            d = (z - m.view(1, -1, 1, 1)).square().sum(dim=1)
            best = d if best is None else torch.minimum(best, d)
    return best


# --------------------------------------------------------------------------- ODIN

def odin_perturb(segnet: torch.nn.Module, images: torch.Tensor, eps: float,
                 temperature: float) -> torch.Tensor:
    """ODIN's input pre-processing (Liang et al. 2018): one signed-gradient step that lowers
    the cross-entropy of ``logits / temperature`` against each pixel's argmax class, i.e. that
    raises the max tempered softmax. Gradients flow to the input only (works under no_grad)."""
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = segnet(x).float() / temperature
        loss = F.cross_entropy(logits, logits.detach().argmax(dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return (images - eps * grad.sign()).detach()


def odin_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """1 - max softmax(f(x̃) / odin_temp) at the ODIN-perturbed input x̃."""
    perturbed = odin_perturb(batch.segnet, batch.images, cfg.odin_eps, cfg.odin_temp)
    with torch.no_grad():
        return max_softmax_uncertainty(batch.segnet(perturbed).float() / cfg.odin_temp)


# --------------------------------------------------------------------------- several passes

@torch.no_grad()
def mc_dropout_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """``cfg.sampling_score`` of the softmax averaged over ``mc_passes`` dropout passes (Gal &
    Ghahramani).

    Dropout masks are drawn per element, so this one is batch-independent only in law."""
    return mean_softmax_uncertainty((batch.segnet(batch.images, mc_drop=True)
                                     for _ in _passes(cfg, "MC dropout passes")), cfg.sampling_score)


@contextmanager
def noisy_weights(model: torch.nn.Module, std: float, originals: list[torch.Tensor]):
    """Add N(0, std²) to every parameter of ``model`` for the duration of the block, then
    copy back ``originals`` (the exact values, bit for bit), also when the block raises."""
    params = list(model.parameters())
    try:
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p), alpha=std)
        yield model
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, originals):
                p.copy_(p0)


@torch.no_grad()
def gauss_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """``cfg.sampling_score`` of the mean softmax over ``mc_passes`` Gaussian perturbations of
    the weights.

    One noise draw per parameter per pass, shared by the whole batch."""
    originals = [p.detach().clone() for p in batch.segnet.parameters()]

    def passes():
        for _ in _passes(cfg, "Gaussian weight passes"):
            with noisy_weights(batch.segnet, cfg.gauss_lambda, originals) as net:
                logits = net(batch.images)
            yield logits  # outside the block: the weights are already restored

    return mean_softmax_uncertainty(passes(), cfg.sampling_score)


MCDA_FLIP_P = 0.5  # probability of a horizontal flip
MCDA_BRIGHTNESS = 0.1  # additive brightness offset, uniform in [-b, b] (pixel space [0, 1])
MCDA_CONTRAST = 0.1  # contrast factor, uniform in [1 - c, 1 + c], around each image's mean
MCDA_NOISE = 0.02  # std of additive Gaussian pixel noise


def mcda_augment(images: torch.Tensor, mean: tuple, std: tuple) -> tuple[torch.Tensor, bool]:
    """Draw ONE augmentation and apply it to every image of the batch (normalised in, out).

    Works in [0, 1] pixel space: denormalise, flip/brightness/contrast/noise, clamp,
    renormalise. Returns (augmented images, whether they were flipped)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    u_flip, u_bright, u_contrast = torch.rand(3).tolist()
    noise = torch.randn((1, *images.shape[1:]), dtype=images.dtype, device=images.device)
    flip = u_flip < MCDA_FLIP_P
    pixels = images * s + m
    if flip:
        pixels = pixels.flip(-1)
    level = pixels.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + MCDA_CONTRAST * (2 * u_contrast - 1)
    brightness = MCDA_BRIGHTNESS * (2 * u_bright - 1)
    pixels = (pixels - level) * contrast + level + brightness + MCDA_NOISE * noise
    return (pixels.clamp(0, 1) - m) / s, flip


@torch.no_grad()
def mcda_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """``cfg.sampling_score`` of the mean softmax over ``mc_passes`` test-time augmentations
    (outputs un-flipped)."""
    def passes():
        for _ in _passes(cfg, "MC data-augmentation passes"):
            augmented, flipped = mcda_augment(batch.images, cfg.mean, cfg.std)
            logits = batch.segnet(augmented)
            yield logits.flip(-1) if flipped else logits

    return mean_softmax_uncertainty(passes(), cfg.sampling_score)


@torch.no_grad()
def ensemble_score(batch: EvalBatch, cfg: MethodConfig) -> torch.Tensor:
    """``cfg.sampling_score`` of the softmax averaged over the main SegNet and every member of
    ``batch.ensemble``."""
    if not batch.ensemble:
        raise ValueError("method 'ensemble': --ensemble FILE,FILE,... is required "
                         "(extra SegNet checkpoints to average with the main one)")

    def members():
        yield _logits(batch)
        for net in batch.ensemble:
            yield net(batch.images)

    return mean_softmax_uncertainty(members(), cfg.sampling_score)


# --------------------------------------------------------------------------- registry

SAMPLED = "of the mean softmax over "  # the sampling methods' score: --sampling_score

METHODS: dict[str, Method] = {
    "obsnet": Method(obsnet_score, _sigmoid, "ObsNet's logit that the SegNet is wrong "
                     "(prob: its sigmoid)", needs_obsnet=True),
    "mcp": Method(mcp_score, _identity, "1 - max softmax probability"),
    "temp_scale": Method(temp_scale_score, _identity,
                         "1 - max softmax of logits / T (--Temp)"),
    "entropy": Method(entropy_score, None, "entropy of the softmax"),
    "max_logit": Method(max_logit_score, None, "minus the max logit"),
    "energy": Method(energy_score, None, "free energy -logsumexp(logits), higher = OOD"),
    "odin": Method(odin_score, None, "1 - max softmax at T=--odin_temp of the input "
                   "perturbed by --odin_eps towards the argmax class", uses_shared_forward=False),
    "void": Method(void_score, None, "raw logit of the void class", needs_void=True),
    "mc_dropout": Method(mc_dropout_score, _sampling_prob, "entropy (or 1 - max) " + SAMPLED +
                         "--T MC dropout passes", uses_shared_forward=False),
    "gauss": Method(gauss_score, _sampling_prob, "entropy (or 1 - max) " + SAMPLED + "--T "
                    "passes with N(0, --gauss_lambda²) noise on the weights",
                    uses_shared_forward=False),
    "mcda": Method(mcda_score, _sampling_prob, "entropy (or 1 - max) " + SAMPLED + "--T "
                   "test-time augmentations (flip, brightness, contrast, noise)",
                   uses_shared_forward=False),
    "ensemble": Method(ensemble_score, _sampling_prob, "entropy (or 1 - max) of the mean "
                       "softmax of the SegNet and the --ensemble members", needs_ensemble=True),
    "sml": Method(sml_score, None, "minus the standardized max logit (per predicted class, "
                  "fitted by --fit_stats)"),
    "sml_post": Method(sml_post_score, None, "sml after its paper's boundary suppression "
                       "and dilated smoothing"),
    "mahalanobis": Method(mahalanobis_score, None, "min squared Mahalanobis distance of the "
                          "penultimate features to the class means (tied covariance, --fit_stats)"),
}
ALIASES = {"mc_drop": "mc_dropout"}


def parse_methods(spec: str) -> list[str]:
    """Split ``--test_multi`` into registry names (aliases resolved, order kept, no repeats)."""
    names = []
    for raw in (s.strip() for s in spec.split(",")):
        name = ALIASES.get(raw, raw)
        if name not in METHODS:
            raise ValueError(f"--test_multi: unknown method '{raw}' "
                             f"(available: {', '.join(sorted(METHODS) + sorted(ALIASES))})")
        if name not in names:
            names.append(name)
    return names
