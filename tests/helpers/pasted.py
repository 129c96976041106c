"""A CamVid-layout split for ``python -m obsnet.paste`` and the files a pasted split holds."""
from pathlib import Path

import numpy as np
from PIL import Image

from obsnet.data import paste

H, W = 40, 56

NAMES = ("f000.png", "f001.png", "f002.png")


def make_split(root: Path, split: str = "val", nids: int = 12, names=NAMES) -> Path:
    """``root/{split}.txt`` with random RGB images and labels (ids < nids)."""
    rng = np.random.default_rng(1)
    for folder in (split, f"{split}annot"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / split / name)
        Image.fromarray(rng.integers(0, nids, (H, W), dtype=np.uint8)).save(
            root / f"{split}annot" / name)
    (root / f"{split}.txt").write_text("".join(f"{split}/{n} {split}annot/{n}\n" for n in names))
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder``, markers aside."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != paste.MARKER}


def ood_files(root: Path, split: str = "val", suffix: str = "ood") -> dict[str, bytes]:
    files = {f"{split}_{suffix}.txt": (root / f"{split}_{suffix}.txt").read_bytes()}
    for folder in (f"{split}_{suffix}", f"{split}annot_{suffix}"):
        files.update({f"{folder}/{k}": v for k, v in files_of(root / folder).items()})
    return files
