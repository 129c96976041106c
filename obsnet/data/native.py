"""Evaluation at each label's own resolution (the SegmentMeIfYouCan / Fishyscapes presets).

The benchmarks score every pixel of the label file, whatever the frame's size, so for the
``test_only`` presets only the image is resized to ``--size``; the label keeps its resolution
(``PairDataset(native_labels=True)``). A batch then holds labels of several sizes:
``collate_native`` pads them to the batch's largest height and width with the ignore id and
adds each frame's size. ``LabelGrid`` brings maps computed at ``--size`` to those labels:
scores bilinearly (``obsnet.models.blocks.resize``), classes by nearest neighbour; the padding
is void, so no metric sees it, and ``frames`` crops it off again.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from obsnet.models.blocks import resize


def collate_native(items: list, pad_value: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images B×3×h×w, labels B×H×W padded with ``pad_value``, sizes B×2 (H_i, W_i))."""
    images = default_collate([image for image, _ in items])
    sizes = torch.tensor([tuple(label.shape[-2:]) for _, label in items], dtype=torch.long)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    labels = torch.full((len(items), height, width), pad_value, dtype=torch.long)
    for i, (_, label) in enumerate(items):
        labels[i, : label.shape[-2], : label.shape[-1]] = label
    return images, labels, sizes


class LabelGrid:
    """Where each frame's label lies in a batch of labels: its (H, W) at the top-left of the
    padded batch. ``sizes`` None means the labels are at the images' size (nothing to do)."""

    def __init__(self, sizes: torch.Tensor | None, padded: tuple[int, int]):
        self.sizes = None if sizes is None else [tuple(int(v) for v in s) for s in sizes]
        self.padded = tuple(padded)

    @classmethod
    def of_batch(cls, batch) -> tuple[torch.Tensor, torch.Tensor, LabelGrid]:
        """(images, labels, grid) of a loader's batch: ``(images, labels)`` or
        ``(images, labels, sizes)`` from ``collate_native``."""
        images, labels, *rest = batch
        return images, labels, cls(rest[0] if rest else None, labels.shape[-2:])

    def _per_frame(self, maps: torch.Tensor, fill, scale) -> torch.Tensor:
        if self.sizes is None:
            return maps
        out = torch.full((maps.shape[0], *self.padded), fill, dtype=maps.dtype, device=maps.device)
        for i, (h, w) in enumerate(self.sizes):
            out[i, :h, :w] = scale(maps[i: i + 1, None], (h, w))[0, 0]
        return out

    def scores(self, maps: torch.Tensor) -> torch.Tensor:
        """B×h×w score maps -> B×H×W float32 at each label's size (bilinear; padding 0)."""
        return self._per_frame(maps.float(), 0.0, resize)

    def classes(self, pred: torch.Tensor) -> torch.Tensor:
        """B×h×w class maps -> B×H×W at each label's size (nearest; padding -1)."""
        return self._per_frame(pred, -1, nearest)

    def to_size(self, labels: torch.Tensor, size) -> torch.Tensor:
        """B×H×W labels -> B×``size`` (nearest, each frame's own part): for previews."""
        if self.sizes is None:
            return labels
        return torch.cat([nearest(labels[i: i + 1, None, :h, :w], tuple(size))[:, 0]
                          for i, (h, w) in enumerate(self.sizes)])

    def frames(self, maps: torch.Tensor) -> list[np.ndarray]:
        """B×H×W maps -> one numpy array per frame, without the padding (copies: a kept frame
        must not hold the whole padded batch alive)."""
        maps = maps.detach().cpu().numpy()
        if self.sizes is None:
            return [m.copy() for m in maps]
        return [m[:h, :w].copy() for m, (h, w) in zip(maps, self.sizes)]


def nearest(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of an integer N×1×H×W map to ``size`` (H, W)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="nearest").to(x.dtype)
