"""Pack the CamVid frames the paper scale needs (train and val) small enough to travel with a
checkout: JPEG images and PNG labels in CamVid's layout, under 64 MiB with the objects.

    python -m benchmarks.pack_camvid --camvid ../shared/data/camvid --out data_pack/camvid \\
        --objects ../shared/data/objects

writes ``--out/{train,val}/x.jpg`` (RGB, JPEG ``--quality``, 95), ``--out/{train,val}annot/x.png``
(the label files as they are, or re-encoded as PNG when they are not PNGs), ``train.txt`` and
``val.txt`` (relative ``image annotation`` lines, as the recipe and ``main.py`` read them), and
with ``--objects DIR`` a copy of the cut-outs (images, masks and the folder's README and
licence files: their sources) in ``--objects_out`` (default: ``objects`` next to ``--out``).

The total is checked against ``--limit_mib`` (64: what the device runner carries) before
anything is moved in; over it, nothing is written and a lower ``--quality`` is suggested.
A folder it writes holds a listing (``MARKER``) of every file it wrote: an existing folder is
replaced only with ``--overwrite`` and only when it holds nothing else. Everything is
written aside first (``.NAME.PID.HEX8.tmp``) and moved in at the end.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from obsnet.data.base import read_image, read_label
from obsnet.data.camvid import read_list
from obsnet.data.errors import DatasetError
from obsnet.data.paste import IMAGE_SUFFIXES
from obsnet.errors import UsageError
from obsnet.exit_codes import run_friendly
from obsnet.outputs import atomic_write, temp_folder

MARKER = ".written_by_pack_camvid"
SPLITS = ("train", "val")
SOURCE_NOTES = ("readme", "license", "licence", "copying", "sources", "attribution")
MIB = 2 ** 20


def owned_files(folder: Path) -> set[str] | None:
    """The files (relative paths) a marker in ``folder`` lists; None without a readable marker."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return set(files) if isinstance(files, list) else None


def files_under(folder: Path) -> list[str]:
    """Every file (and link) under ``folder``, as paths relative to it, the marker left out."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MARKER)


def check_replaceable(folder: Path, flag: str, overwrite: bool) -> None:
    """UsageError unless ``folder`` is absent or empty, or was written by this tool, holds only
    what it listed, and ``overwrite`` is given."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: exists and is not a folder")
    listed = owned_files(folder)
    if listed is None:
        raise UsageError(f"{flag} {folder}: exists and has no {MARKER} listing (not written by "
                         f"pack_camvid); choose another {flag}")
    if not overwrite:
        raise UsageError(f"{flag} {folder}: exists (an earlier pack); --overwrite replaces it")
    foreign = [name for name in files_under(folder) if name not in listed]
    if foreign:
        raise UsageError(f"{flag} {folder}: {foreign[0]} was not written by pack_camvid; "
                         f"move it away first (nothing was changed)")


def pack_split(camvid: Path, split: str, out: Path, quality: int) -> list[str]:
    """The frames of ``split`` written into ``out`` (JPEG images, PNG labels) and its list file;
    returns the files written (relative)."""
    _, pairs = read_list(camvid, split)
    (out / split).mkdir()
    (out / f"{split}annot").mkdir()
    lines, names = [], set()
    for pair in tqdm(pairs, desc=f"pack {split}", unit="img", file=sys.stderr):
        stem = pair.image.stem
        if stem in names:
            raise DatasetError(f"{pair.source}: a second frame named {stem} in split {split}")
        names.add(stem)
        image, label = f"{split}/{stem}.jpg", f"{split}annot/{stem}.png"
        Image.fromarray(read_image(pair.image, pair.source).permute(1, 2, 0).numpy()).save(
            out / image, quality=quality)
        if pair.label.suffix.lower() == ".png":
            shutil.copyfile(pair.label, out / label)
        else:
            Image.fromarray(read_label(pair.label, pair.source).numpy()).save(out / label)
        lines.append(f"{image} {label}")
    (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return [f"{split}.txt"] + [name for line in lines for name in line.split()]


def pack_objects(objects: Path, out: Path) -> list[str]:
    """The cut-outs of ``objects`` (images, masks) and its README / licence files, copied."""
    if not objects.is_dir():
        raise UsageError(f"--objects {objects}: not a folder")
    files = [p for p in sorted(objects.iterdir()) if p.is_file() and (
        p.suffix.lower() in IMAGE_SUFFIXES or p.stem.lower().startswith(SOURCE_NOTES))]
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        raise UsageError(f"--objects {objects}: no image in it")
    for path in files:
        shutil.copyfile(path, out / path.name)
    return [p.name for p in files]


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_marker(folder: Path, files: list[str], **info) -> None:
    """The listing of what this tool wrote in ``folder``."""
    text = json.dumps({**info, "files": sorted(files)}, indent=1)
    atomic_write(folder / MARKER, lambda f: f.write(text.encode()), "pack_camvid listing")


def move_in(temp: Path, target: Path) -> None:
    """Replace ``target`` (absent, empty, or an earlier pack: checked) by ``temp``: the old
    pack's listed files are removed first, then its emptied folders."""
    if target.exists():
        for name in owned_files(target) or ():
            (target / name).unlink(missing_ok=True)
        (target / MARKER).unlink(missing_ok=True)
        for folder in sorted((p for p in target.rglob("*") if p.is_dir()), reverse=True):
            folder.rmdir()
        target.rmdir()
    os.replace(temp, target)


def pack(args) -> dict:
    """Check the outputs, write everything aside, check the size, move it in; returns sizes."""
    targets = [("--out", args.out)] + ([("--objects_out", args.objects_out)] if args.objects else [])
    for flag, folder in targets:
        check_replaceable(folder, flag, args.overwrite)
        folder.parent.mkdir(parents=True, exist_ok=True)
    temps = {flag: temp_folder(folder) for flag, folder in targets}
    try:
        written = {"--out": [f for split in SPLITS
                             for f in pack_split(args.camvid, split, temps["--out"], args.quality)]}
        if args.objects:
            written["--objects_out"] = pack_objects(args.objects, temps["--objects_out"])
        sizes = {flag: folder_bytes(temp) for flag, temp in temps.items()}
        if sum(sizes.values()) > args.limit_mib * MIB:
            raise UsageError(f"--out {args.out}: the pack would take {sum(sizes.values()) / MIB:.1f}"
                             f" MiB, over --limit_mib {args.limit_mib:g}; lower --quality "
                             f"(now {args.quality}); nothing was written")
        for flag, folder in targets:
            write_marker(temps[flag], written[flag], quality=args.quality,
                         source=str(args.camvid if flag == "--out" else args.objects))
            move_in(temps[flag], folder)
    finally:
        for temp in temps.values():
            shutil.rmtree(temp, ignore_errors=True)
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The packer's options."""
    p = argparse.ArgumentParser(prog="pack_camvid", description=__doc__.splitlines()[0])
    p.add_argument("--camvid", type=Path, required=True, help="CamVid root (train.txt, val.txt)")
    p.add_argument("--out", type=Path, default=Path("data_pack/camvid"))
    p.add_argument("--objects", type=Path, default=None, help="cut-outs for val_ood_real")
    p.add_argument("--objects_out", type=Path, default=None,
                   help="where the cut-outs go (default: objects next to --out)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality, 1..95 (default 95)")
    p.add_argument("--limit_mib", type=float, default=64.0,
                   help="refuse a pack larger than this (default 64, the device runner's carry)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier pack")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(argv) -> int:
    """Parse, check and pack; prints the sizes."""
    args = build_parser().parse_args(argv)
    if not 1 <= args.quality <= 95:
        raise UsageError(f"--quality must be in 1..95 (got {args.quality})")
    args.out = args.out.expanduser().absolute()
    args.objects_out = (args.objects_out or args.out.parent / "objects").expanduser().absolute()
    sizes = pack(args)
    print(f"pack_camvid: wrote {args.out}" + (f" and {args.objects_out}" if args.objects else "")
          + ": " + ", ".join(f"{flag} {size / MIB:.1f} MiB" for flag, size in sizes.items())
          + f", {sum(sizes.values()) / MIB:.1f} MiB in all")
    return 0


def main(argv=None) -> int:
    """Entry point: one-line errors (``pack_camvid: error: ...``)."""
    return run_friendly("pack_camvid", run, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
