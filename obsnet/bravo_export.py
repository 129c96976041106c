"""``--export_bravo DIR``: each method's prediction and confidence files in the tree the BRAVO
toolkit's encoder reads (``docs/bravo.md``).

For an input image ``<dset_folder>/<path>/<name>.<ext>`` a method ``m`` gets
``DIR/m/<path>/<name>_pred.png`` (8-bit grayscale, the segmenter's class 0..18) and
``DIR/m/<path>/<name>_conf.png`` (16-bit grayscale, the level ``floor(c * 65536)`` clipped to
0..65535 of its confidence c: ``obsnet.metrics.bravo``), at the image's own size: scores resized
bilinearly, classes by nearest neighbour, as the evaluation brings them to the labels. With
``--data BRAVO`` ``<path>`` starts with ``bravo_<subset>/``: ``DIR/m`` is the submission root
that ``python -m bravo_toolkit.util.encode_submission`` takes.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from obsnet.data.native import nearest
from obsnet.errors import UsageError
from obsnet.metrics.bravo import bravo_confidence, quantise
from obsnet.methods import METHODS
from obsnet.models.blocks import resize
from obsnet.outputs import atomic_write, temp_folder

FLAG = "--export_bravo"


def frame_stem(root: Path, dset_folder, image) -> Path:
    """``DIR``-relative stem of an image's files: its path under --dset_folder, no suffix.
    Symbolic links are not followed (a linked ``bravo_ACDC/`` keeps its name in the tree)."""
    image = Path(os.path.abspath(image))
    folder = Path(os.path.abspath(Path(dset_folder).expanduser()))
    try:
        rel = image.relative_to(folder)
    except ValueError:
        rel = Path(image.name)  # an image outside --dset_folder keeps its name only
    return Path(root) / rel.with_suffix("")


def frame_files(root, method: str, dset_folder, image) -> tuple[Path, Path]:
    """(``_pred.png``, ``_conf.png``) of one image for ``method``."""
    stem = frame_stem(Path(root) / method, dset_folder, image)
    return stem.with_name(stem.name + "_pred.png"), stem.with_name(stem.name + "_conf.png")


def planned_files(root, names, dset_folder, pairs) -> list[Path]:
    """Every file the export of ``names`` over ``pairs`` writes."""
    return [f for m in names for p in pairs for f in frame_files(root, m, dset_folder, p.image)]


def check_export_targets(root, names, dset_folder, pairs, overwrite: bool) -> None:
    """UsageError, before any work, when two images would share a file or files of an earlier
    export would be replaced without --overwrite."""
    files = planned_files(root, names, dset_folder, pairs)
    if len(set(files)) != len(files):
        raise UsageError(f"{FLAG} {root}: two images of the split have the same name and "
                         f"folder under --dset_folder; their files would collide")
    existing = [p for p in files if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"{FLAG} {root}: {len(existing)} file(s) of an earlier export are there "
                         f"(e.g. {existing[0]}); add --overwrite to replace them")


def write_png(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8 or uint16, H×W) as a grayscale PNG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write(path, lambda sink: sink.write(buffer.getvalue()), FLAG)


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image file."""
    with Image.open(path) as im:
        return im.height, im.width


class BravoExport:
    """``--export_bravo`` of one evaluation pass: ``add_scores`` keeps each method's maps of the
    current batch, ``add_pred`` (the batch's classes, after every method) writes the batch's
    files into a temporary folder in ``DIR``; ``finish`` moves them into place after the table
    is out, ``discard`` removes what a stopped run wrote. A write that fails does not stop the
    pass: ``finish`` raises its OutputError. ``cfg``: the methods' ``MethodConfig`` (for their
    probability of error)."""

    def __init__(self, root, names, dset_folder, pairs, cfg):
        self.root, self.names, self.dset_folder = Path(root), list(names), dset_folder
        self.pairs, self.cfg, self.count = list(pairs), cfg, 0
        self.pending: dict[str, torch.Tensor] = {}
        self.written: list[Path] = []  # final paths, their files still in ``tmp``
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_folder(self.root / "bravo")  # those of killed runs removed first
        self.failure: OSError | None = None

    def _aside(self, path: Path) -> Path:
        """Where ``path`` is written until ``finish``."""
        return self.tmp / path.relative_to(self.root)

    def add_scores(self, name: str, maps: torch.Tensor) -> None:
        """The B×h×w scores of the current batch for method ``name``."""
        self.pending[name] = maps.detach().float()

    def add_pred(self, pred: torch.Tensor) -> None:
        """The B×h×w classes of the current batch: write every method's files for its frames."""
        if self.failure is not None:
            return
        try:
            self._write_batch(pred)
        except OSError as exc:
            self.failure = exc
            self.discard()
        self.pending.clear()

    def _write_batch(self, pred: torch.Tensor) -> None:
        for i in range(len(pred)):
            image = self.pairs[self.count].image
            size = image_size(image)
            classes = nearest(pred[i: i + 1, None], size)[0, 0].cpu().numpy().astype(np.uint8)
            for name in self.names:
                score = resize(self.pending[name][i: i + 1, None], size)[0, 0]
                levels = quantise(bravo_confidence(METHODS[name], score, self.cfg))
                pred_file, conf_file = frame_files(self.root, name, self.dset_folder, image)
                for path in (pred_file, conf_file):
                    self._aside(path).parent.mkdir(parents=True, exist_ok=True)
                write_png(self._aside(pred_file), classes)
                write_png(self._aside(conf_file), levels.cpu().numpy().astype(np.uint16))
                self.written += [pred_file, conf_file]
            self.count += 1

    def finish(self) -> list[Path]:
        """Move every file into its place in ``DIR``; returns them (the OutputError of a failed
        write, if any, instead)."""
        if self.failure is not None:
            raise self.failure
        for path in self.written:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._aside(path), path)
        self.discard()
        return self.written

    def discard(self) -> None:
        """Remove the temporary folder this export created (nothing else)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
