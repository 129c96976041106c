"""A tiny Cityscapes folder in cityscapesScripts' layout (64×128 PNGs, two cities a split)."""
from pathlib import Path

import numpy as np
from PIL import Image

from obsnet.data.specs import SPECS

SPEC = SPECS["Cityscapes"]

H, W = 64, 128

CITIES = {"train": ("bremen", "aachen"), "val": ("lindau", "frankfurt")}

FRAMES = 2  # per city


def write_frame(root: Path, split: str, city: str, k: int, rng, kind: str = "trainIds") -> str:
    """One frame: image + label (``kind``: "trainIds", "labelIds" or "both"); its stem."""
    stem = f"{city}_{k:06d}_{19 + 7 * k:06d}"
    image_dir, gt_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        image_dir / f"{stem}_leftImg8bit.png")
    train = rng.integers(0, SPEC.nclass, (H, W), dtype=np.uint8)
    train[:4] = 255
    if kind in ("trainIds", "both"):
        Image.fromarray(train).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
    if kind in ("labelIds", "both"):
        ids = rng.integers(0, 34, (H, W), dtype=np.uint8)  # every label id, void ones included
        Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
    return stem


def make_cityscapes(root: Path, kind: str = "trainIds") -> Path:
    rng = np.random.default_rng(0)
    for split, cities in CITIES.items():
        for city in cities:
            for k in range(FRAMES):
                write_frame(root, split, city, k, rng, kind)
    return root


def train_cityscapes_pair(root: Path, size=(32, 64)) -> tuple[Path, list[str]]:
    """Generated Cityscapes data in ``root / "cs"``, a tiny SegNet and observer trained one
    epoch each on it by main.py; returns (data folder, the flags naming size, width and the
    two checkpoints, for later runs)."""
    from tests.helpers.runner import main_py

    cs = make_cityscapes(root / "cs")
    common = ["--size", str(size[0]), str(size[1]), "--width_mult", "0.0625", "--bsize", "2",
              "--epoch", "1", "--seed", "0", "--segnet_file", str(root / "segnet.pth"),
              "--obsnet_file", str(root / "obs")]
    for extra in (["--train_segnet"], []):
        out = main_py("--data", "Cityscapes", "--dset_folder", str(cs), *common,
                      "--tboard", str(root / "train"), *extra)
        assert out.returncode == 0, out.stdout + out.stderr
    return cs, common
