"""A tiny CamVid-layout folder (train, val, test_ood lists; random 48×64 images and labels)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from obsnet.data.specs import SPECS

H, W = 48, 64

SPEC = replace(SPECS["Synthetic"], size=(H, W), crop=(8, 12))

SPLITS = {"train": ("train", "trainannot", 4, 12), "val": ("val", "valannot", 2, 12),
          "test_ood": ("test_ood", "testannot_ood", 2, 13)}


def _write_pair(root: Path, img_dir: str, ann_dir: str, name: str, nids: int, rng,
                label_size: tuple[int, int] = (H, W)) -> tuple[str, str]:
    """One random RGB image and label PNG; returns their paths relative to root."""
    (root / img_dir).mkdir(exist_ok=True)
    (root / ann_dir).mkdir(exist_ok=True)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    label = rng.integers(0, nids, label_size, dtype=np.uint8)
    Image.fromarray(image).save(root / img_dir / name)
    Image.fromarray(label).save(root / ann_dir / name)
    return f"{img_dir}/{name}", f"{ann_dir}/{name}"


def make_camvid(root: Path, absolute: bool = False) -> Path:
    """A tiny CamVid-layout folder; list files relative, or absolute as the SegNet tutorial's."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, (img_dir, ann_dir, count, nids) in SPLITS.items():
        pairs = [_write_pair(root, img_dir, ann_dir, f"f{i:03d}.png", nids, rng)
                 for i in range(count)]
        prefix = "/SegNet/CamVid/" if absolute else ""
        lines = [f"{prefix}{img} {prefix}{ann}" for img, ann in pairs]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
