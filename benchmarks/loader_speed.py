"""Training-loader throughput at a dataset preset (images per second).

    python -m benchmarks.loader_speed --data CamVid --dset_folder <path> --workers 0 2

Without --dset_folder, a CamVid-layout folder of --images real-size random images is made in a
temporary directory.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from obsnet.data.loaders import build_dataset, build_loader
from obsnet.data.specs import SPECS


def make_folder(root: Path, n: int, size: tuple[int, int]) -> Path:
    """A CamVid-layout train split of ``n`` random images and labels at ``size`` (H, W)."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir()
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"train/{i}.png")
        Image.fromarray(rng.integers(0, 12, size, dtype=np.uint8)).save(root / f"trainannot/{i}.png")
        lines.append(f"train/{i}.png trainannot/{i}.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def images_per_second(spec, root, workers: int, bsize: int, epochs: int) -> float:
    """Mean throughput over ``epochs`` passes, after one warm-up pass."""
    dataset = build_dataset(spec, root, spec.train_split, spec.size, train=True)
    loader = build_loader(dataset, bsize, train=True, num_workers=workers)
    for _ in loader:  # warm-up: workers start, files enter the page cache
        pass
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    """Print images/s for each --workers value."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="CamVid")
    p.add_argument("--dset_folder", default=None)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--bsize", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args()
    spec = SPECS[args.data]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dset_folder or make_folder(Path(tmp), args.images, spec.size)
        for workers in args.workers:
            speed = images_per_second(spec, root, workers, args.bsize, args.epochs)
            print(f"{spec.name} {spec.size[0]}x{spec.size[1]} bsize {args.bsize}, "
                  f"{workers} workers: {speed:.0f} images/s")


if __name__ == "__main__":
    main()
