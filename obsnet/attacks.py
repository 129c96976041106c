"""Local adversarial attacks (LAA): one FGSM step on the SegNet inside a random mask, and a
procedural paste (``--adv paste``, ``paste+ATTACK``): a local failure trigger whose pixels are
anomalies, so errors for the observer whatever the SegNet predicts there.

Masks and pasted objects are generated in torch on the images' device, vectorised over the batch,
from torch's random stream (seeded by ``--seed``). The validation split's pasted objects
(``python -m obsnet.paste``, ``val_ood``) come from numpy generators of their own, with other
shapes (ellipses, blobs, polygons) and textures (palettes of saturated colours: noise, stripes,
gradients, checkers): the observer is never trained on the generator it is tuned on.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

MODES = ("min", "max")


@dataclass(frozen=True)
class AttackConfig:
    """Resolved ``--adv`` / ``--epsilon`` settings (see ``parse_attack``)."""

    mode: str | None  # "min": raise the loss of the true class; "max": push towards a random
    # class; None: no FGSM step (``--adv paste``)
    mask: str | None  # a key of MASKS; None with mode
    epsilon: float
    patch_size: tuple[int, int, int, int]  # region (H, W), shape size (min, max), in pixels
    nclass: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    noise_std: float = 0.03  # noise added inside the mask first, for more diverse attacks
    # "max" mode draws its target among these (the dataset's real classes: no void, no unused
    # output), as the original's randint(nclass - 1); empty: every output.
    target_classes: tuple[int, ...] = ()
    paste: bool = False  # paste a procedural object first (``paste_procedural``)


def _place_regions(local: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Paste B local masks (B×h×w), or maps (B×C×h×w), at uniformly random positions in
    B×H×W (B×C×H×W) zero float tensors."""
    maps = local.unsqueeze(1) if local.dim() == 3 else local
    b, c, h, w = maps.shape
    dev = local.device
    top = torch.randint(0, height - h + 1, (b, 1), device=dev)
    left = torch.randint(0, width - w + 1, (b, 1), device=dev)
    rows = (top + torch.arange(h, device=dev))[:, :, None]
    cols = (left + torch.arange(w, device=dev))[:, None, :]
    full = torch.zeros(b, height, width, c, device=dev)
    full[torch.arange(b, device=dev)[:, None, None], rows, cols] = maps.permute(0, 2, 3, 1).float()
    full = full.permute(0, 3, 1, 2).contiguous()
    return full[:, 0] if local.dim() == 3 else full


def _region(patch_size, height, width):
    """The attack region's size and shape sizes, shrunk to fit the image."""
    h, w = min(patch_size[0], height), min(patch_size[1], width)
    smin = max(1, min(patch_size[2], h, w))
    return h, w, smin, max(smin, min(patch_size[3], h, w))


def random_shapes(b: int, h: int, w: int, smin: int, smax: int, device) -> torch.Tensor:
    """B×h×w masks, each the union of 6 to 10 random rectangles, ellipses and triangles."""
    k = 10
    active = torch.arange(k, device=device) < torch.randint(6, k + 1, (b, 1), device=device)
    size = lambda: torch.empty(b, k, 1, 1, device=device).uniform_(smin, smax) / 2  # noqa: E731
    half_h, half_w = size(), size()
    cy = torch.rand(b, k, 1, 1, device=device) * h
    cx = torch.rand(b, k, 1, 1, device=device) * w
    dy = (torch.arange(h, device=device).view(1, 1, h, 1) - cy) / half_h
    dx = (torch.arange(w, device=device).view(1, 1, 1, w) - cx) / half_w
    kind = torch.randint(0, 3, (b, k, 1, 1), device=device)
    inside = torch.where(kind == 0, torch.maximum(dy.abs(), dx.abs()) <= 1,
                         torch.where(kind == 1, dy ** 2 + dx ** 2 <= 1,
                                     (dy.abs() <= 1) & (dx.abs() <= (dy + 1) / 2)))
    return (inside & active[:, :, None, None]).any(dim=1)


def _rotations(b: int, k: int, device) -> torch.Tensor:
    """B×k×2×2 rotation matrices of uniformly random angles."""
    angle = torch.rand(b, k, device=device) * (2 * math.pi)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def ifs_maps(b: int, k: int, device, area=(0.6, 1.0), smax: float = 0.9):
    """Random iterated function systems: B×k affine maps x -> A x + t, 2 to k active per image.

    A = R1·diag(s1, ±s2)·R2 (random rotations, a reflection half the time). The singular values
    are rescaled so that the active maps' |det A| sum to a random ratio in ``area`` (about 1:
    a fractal of sizeable area, neither a sparse dust nor a filled blob), then capped at
    ``smax`` < 1 so that every map contracts. Translations t are uniform in [-1, 1]².
    Returns (A, t, active).
    """
    active = torch.arange(k, device=device) < torch.randint(2, k + 1, (b, 1), device=device)
    sv = torch.empty(b, k, 2, device=device).uniform_(0.2, 1.0)
    total = (sv.prod(-1) * active).sum(1).view(b, 1, 1)
    target = torch.empty(b, 1, 1, device=device).uniform_(*area)
    sv = (sv * (target / total).sqrt()).clamp(max=smax)
    sign = torch.where(torch.rand(b, k, device=device) < 0.5, -1.0, 1.0)
    sv = torch.stack([sv[..., 0], sv[..., 1] * sign], -1)
    a = _rotations(b, k, device) @ torch.diag_embed(sv) @ _rotations(b, k, device)
    return a, torch.empty(b, k, 2, device=device).uniform_(-1, 1), active


def chaos_game(a, t, active, n: int, iters: int = 16, keep: int = 8) -> torch.Tensor:
    """B×(n·keep)×2 points on each image's IFS attractor: the chaos game on B×n points at once.

    Every point starts at the fixed point of the image's first map, which lies on the attractor
    (so no transient to discard); each iteration applies to each point a map drawn among the
    active ones with probability ~ |det A| (an even density). The last ``keep`` iterations count.
    """
    b, dev = a.shape[0], a.device
    weight = (a.det().abs() + 0.05) * active
    choice = torch.multinomial(weight, iters * n, replacement=True).view(b, iters, n)
    x = torch.linalg.solve(torch.eye(2, device=dev) - a[:, 0], t[:, 0])
    x = x[:, None, :].expand(b, n, 2)
    rows = torch.arange(b, device=dev)[:, None]
    points = []
    for i in range(iters):
        j = choice[:, i]
        x = torch.einsum("bnij,bnj->bni", a[rows, j], x) + t[rows, j]
        if i >= iters - keep:
            points.append(x)
    return torch.cat(points, 1)


def rasterise(points: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B×h×w binary masks of B×N×2 points, each image's bounding box stretched to h×w."""
    b, dev = points.shape[0], points.device
    lo, hi = points.amin(1, keepdim=True), points.amax(1, keepdim=True)
    scale = torch.tensor([h - 1, w - 1], device=dev, dtype=points.dtype)
    ij = ((points - lo) / (hi - lo).clamp_min(1e-6) * scale).round().long()
    mask = torch.zeros(b, h, w, device=dev)
    mask[torch.arange(b, device=dev)[:, None], ij[..., 0], ij[..., 1]] = 1.0
    return mask


def fractal_shapes(b: int, h: int, w: int, device, max_maps: int = 4) -> torch.Tensor:
    """B×h×w masks, each a random IFS fractal (2 to ``max_maps`` maps) filling the h×w box.

    About h·w points are drawn per image, then the mask is dilated by a radius of ~1/80 of the
    box (at least 1 pixel) so that the shape is solid at every size. The share of the box
    covered is ~30–65% at 32×40 and ~15–55% at 128×128 to 300×360 (5%–95% quantiles).
    """
    a, t, active = ifs_maps(b, max_maps, device)
    keep = 8
    points = chaos_game(a, t, active, n=max(64, h * w // keep), keep=keep)
    mask = rasterise(points, h, w).unsqueeze(1)
    r = max(1, round(max(h, w) / 80))
    return F.max_pool2d(mask, 2 * r + 1, stride=1, padding=r).squeeze(1)


def mask_all_image(images, labels, cfg):
    """Attack every pixel."""
    return torch.ones_like(images[:, :1])


def mask_pixels_sparse(images, labels, cfg, rate: float = 0.05):
    """Attack a random 5% of the pixels."""
    return (torch.rand_like(images[:, :1]) < rate).float()


def mask_class(images, labels, cfg):
    """Attack all pixels of one class drawn among those present in each image."""
    b = labels.shape[0]
    valid = (labels >= 0) & (labels < cfg.nclass)
    flat = (labels + cfg.nclass * torch.arange(b, device=labels.device).view(b, 1, 1))[valid]
    present = torch.bincount(flat, minlength=b * cfg.nclass).view(b, cfg.nclass) > 0
    draw = torch.rand(b, cfg.nclass, device=labels.device).masked_fill(~present, -1.0)
    chosen = draw.argmax(dim=1).view(b, 1, 1)
    return (labels == chosen).unsqueeze(1).float()


def mask_square_patch(images, labels, cfg):
    """Attack one square region of the patch size at a random position."""
    b, _, height, width = images.shape
    h, w, _, _ = _region(cfg.patch_size, height, width)
    return _place_regions(torch.ones(b, h, w, device=images.device), height, width).unsqueeze(1)


def mask_random_patch(images, labels, cfg):
    """Attack random shapes drawn inside a region of the patch size at a random position."""
    b, _, height, width = images.shape
    h, w, smin, smax = _region(cfg.patch_size, height, width)
    local = random_shapes(b, h, w, smin, smax, images.device)
    return _place_regions(local, height, width).unsqueeze(1)


def mask_fractal(images, labels, cfg):
    """Attack a random IFS fractal filling a region of the patch size at a random position.

    Generated on the fly (the original read fractal images from a local database).
    """
    b, _, height, width = images.shape
    h, w, _, _ = _region(cfg.patch_size, height, width)
    local = fractal_shapes(b, h, w, images.device)
    return _place_regions(local, height, width).unsqueeze(1)


# ----------------------------------------------------------------------------- procedural paste

def paste_shapes(b: int, h: int, w: int, smin: int, smax: int, device) -> torch.Tensor:
    """B×h×w bool object masks inside an h×w region: per image, at even odds, the union of
    random rectangles, ellipses and triangles (``random_shapes``) or an IFS fractal
    (``fractal_shapes``); never empty."""
    fractal = torch.rand(b, 1, 1, device=device) < 0.5
    shapes = torch.where(fractal, fractal_shapes(b, h, w, device) > 0,
                         random_shapes(b, h, w, smin, smax, device))
    shapes[:, h // 2, w // 2] |= ~shapes.flatten(1).any(1)  # a degenerate draw keeps one pixel
    return shapes


def smooth_texture(b: int, h: int, w: int, device) -> torch.Tensor:
    """B×3×h×w colours in [0, 1]: per image a random flat colour, plus a smooth colour field
    (Gaussian noise on a coarse 2×2 to 6×6 grid, upsampled bilinearly) of random strength,
    plus fine per-pixel noise of random strength."""
    cells = int(torch.randint(2, 7, (1,)))
    flat = torch.rand(b, 3, 1, 1, device=device)
    coarse = torch.randn(b, 3, cells, cells, device=device)
    field = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    strength = torch.rand(b, 1, 1, 1, device=device) * 0.4
    grain = torch.rand(b, 1, 1, 1, device=device) * 0.08
    fine = torch.randn(b, 3, h, w, device=device)
    return (flat + strength * field + grain * fine).clamp(0, 1)


def _soft_inwards(mask: torch.Tensor) -> torch.Tensor:
    """Alpha of B×h×w bool masks: the mask's 3×3 mean, kept inside the mask (an edge softened
    inwards by a pixel: no pixel outside the mask changes, every pixel inside gets alpha > 0)."""
    m = mask.float().unsqueeze(1)
    return (F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False) * m).squeeze(1)


def paste_procedural(images: torch.Tensor, cfg: AttackConfig):
    """Paste one procedural object per image, inside a region of the patch size at a random
    position: returns (pasted images, B×H×W bool mask of the object's pixels).

    Made in float32 without autocast, then blended in the normalised space of ``cfg.mean`` /
    ``cfg.std``: a convex mix of the image and a [0, 1] colour, so the pixels stay in the valid
    range of a [0, 1] image (``_valid_range``)."""
    b, _, height, width = images.shape
    h, w, smin, smax = _region(cfg.patch_size, height, width)
    dev = images.device
    with torch.autocast(dev.type, enabled=False):
        shapes = paste_shapes(b, h, w, smin, smax, dev)
        local = torch.cat([_soft_inwards(shapes).unsqueeze(1), smooth_texture(b, h, w, dev)], 1)
        alpha, rgb = _place_regions(local, height, width).split([1, 3], dim=1)
        mean = torch.tensor(cfg.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=dev).view(1, 3, 1, 1)
        pasted = images.float() * (1 - alpha) + (rgb - mean) / std * alpha
    return pasted.to(images.dtype), alpha[:, 0] > 0


MASKS = {
    "all_image": mask_all_image,
    "pixels_sparse": mask_pixels_sparse,
    "class": mask_class,
    "square_patch": mask_square_patch,
    "random_patch": mask_random_patch,
    "fractal": mask_fractal,
}
ALIASES = {"fractal": "max_fractal"}  # the original's plain ``--adv fractal``
PASTE = "paste"  # ``paste`` alone, or ``paste+ATTACK`` with an FGSM attack (``fgsm_choices``)


def fgsm_choices() -> tuple[str, ...]:
    """The FGSM ``--adv`` values MODE_MASK, from MASKS as it is now (a mask registered after
    import, by a plugin or a test, is one too)."""
    return tuple(f"{m}_{k}" for m in MODES for k in MASKS)


def attack_choices() -> tuple[str, ...]:
    """Every ``--adv`` value: none, MODE_MASK, the aliases, paste, paste+MODE_MASK."""
    fgsm_values = fgsm_choices()
    return (("none",) + fgsm_values + tuple(ALIASES) + (PASTE,)
            + tuple(f"{PASTE}+{name}" for name in fgsm_values))



class ParsedAttack(NamedTuple):
    """An ``--adv`` value: the FGSM step's mode and mask (None for ``paste`` alone) and
    whether a procedural object is pasted first."""

    mode: str | None
    mask: str | None
    paste: bool = False


def parse_attack(name: str) -> ParsedAttack | None:
    """Split an ``--adv`` value into (mode, mask name, paste); None for "none"; see ALIASES."""
    if name == "none":
        return None
    if name == PASTE:
        return ParsedAttack(None, None, True)
    paste = name.startswith(f"{PASTE}+")
    mode, _, mask = (name[len(PASTE) + 1:] if paste else ALIASES.get(name, name)).partition("_")
    if mode not in MODES or mask not in MASKS:
        raise ValueError(f"--adv {name}: expected one of {', '.join(attack_choices())}")
    return ParsedAttack(mode, mask, paste)


def _valid_range(cfg, device):
    """Per-channel bounds of a normalised image whose pixels lie in [0, 1]."""
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    return -mean / std, (1 - mean) / std


class AttackOutput(NamedTuple):
    """What ``select_attack`` gives: the attacked images, the B×1×H×W mask, and the SegNet's
    B×H×W prediction on the attack's input just before its signed-gradient step."""

    images: torch.Tensor
    mask: torch.Tensor
    pred_before: torch.Tensor


def max_mode_target(labels: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """One random class per image, among ``cfg.target_classes``, as a B×H×W target."""
    classes = torch.tensor(cfg.target_classes or range(cfg.nclass), device=labels.device)
    pick = torch.randint(0, len(classes), (labels.shape[0], 1, 1), device=labels.device)
    return classes[pick].expand_as(labels)


def attack_precision(device_type: str):
    """float16 autocast is switched off for the attack's forward and backward: float16's range
    (smallest subnormal 6e-8) cannot hold input gradients, which are 1e-9 to 1e-3 per pixel;
    their sign would be 0 and the pixel left unattacked. bfloat16 has float32's range and
    stays on. Everything after the attack runs in the autocast dtype."""
    if torch.is_autocast_enabled(device_type) and \
            torch.get_autocast_dtype(device_type) == torch.float16:
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def fgsm(segnet, images, labels, mask, cfg: AttackConfig):
    """One signed-gradient step of size epsilon inside ``mask``; SegNet weights get no grad.

    Returns (attacked images, the SegNet's prediction before the step). The loss is a *sum*
    over pixels, not a mean: the same gradient signs, without a 1/(B·H·W) factor that pushes
    every input gradient towards underflow in low precision (see ``attack_precision``).
    """
    x = (images + cfg.noise_std * torch.randn_like(images) * mask).detach().requires_grad_(True)
    with attack_precision(images.device.type):
        return _signed_step(segnet, x, images, labels, mask, cfg)


def _signed_step(segnet, x, images, labels, mask, cfg: AttackConfig):
    logits = segnet(x)
    if cfg.mode == "min":
        target = labels.masked_fill((labels < 0) | (labels >= cfg.nclass), -100)
        direction = 1.0  # up the true class's loss
    else:
        target, direction = max_mode_target(labels, cfg), -1.0  # down the loss of a random class
    loss = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)  # gradient w.r.t. the input only
    lo, hi = _valid_range(cfg, images.device)
    adv = x.detach() + direction * cfg.epsilon * grad.sign() * mask
    adv = torch.maximum(torch.minimum(adv, hi), lo)
    return torch.where(mask > 0, adv, images.detach()), logits.detach().argmax(dim=1)


def select_attack(images, labels, segnet, cfg: AttackConfig, keep_out=None) -> AttackOutput:
    """Attack a batch: draw the mask, then one FGSM step inside it.

    ``min_class`` attacks only the pixels the SegNet already gets right (as the original):
    pushing a wrong pixel further from its true class changes nothing to learn from.
    ``keep_out`` (B×H×W bool, the pasted pixels): left out of the mask and of the loss (their
    label is not what they show).
    """
    if keep_out is not None:
        labels = labels.masked_fill(keep_out, -1)
    mask = MASKS[cfg.mask](images, labels, cfg)
    if keep_out is not None:
        mask = mask * ~keep_out.unsqueeze(1)
    if cfg.mode == "min" and cfg.mask == "class":
        with torch.no_grad():
            mask = mask * (segnet(images).argmax(dim=1, keepdim=True) == labels.unsqueeze(1))
    adv, pred_before = fgsm(segnet, images, labels, mask, cfg)
    return AttackOutput(adv, mask, pred_before)


class Perturbed(NamedTuple):
    """What ``perturb`` gives: the images the SegNet and the observer see, the FGSM part (None
    for ``paste`` alone) and the B×H×W bool mask of the pasted pixels (None without paste)."""

    images: torch.Tensor
    attack: AttackOutput | None
    pasted: torch.Tensor | None


def perturb(images, labels, segnet, cfg: AttackConfig) -> Perturbed:
    """The training-time perturbation of ``cfg``: paste a procedural object (``cfg.paste``),
    then the FGSM step (``cfg.mask``) on the pasted image. Paste and attack regions are drawn
    independently; the attack leaves the pasted pixels out (``select_attack``'s ``keep_out``),
    so the object stays as generated and its pixels count once, as pasted."""
    pasted = None
    if cfg.paste:
        images, pasted = paste_procedural(images, cfg)
    if cfg.mask is None:
        return Perturbed(images, None, pasted)
    attack = select_attack(images, labels, segnet, cfg, keep_out=pasted)
    return Perturbed(attack.images, attack, pasted)
