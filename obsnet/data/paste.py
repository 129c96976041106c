"""Paste unseen objects into a CamVid-layout split: a CamVid-OOD-style split next to it.

    python -m obsnet.paste --root DIR --split val [--out DIR] [--suffix S] [--objects DIR]
        [--seed S] [--count MIN MAX] [--size MIN MAX] [--anomaly_id ID] [--feather PX]
        [--overwrite]

From ``root/{split}.txt`` (``{split}/x.png {split}annot/x.png`` lines, parsed and re-rooted
as ``obsnet.data.camvid`` does) it writes, under ``--out`` (default: ``root``), with ``S`` the
``--suffix`` (default ``ood``)::

    {split}_S/x.png          the image with the objects pasted in (RGB PNG)
    {split}annot_S/x.png     its label map (uint8 PNG); pasted pixels hold the anomaly id
    {split}_S.txt            "{split}_S/x.png {split}annot_S/x.png", written last

the layout of CamVid-OOD's ``test_ood`` (anomaly id 12); e.g. ``--objects DIR --suffix
ood_real`` writes ``val_ood_real`` next to the procedural ``val_ood``.

Objects are procedural shapes by default: a union of 1-3 ellipses, smooth blobs and jagged
polygons, filled with a texture (multi-scale noise, stripes, a colour gradient or a
checkerboard) in saturated random colours that no CamVid class has, drawn from numpy
generators of their own (below): disjoint from the training-time ``--adv paste`` of
``obsnet.attacks``, whose shapes, textures and random stream (torch's) differ. With
``--objects DIR`` they are cut-outs instead: RGBA images whose alpha > 127 is the object, or
an image ``name.png`` with a mask ``name_mask.png`` (non-zero = object; it wins over an alpha
channel). Each object gets a
random size (the longer side of its bounding box, as a fraction of the image's shorter side,
within 2 px of resampling), position (wholly inside the image) and, for cut-outs, horizontal
flip. Objects may overlap. Label: the hard mask; image: the same mask, its edge softened
inwards by ``--feather`` pixels, so no pixel outside the label changes.

Every frame draws from its own generator, seeded by ``--seed`` and the file name: the same
seed gives byte-identical files, and a frame does not depend on the others.

Nothing the tool did not write is overwritten: existing outputs are refused unless
``--overwrite`` is given and the folders carry this tool's marker (``MARKER``), which lists
the files it wrote; only those are replaced, and a file of the new split that the marker does
not list is refused. No output may be one of the inputs (the split's list, images and labels,
the cut-outs). The new split is written aside, in temporary folders next to the outputs
(``.{split}_S.PID.HEX8.tmp``), and moved in only once every frame is done: a failure leaves
the previous output as it was and no temporary folder. ``--out`` is locked while the run writes.

Tune on val_ood, never on the test split: a pasted val split is for choosing thresholds,
hyper-parameters and checkpoints; the test split (CamVid-OOD's test_ood) is for the final
numbers only.
"""
import colorsys
import math
import os
import re
import shutil
import sys
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from obsnet.data.base import Pair, check_size, read_image, read_label
from obsnet.data.camvid import read_list
from obsnet.data.errors import DatasetError
from obsnet.errors import ObsnetWarning, UsageError
from obsnet.outputs import Output, OutputError, OutputLock, atomic_write, temp_folder
from obsnet.ownership import (Input, Planned, check_outputs_not_inputs, exists, listed_files,
                              unlisted, write_listing)

PROG = "python -m obsnet.paste"
MARKER = ".written_by_obsnet_paste"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = "_mask"
TEXTURES = ("noise", "stripes", "gradient", "checker")
DEFAULT_SUFFIX = "ood"
# A suffix is part of folder and file names and of the list file's space-separated lines.
SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class PasteConfig:
    """What is pasted: objects per frame, their size range (fraction of the shorter image
    side), the label id they get, the inward edge softening of the image (pixels)."""

    seed: int = 0
    count: tuple[int, int] = (1, 1)
    size: tuple[float, float] = (0.1, 0.3)
    anomaly_id: int = 12
    feather: float = 1.0


class Cutout(NamedTuple):
    """A user's object, cropped to its mask: RGB uint8 H×W×3 and a bool H×W mask."""

    rgb: np.ndarray
    mask: np.ndarray


class Pasted(NamedTuple):
    """One frame's result: image H×W×3 uint8, label H×W uint8, one full-frame bool mask per
    pasted object (in pasting order)."""

    image: np.ndarray
    label: np.ndarray
    objects: list[np.ndarray]


class Outputs(NamedTuple):
    """The three paths a run writes."""

    image_dir: Path
    label_dir: Path
    list_file: Path


def check_config(config: PasteConfig) -> None:
    """UsageError naming the flag when a value of ``config`` cannot work."""
    (cmin, cmax), (smin, smax) = config.count, config.size
    if not 0 <= cmin <= cmax or cmax < 1:
        raise UsageError(f"--count {cmin} {cmax}: need 0 <= MIN <= MAX and MAX >= 1")
    if not 0 < smin <= smax <= 1:
        raise UsageError(f"--size {smin:g} {smax:g}: need 0 < MIN <= MAX <= 1 "
                         "(fractions of the image's shorter side)")
    if not 0 <= config.anomaly_id <= 255:
        raise UsageError(f"--anomaly_id {config.anomaly_id}: must be in 0..255 (uint8 labels)")
    if not 0 <= config.feather <= 20:
        raise UsageError(f"--feather {config.feather:g}: must be in 0..20 pixels")
    if config.seed < 0:
        raise UsageError(f"--seed {config.seed}: must be >= 0")


def check_suffix(suffix: str) -> str:
    """``suffix`` if it can end folder and file names (letters, digits, ``_``, ``-``, ``.``;
    not starting with ``.`` or ``-``; at most 64), else a UsageError naming ``--suffix``."""
    if not isinstance(suffix, str) or not SUFFIX_PATTERN.fullmatch(suffix):
        raise UsageError(f"--suffix {suffix!r}: expected 1 to 64 letters, digits, '_', '-' or "
                         "'.', not starting with '.' or '-' (it ends folder and file names)")
    return suffix


def frame_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one frame, from the seed and its output file name only."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


# ----------------------------------------------------------------------------- shapes

def _primitive(rng: np.random.Generator, centre: np.ndarray, radius: float) -> list[tuple]:
    """Outline of one primitive around ``centre``, star-shaped about it, within 1.25 radius:
    a rotated ellipse, a smooth blob or a jagged polygon."""
    kind = rng.integers(3)
    if kind == 2:  # jagged polygon: few vertices at random angles and radii
        n = int(rng.integers(3, 10))
        phi = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = radius * rng.uniform(0.4, 1.25, n)
    else:
        phi = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        if kind == 0:  # ellipse with axes (a, b), rotated by theta
            a, b = radius * rng.uniform(0.4, 1.25, 2)
            theta = rng.uniform(0, np.pi)
            r = a * b / np.hypot(b * np.cos(phi - theta), a * np.sin(phi - theta))
        else:  # smooth blob: a few low harmonics of the radius (their amplitudes sum <= 0.25)
            amps = rng.dirichlet(np.ones(3)) * rng.uniform(0.05, 0.25)
            waves = [amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
                     for k, amp in zip((2, 3, 5), amps)]
            r = radius * (1 + np.sum(waves, axis=0))
    points = centre + np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    return [tuple(p) for p in points]


def _crop(mask: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of a non-empty bool mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _resize_rgba(rgb: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop an object to its mask, scale it so the longer side of its box is ``side``, crop
    it to its new (hard) mask."""
    box = _crop(mask)
    rgb, mask = rgb[box], mask[box]
    h, w = mask.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgba = np.dstack([rgb, mask.astype(np.uint8) * 255])
    # RGBA resizing premultiplies alpha: no dark fringe from the transparent pixels' colour.
    out = np.asarray(Image.fromarray(rgba).resize(size, Image.Resampling.BILINEAR))
    hard = out[..., 3] > 127
    if not hard.any():  # a sliver thinner than a pixel at this scale
        hard = out[..., 3] == out[..., 3].max()
    box = _crop(hard)
    return out[..., :3][box], hard[box]


def shape_mask(rng: np.random.Generator, side: int) -> np.ndarray:
    """A procedural shape: bool mask whose box's longer side is about ``side`` pixels."""
    canvas = int(np.clip(4 * side, 64, 1024))  # drawn 4× larger, then downsampled (smooth edge)
    img = Image.new("L", (canvas, canvas))
    draw = ImageDraw.Draw(img)
    centre = np.array([canvas / 2, canvas / 2])
    first = None
    for _ in range(int(rng.integers(1, 4))):
        draw.polygon(_primitive(rng, centre, canvas * rng.uniform(0.1, 0.2)), fill=255)
        if first is None:
            first = np.argwhere(np.asarray(img) > 0)
        # The next primitive starts inside the first one: the union stays connected and,
        # 1.25 * 0.2 from the middle plus its own 1.25 * 0.2, inside the canvas.
        y, x = first[rng.integers(len(first))]
        centre = np.array([x, y], float)
    mask = np.asarray(img) > 127
    return _resize_rgba(np.zeros((*mask.shape, 3), np.uint8), mask, side)[1]


# ----------------------------------------------------------------------------- textures

def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` saturated, bright RGB colours in 0..1 (n×3)."""
    hsv = np.stack([rng.uniform(0, 1, n), rng.uniform(0.6, 1, n), rng.uniform(0.6, 1, n)], 1)
    return np.array([colorsys.hsv_to_rgb(*c) for c in hsv], np.float32)


def _noise(rng: np.random.Generator, h: int, w: int, octaves: int = 3) -> np.ndarray:
    """Value noise in 0..1: random grids of 2, 4, 8 cells upsampled bicubically and summed."""
    field = np.zeros((h, w), np.float32)
    for k in range(octaves):
        cells = 2 ** (k + 1) + int(rng.integers(2))
        grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
        field += np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC)) / 2**k
    span = field.max() - field.min()
    return (field - field.min()) / span if span > 0 else np.zeros_like(field)


def _palette(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map values in 0..1 through a piecewise-linear ramp of colours: H×W×3 in 0..1."""
    stops = np.linspace(0, 1, len(colours))
    return np.stack([np.interp(t, stops, colours[:, c]) for c in range(3)], axis=-1)


def texture(rng: np.random.Generator, h: int, w: int, kind: str | None = None) -> np.ndarray:
    """An h×w×3 float texture in 0..255 of ``kind`` (one of TEXTURES; random when None)."""
    kind = kind or TEXTURES[rng.integers(len(TEXTURES))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    across = -xx * np.sin(theta) + yy * np.cos(theta)
    period = rng.uniform(3, max(4.0, max(h, w) / 3))
    if kind == "noise":
        t, n = _noise(rng, h, w), 3
    elif kind == "stripes":  # wavy stripes, from soft (sine) to hard (sharpened)
        wave = np.sin(2 * np.pi * (along / period + 0.5 * _noise(rng, h, w, 2)))
        t, n = np.clip(0.5 + 0.5 * wave * rng.uniform(1, 6), 0, 1), 2
    elif kind == "gradient":
        t, n = along - along.min(), 3
        t = 0.85 * t / max(float(t.max()), 1.0) + 0.15 * _noise(rng, h, w, 2)
    elif kind == "checker":
        t, n = ((np.floor(along / period) + np.floor(across / period)) % 2), 2
    else:
        raise ValueError(f"unknown texture {kind!r} (known: {', '.join(TEXTURES)})")
    rgb = _palette(t, _colours(rng, n)) + rng.normal(0, 0.03, (h, w, 3))  # fine grain
    return np.clip(rgb, 0, 1).astype(np.float32) * 255


# ----------------------------------------------------------------------------- cut-outs

def _open(path: Path, what: str) -> Image.Image:
    """A fully decoded image, or a DatasetError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":  # a palette image is an object only with a transparent index
                return img.convert("RGBA" if "transparency" in img.info else "RGB")
            return img.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"--objects: {what} {path}: cannot be read as an image: {exc}") from None


def load_cutout(path: Path, mask_path: Path | None = None) -> Cutout:
    """One object: ``path`` RGBA (alpha > 127) or RGB with ``mask_path`` (non-zero), cropped."""
    img = _open(path, "object")
    rgba = np.asarray(img.convert("RGBA"))
    if mask_path is not None:
        mask = np.asarray(_open(mask_path, "mask").convert("L")) > 0
        if mask.shape != rgba.shape[:2]:
            raise DatasetError(f"--objects: mask {mask_path} is {mask.shape} (H, W), "
                               f"its image {path} is {rgba.shape[:2]}")
    elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        mask = rgba[..., 3] > 127
    else:
        raise DatasetError(f"--objects: object {path} has no alpha channel and no mask file "
                           f"{path.stem}{MASK_SUFFIX}.png")
    if not mask.any():
        raise DatasetError(f"--objects: {mask_path or path}: no object pixel "
                           "(alpha > 127, or non-zero mask)")
    box = _crop(mask)
    return Cutout(np.ascontiguousarray(rgba[..., :3][box]), mask[box])


def load_cutouts(folder: Path) -> list[Cutout]:
    """Every object of a folder: ``name.png`` (RGBA) or ``name.png`` + ``name_mask.png``."""
    if not folder.is_dir():
        raise UsageError(f"--objects {folder}: folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    masks = {p.stem[:-len(MASK_SUFFIX)]: p for p in files if p.stem.endswith(MASK_SUFFIX)}
    images = [p for p in files if not p.stem.endswith(MASK_SUFFIX)]
    orphans = sorted(set(masks) - {p.stem for p in images})
    if orphans:
        raise DatasetError(f"--objects: mask {masks[orphans[0]]} has no object image "
                           f"{orphans[0]}.png next to it")
    if not images:
        raise DatasetError(f"--objects {folder}: no object image ({', '.join(IMAGE_SUFFIXES)})")
    return [load_cutout(p, masks.get(p.stem)) for p in images]


# ----------------------------------------------------------------------------- pasting

def make_object(rng: np.random.Generator, side: int,
                cutouts: Sequence[Cutout] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(float RGB 0..255 h×w×3, bool mask h×w) of one object whose longer side is ~``side``."""
    if not cutouts:
        mask = shape_mask(rng, side)
        return texture(rng, *mask.shape), mask
    cutout = cutouts[rng.integers(len(cutouts))]
    rgb, mask = _resize_rgba(cutout.rgb, cutout.mask, side)
    if rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    return rgb.astype(np.float32), mask


def _soft_alpha(mask: np.ndarray, feather: float) -> np.ndarray:
    """Image alpha of an object: the mask blurred by ``feather`` px, kept inside the mask."""
    if feather <= 0:
        return mask.astype(np.float32)
    pad = math.ceil(3 * feather)
    img = Image.fromarray(np.pad(mask, pad).astype(np.uint8) * 255)
    blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(feather)), np.float32) / 255
    return blurred[pad:-pad, pad:-pad] * mask


def paste_objects(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                  config: PasteConfig, cutouts: Sequence[Cutout] | None = None) -> Pasted:
    """Paste ``config.count`` objects into an H×W×3 uint8 image and its H×W uint8 label
    (neither is modified): the label gets the anomaly id on each object's hard mask."""
    h, w = label.shape
    out_image, out_label = image.astype(np.float32), label.copy()
    objects = []
    for _ in range(int(rng.integers(config.count[0], config.count[1] + 1))):
        side = max(2, round(rng.uniform(*config.size) * min(h, w)))
        rgb, mask = make_object(rng, side, cutouts)
        oh, ow = mask.shape
        y, x = int(rng.integers(h - oh + 1)), int(rng.integers(w - ow + 1))
        alpha = _soft_alpha(mask, config.feather)[..., None]
        region = out_image[y:y + oh, x:x + ow]
        region[:] = region * (1 - alpha) + rgb * alpha
        out_label[y:y + oh, x:x + ow][mask] = config.anomaly_id
        full = np.zeros((h, w), bool)
        full[y:y + oh, x:x + ow] = mask
        objects.append(full)
    return Pasted(np.rint(out_image).clip(0, 255).astype(np.uint8), out_label, objects)


# ----------------------------------------------------------------------------- files

def output_paths(out: Path, split: str, suffix: str = DEFAULT_SUFFIX) -> Outputs:
    """``out/{split}_{suffix}/``, ``out/{split}annot_{suffix}/``, ``out/{split}_{suffix}.txt``."""
    return Outputs(out / f"{split}_{suffix}", out / f"{split}annot_{suffix}",
                   out / f"{split}_{suffix}.txt")


def output_names(pairs: Sequence[Pair]) -> list[str]:
    """Output file name of every pair (its image's stem + .png); DatasetError on duplicates."""
    seen: dict[str, Pair] = {}
    for pair in pairs:
        name = f"{pair.image.stem}.png"
        if name in seen:
            raise DatasetError(f"{pair.source}: image {pair.image} would be written as {name}, "
                               f"like {seen[name].image} ({seen[name].source})")
        seen[name] = pair
    return list(seen)


def _list_is_ours(outputs: Outputs) -> bool:
    """True when every line of the existing list file names files in the two output folders."""
    try:
        lines = outputs.list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    prefixes = (f"{outputs.image_dir.name}/", f"{outputs.label_dir.name}/")
    fields = [line.split() for line in lines if line.strip()]
    return all(len(f) == 2 and all(p.startswith(q) for p, q in zip(f, prefixes)) for f in fields)


def previous_files(outputs: Outputs) -> dict[Path, list[str]]:
    """The files this tool's marker lists in each output folder that has one."""
    listed = {folder: listed_files(folder / MARKER) for folder in outputs[:2]}
    return {folder: files for folder, files in listed.items() if files is not None}


def check_previous(outputs: Outputs, names: Sequence[str], overwrite: bool) -> None:
    """FileExistsError (one line, naming the path) when an output exists and ``overwrite`` is
    off, when it is not this tool's, or when a file the new split would write is in an output
    folder without being listed in its marker (even with ``overwrite``)."""
    existing = [p for p in outputs if exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: already exists; not overwritten "
                              f"(--overwrite replaces this tool's own output)")
    previous = previous_files(outputs)
    for folder in (f for f in outputs[:2] if exists(f)):
        if folder not in previous or folder.is_symlink():
            raise FileExistsError(f"{folder}: exists and has no {MARKER} marker (not written by "
                                  f"{PROG}); not overwritten, even with --overwrite")
        foreign = unlisted(folder, names, previous[folder])
        if foreign:
            raise FileExistsError(f"{folder / foreign[0]}: exists and is not listed in {MARKER} "
                                  f"(not written by {PROG}); not overwritten, even with --overwrite")
    if outputs.list_file.exists() and (len(previous) < 2 or not _list_is_ours(outputs)):
        raise FileExistsError(f"{outputs.list_file}: exists and was not written by {PROG}; "
                              "not overwritten, even with --overwrite")


def planned_files(outputs: Outputs, names: Sequence[str]) -> list[Planned]:
    """Every file the run writes, or removes (the previous output's)."""
    out, previous = outputs.list_file.parent, previous_files(outputs)
    files = [outputs.list_file]
    for folder in outputs[:2]:
        files += [folder / MARKER, *(folder / n for n in (*names, *previous.get(folder, ())))]
    return [Planned("--out", out, f) for f in files]


def paste_inputs(split: str, list_file: Path, pairs: Sequence[Pair],
                 objects: Path | None) -> list[Input]:
    """The files a run reads: the split's list, images and labels, the cut-outs' files."""
    inputs = [Input(f"--split {split} list", list_file)]
    inputs += [Input(f"--split {split} {kind}", path) for pair in pairs
               for kind, path in (("image", pair.image), ("label", pair.label))]
    if objects is not None and objects.is_dir():
        inputs += [Input("--objects file", p) for p in sorted(objects.iterdir())
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return inputs


def check_free_id(pairs: Sequence[Pair], anomaly_id: int, allow: bool) -> int:
    """Labels already holding ``anomaly_id``: DatasetError naming the first, or (``allow``)
    their count after an ObsnetWarning."""
    used = [pair for pair in pairs if (read_label(pair.label, pair.source).numpy() == anomaly_id).any()]
    if used and not allow:
        raise DatasetError(f"{used[0].source}: annotation {used[0].label} already holds id "
                           f"{anomaly_id} (--anomaly_id): pasted objects would mix with it; "
                           "choose another --anomaly_id or pass --allow_existing_id")
    if used:
        warnings.warn(f"{len(used)} label map(s) already hold id {anomaly_id}", ObsnetWarning,
                      stacklevel=2)
    return len(used)


def paste_frame(pair: Pair, name: str, config: PasteConfig,
                cutouts: Sequence[Cutout] | None) -> Pasted:
    """Read one pair and paste objects into it (the generator of the output file ``name``)."""
    image = read_image(pair.image, pair.source)
    label = read_label(pair.label, pair.source)
    check_size(image, label, pair)
    return paste_objects(image.permute(1, 2, 0).numpy(), label.numpy(),
                         frame_rng(config.seed, name), config, cutouts)


def save_png(array: np.ndarray, path: Path, what: str) -> None:
    """Write ``array`` as a PNG file; an OutputError naming ``what`` when it cannot be."""
    try:
        Image.fromarray(array).save(path, format="PNG")
    except OSError as exc:
        raise OutputError(f"{what} cannot be written ({exc.strerror or exc}); the previous "
                          f"output is unchanged") from None


def write_aside(outputs: Outputs, pairs: Sequence[Pair], names: Sequence[str],
                config: PasteConfig, cutouts: Sequence[Cutout] | None,
                progress: bool) -> tuple[Path, Path]:
    """Paste every frame into two new temporary folders next to the output folders; returns
    them. On any failure (a bad image, a full disk, a stop) they are removed."""
    temps, out = [], outputs.list_file.parent
    try:
        for folder in outputs[:2]:  # one by one: a failed second one must not leak the first
            temps.append(temp_folder(folder))
        for pair, name in tqdm(list(zip(pairs, names)), desc=f"paste {outputs.image_dir.name}",
                               unit="img", file=sys.stderr, disable=not progress):
            pasted = paste_frame(pair, name, config, cutouts)
            for array, folder, temp in zip(pasted[:2], outputs[:2], temps):
                save_png(array, temp / name, f"--out {out}: {folder.name}/{name}")
    except BaseException:
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    return temps[0], temps[1]


def swap_in(outputs: Outputs, temps: tuple[Path, Path], names: Sequence[str],
            info: dict) -> None:
    """Replace the previous output by the split written aside in ``temps``: its list file goes
    first, then per folder the previous files (listed, with the new ones, in the marker while
    they change), then the new files move in; the list file is written last."""
    previous = previous_files(outputs)
    outputs.list_file.unlink(missing_ok=True)  # from here on the split is incomplete
    for folder, temp in zip(outputs[:2], temps):
        old = previous.get(folder, [])
        folder.mkdir(parents=True, exist_ok=True)
        write_listing(folder / MARKER, [*old, *names], "--out", **info)
        for name in set(old) - set(names):
            (folder / name).unlink(missing_ok=True)
        for name in names:
            os.replace(temp / name, folder / name)
        write_listing(folder / MARKER, names, "--out", **info)
    lines = "".join(f"{outputs.image_dir.name}/{n} {outputs.label_dir.name}/{n}\n" for n in names)
    atomic_write(outputs.list_file, lambda f: f.write(lines.encode()), "--out")


def paste_split(root: Path, split: str, config: PasteConfig, out: Path | None = None,
                objects: Path | None = None, overwrite: bool = False,
                allow_existing_id: bool = False, progress: bool = True,
                suffix: str = DEFAULT_SUFFIX) -> Path:
    """Write the ``{split}_{suffix}`` version of ``root/{split}.txt`` under ``out`` (default
    ``root``), aside first, then swapped in; returns its list file, written last (a run that
    fails or is stopped leaves the previous output as it was)."""
    check_config(config)
    check_suffix(suffix)
    root = Path(root).expanduser().absolute()
    out = root if out is None else Path(out).expanduser().absolute()
    objects = None if objects is None else Path(objects).expanduser()
    list_file, pairs = read_list(root, split)
    names = output_names(pairs)
    cutouts = load_cutouts(objects) if objects is not None else None
    check_free_id(pairs, config.anomaly_id, allow_existing_id)
    outputs = output_paths(out, split, suffix)
    check_outputs_not_inputs(planned_files(outputs, names),
                             paste_inputs(split, list_file, pairs, objects))
    info = {"written_by": PROG, "source": str(list_file),
            "objects": str(objects) if objects else "procedural", "config": asdict(config)}
    with OutputLock([Output("--out", out, folder=True)]):
        check_previous(outputs, names, overwrite)
        temps = write_aside(outputs, pairs, names, config, cutouts, progress)
        try:
            swap_in(outputs, temps, names, info)
        finally:
            for temp in temps:
                shutil.rmtree(temp, ignore_errors=True)
    return outputs.list_file
