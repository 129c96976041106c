"""Joint image / label transforms for semantic segmentation (torchvision.transforms.v2).

Inputs are a ``tv_tensors.Image`` (uint8, 3×H×W) and a ``tv_tensors.Mask`` (uint8, H×W);
outputs are a float32 normalised image and an int64 label of the requested size. Geometric
transforms move image and label together; photometric ones touch the image only; labels
are always resized with nearest-neighbour interpolation so no new ids appear.
"""
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from obsnet.data.specs import DatasetSpec

# Image -> float in [0, 1]; Mask -> int64 ids (never scaled); anything else untouched.
_TO_DTYPE = {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}


def _normalize(spec: DatasetSpec) -> v2.Normalize:
    """Normalisation with the dataset's mean and std (images only; labels pass through)."""
    return v2.Normalize(mean=spec.mean, std=spec.std)


def _crop_at(spec: DatasetSpec, size: tuple[int, int]) -> tuple[int, int]:
    """The spec's crop, given in pixels at ``spec.size``, rescaled to ``size``."""
    return tuple(round(c * s / s0) for c, s, s0 in zip(spec.crop, size, spec.size))


def train_transform(spec: DatasetSpec, size: tuple[int, int] | None = None, *,
                    hflip_p: float = 0.5, jitter: float = 0.2,
                    scale_jitter: float = 0.0) -> v2.Compose:
    """Training augmentation: resize, random crop of ``spec.crop`` pixels, resize back, flip, jitter.

    Args:
        spec: dataset spec (crop, mean, std).
        size: output (H, W); ``spec.size`` when None. The crop is scaled to this size.
        hflip_p: probability of a horizontal flip of image and label together.
        jitter: brightness / contrast / saturation jitter strength (0 disables it).
        scale_jitter: when > 0, instead of the fixed crop: a random zoom by a factor drawn in
            [1, 1 + scale_jitter], then a random crop back to ``size`` (no padding needed).
    """
    size = tuple(size or spec.size)
    # The first resize is a no-op when the files already have the preset size (CamVid).
    steps = [v2.Resize(size, antialias=True), *_random_zoom(spec, size, scale_jitter),
             v2.RandomHorizontalFlip(p=hflip_p),
             v2.ToDtype(_TO_DTYPE, scale=True)]
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    return v2.Compose([*steps, _normalize(spec)])


def _random_zoom(spec: DatasetSpec, size: tuple[int, int], scale_jitter: float) -> list:
    """The geometric part of ``train_transform``: the spec's fixed crop and resize back, or a
    random zoom in [1, 1 + scale_jitter] then a crop of ``size``."""
    if scale_jitter > 0:
        short = min(size)
        return [v2.RandomResize(short, int(round(short * (1 + scale_jitter))) + 1, antialias=True),
                v2.RandomCrop(size)]
    crop_h, crop_w = _crop_at(spec, size)
    return [v2.RandomCrop((size[0] - crop_h, size[1] - crop_w)), v2.Resize(size, antialias=True)]


def eval_transform(spec: DatasetSpec, size: tuple[int, int] | None = None) -> v2.Compose:
    """Deterministic evaluation pipeline: resize to ``size`` (``spec.size`` when None), normalise."""
    size = tuple(size or spec.size)
    return v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(_TO_DTYPE, scale=True),
                       _normalize(spec)])


def denormalize(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Undo ``Normalize`` for display: (B×)3×H×W normalised images -> values in [0, 1]."""
    mean = torch.tensor(spec.mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)
