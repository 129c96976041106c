"""Writes the synthetic road-scene dataset (``obsnet.data.synthetic_scenes`` draws the scenes) in
the CamVid (SegNet tutorial) layout, deterministic for a seed::

    train/ trainannot/ val/ valannot/ test/ testannot/ test_ood/ testannot_ood/
    train.txt val.txt test.txt test_ood.txt      # "train/x.png trainannot/x.png"
    .synthetic                                   # written first: this folder is ours
    .complete                                    # JSON parameters, written last

Only an empty or missing folder, or one marked as ours (``.synthetic``, or ``.complete`` as
written by earlier versions, or nothing but this module's folders, image names and lists, as
an interrupted earlier version leaves), is written to: anything else is refused untouched.

CLI: ``python -m obsnet.synthetic --out DIR --seed S [--n_train N ...]``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from obsnet.data.errors import DatasetError
from obsnet.data.synthetic_scenes import MIN_OOD_SHARE, SPEC, VERSION, render_scene  # noqa: F401

LOG = logging.getLogger(__name__)
DEFAULT_COUNTS = {"train": 300, "val": 50, "test": 50}
DIRS = {"train": ("train", "trainannot"), "val": ("val", "valannot"),
        "test": ("test", "testannot"), "test_ood": ("test_ood", "testannot_ood")}
MARKER = ".complete"
OWNER = ".synthetic"  # written before anything else: the folder may be cleared and rewritten
UNTOUCHED = ("nothing was changed (synthetic data is written only into a new or empty folder, "
             "or one it generated before)")

# ----------------------------------------------------------------------------- files

def _save(root: Path, split: str, name: str, pair) -> str:
    img_dir, ann_dir = DIRS[split]
    Image.fromarray(pair[0], "RGB").save(root / img_dir / name)
    Image.fromarray(pair[1], "L").save(root / ann_dir / name)
    return f"{img_dir}/{name} {ann_dir}/{name}\n"


def _read_marker(root: Path):
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(root) -> bool:
    """True when ``root`` holds a fully generated dataset of this generator version."""
    marker = _read_marker(Path(root))
    return isinstance(marker, dict) and marker.get("version") == VERSION


def refusal(root) -> str | None:
    """Why ``root`` must not be (re)generated, or None when it may: a missing or empty
    folder, or one this generator wrote (marked by ``.synthetic`` or ``.complete``)."""
    root = Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        return "it is a file, not a folder"
    if (root / OWNER).is_file() or (root / MARKER).is_file():
        return None
    try:
        entries = sorted(p.name for p in root.iterdir())
        if not entries or _left_by_earlier_version(root, entries):
            return None
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    return f"it holds files the synthetic generator did not write ({shown})"


GENERATED_NAME = re.compile(r"^(train|val|test)_\d{5}\.png$")  # what _save names its images


def _left_by_earlier_version(root: Path, entries: list[str]) -> bool:
    """Whether ``root`` holds only what an interrupted run of an earlier version (which wrote
    no owner marker) leaves: this module's folders holding only its image names, its list
    files, its marker's temporary file. A real dataset's images have other names."""
    folders = {d for pair in DIRS.values() for d in pair}
    known = folders | {f"{split}.txt" for split in DIRS} | {MARKER + ".tmp"}
    if not set(entries) <= known:
        return False
    for name in set(entries) & folders:
        folder = root / name
        if not folder.is_dir() or not all(GENERATED_NAME.match(p.name) for p in folder.iterdir()):
            return False
    return True


def claim(root) -> None:
    """Refuse a folder that is not ours (DatasetError), else mark it as ours (creating it):
    main.py claims it before it creates its own outputs, which may lie inside it."""
    root = Path(root)
    reason = refusal(root)
    if reason is not None:
        raise DatasetError(f"{root}: {reason}; {UNTOUCHED}")
    root.mkdir(parents=True, exist_ok=True)
    (root / OWNER).write_text("written by obsnet.data.synthetic: this folder may be regenerated\n")


def _clear(root: Path) -> None:
    """Remove the marker, then whatever this module writes (and nothing else)."""
    (root / MARKER).unlink(missing_ok=True)
    for img_dir, ann_dir in DIRS.values():
        for d in (img_dir, ann_dir):
            shutil.rmtree(root / d, ignore_errors=True)
            (root / d).mkdir(parents=True)
    for split in DIRS:
        (root / f"{split}.txt").unlink(missing_ok=True)


def _params(seed, n_train, n_val, n_test, size) -> dict:
    """What the marker records: a dataset is reused only when all of it matches."""
    return {"version": VERSION, "seed": int(seed), "n_train": int(n_train),
            "n_val": int(n_val), "n_test": int(n_test), "size": [int(s) for s in size]}


def generate(root, seed: int = 0, n_train: int = DEFAULT_COUNTS["train"],
             n_val: int = DEFAULT_COUNTS["val"], n_test: int = DEFAULT_COUNTS["test"],
             size: tuple[int, int] = SPEC.size, overwrite: bool = False,
             progress: bool = False) -> Path:
    """Write the dataset under ``root`` and return ``root``.

    Skipped when ``root/.complete`` holds the same parameters (unless ``overwrite``). The
    marker is written last, so an interrupted run is redone from scratch next time. A
    folder that is not ours (see ``refusal``) is a DatasetError, and nothing is written.
    """
    root = Path(root)
    params = _params(seed, n_train, n_val, n_test, size)
    if not overwrite and _read_marker(root) == params:
        return root
    claim(root)
    _clear(root)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    jobs = [(split, i) for split, n in counts.items() for i in range(n)]
    lines = {split: [] for split in DIRS}
    for split, i in tqdm(jobs, desc="synthetic", unit="img", disable=not progress):
        clean, ood = render_scene(seed, split, i, tuple(size), ood=split == "test")
        name = f"{split}_{i:05d}.png"
        lines[split].append(_save(root, split, name, clean))
        if ood is not None:
            lines["test_ood"].append(_save(root, "test_ood", name, ood))
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("".join(rows))
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(params, indent=1))
    os.replace(tmp, root / MARKER)
    return root


def ensure_synthetic(root, seed: int = 0, n_train: int = DEFAULT_COUNTS["train"],
                     n_val: int = DEFAULT_COUNTS["val"], n_test: int = DEFAULT_COUNTS["test"],
                     size: tuple[int, int] = SPEC.size) -> Path:
    """Generate the dataset under ``root`` unless a complete one with the same parameters is
    there; logs one line saying which."""
    root = Path(root)
    if _read_marker(root) == _params(seed, n_train, n_val, n_test, size):
        LOG.info(f"synthetic dataset: reusing the complete one in {root} (seed {seed})")
        return root
    start = time.perf_counter()
    generate(root, seed, n_train, n_val, n_test, size)
    LOG.info(f"synthetic dataset: generated {n_train}/{n_val}/{n_test} train/val/test scenes "
             f"(+{n_test} OOD) in {root} (seed {seed}) in {time.perf_counter() - start:.1f} s")
    return root
