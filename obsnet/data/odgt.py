"""``.odgt`` split files of the anomaly-seg datasets (StreetHazards, BDD-Anomaly).

An ``.odgt`` file is either one JSON array on a single line (the anomaly-seg release) or
one JSON object per line (the ADE20K convention); both are read, blank lines skipped. Each
entry holds ``fpath_img`` and ``fpath_segm`` (paths relative to the dataset root; ``width``
and ``height`` are informative). Label files hold the dataset ids + 1: the loader subtracts
1 and maps the raw value 0 to the spec's ignore id.
"""
import json
from pathlib import Path

import torch
from torchvision import tv_tensors

from obsnet.data.base import Pair, PairDataset, numbered_lines, parse_all, require_dir
from obsnet.data.errors import DatasetError
from obsnet.data.specs import DatasetSpec

KEYS = ("fpath_img", "fpath_segm")
Entry = tuple[str, dict]  # ("file:line" or "file:line: entry k", JSON object)


def _line_entries(path: Path, numbered: tuple[int, str]) -> list[Entry]:
    """The entries of one line: one object, or every object of a one-line array."""
    lineno, line = numbered
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{lineno}: invalid JSON: {exc.msg} "
                           f"(column {exc.colno})") from None
    except RecursionError:  # e.g. [[[[...]]]] thousands deep
        raise DatasetError(f"{path}:{lineno}: invalid JSON: nested too deeply (an entry is a "
                           f"JSON object inside at most one array)") from None
    if isinstance(value, dict):
        return [(f"{path}:{lineno}", value)]
    if not isinstance(value, list):
        raise DatasetError(f"{path}:{lineno}: expected a JSON object or array, "
                           f"got {type(value).__name__}")
    return [(f"{path}:{lineno}: entry {k}", item) for k, item in enumerate(value, start=1)]


def _check_entry(entry: Entry) -> Entry:
    """The entry itself, or a DatasetError naming its line and the missing / bad key."""
    where, value = entry
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(value).__name__}")
    for key in KEYS:
        if key not in value:
            raise DatasetError(f"{where}: missing key '{key}'")
        if not isinstance(value[key], str) or not value[key]:
            raise DatasetError(f"{where}: key '{key}' must be a non-empty path string, "
                               f"got {value[key]!r}")
    return entry


def read_odgt(path: Path, problems: list[str] | None = None) -> list[Entry]:
    """Every valid entry of an ``.odgt`` file, each with its "file:line" for messages.

    With ``problems`` a malformed line or entry is recorded there and skipped; otherwise
    it raises a DatasetError naming file and line.
    """
    lines = numbered_lines(path)
    nested = parse_all(lines, lambda item: _line_entries(path, item), problems)
    entries = parse_all([e for group in nested for e in group], _check_entry, problems)
    if not entries:
        raise DatasetError(f"{path}: no usable entry listed")
    return entries


def find_split_file(root: Path, split: str, names: tuple[str, ...]) -> Path:
    """The first of ``names`` present in ``root`` (the order is the preference)."""
    require_dir(root)
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: split file for split '{split}' not found "
                       f"(tried {', '.join(names)})")


def resolve_entry_path(root: Path, bases: tuple[str, ...], field: str) -> Path | None:
    """An odgt path looked up under each of ``root / base`` in turn; None if in none."""
    if Path(field).is_absolute():
        return Path(field) if Path(field).is_file() else None
    for base in bases:
        candidate = root / base / field
        if candidate.is_file():
            return candidate
    return None


def shift_labels(raw: tv_tensors.Mask, spec: DatasetSpec) -> tv_tensors.Mask:
    """Raw values ``v`` -> ids ``v - 1``; the raw 0 -> ``spec.ignore_id`` (255 when None,
    which the id check then rejects). uint8 throughout: ``0 - 1`` wraps, and is replaced."""
    fill = 255 if spec.ignore_id is None else spec.ignore_id
    return tv_tensors.Mask(torch.where(raw == 0, fill, raw - 1).to(torch.uint8))


class OdgtDataset(PairDataset):
    """A dataset listed by ``.odgt`` files; subclasses set the split-file names and bases.

    ``split_files``: split name -> candidate file names, the first present wins (a split
    not in it is looked up as ``{split}.odgt``). ``bases``: folders under ``root`` an odgt
    path is resolved against, in order (``""`` is ``root`` itself).
    """

    split_files: dict[str, tuple[str, ...]] = {}
    bases: tuple[str, ...] = ("",)
    raw_offset = 1

    @classmethod
    def _pair(cls, root: Path, entry: Entry) -> Pair:
        """One checked entry -> a Pair of existing files, or a DatasetError naming its line."""
        where, value = entry
        paths = []
        for kind, key in (("image", "fpath_img"), ("annotation", "fpath_segm")):
            path = resolve_entry_path(root, cls.bases, value[key])
            if path is None:
                looked = ", ".join(str(root / base) for base in cls.bases)
                raise DatasetError(f"{where}: {kind} file not found: {value[key]} "
                                   f"(looked under {looked})")
            paths.append(path)
        return Pair(*paths, where)

    @classmethod
    def read_pairs(cls, root: Path, split: str,
                   problems: list[str] | None = None) -> tuple[Path, list[Pair]]:
        """The split's ``.odgt`` file and its pairs, every listed file existing."""
        names = cls.split_files.get(split, (f"{split}.odgt",))
        odgt = find_split_file(root, split, names)
        entries = read_odgt(odgt, problems)
        return odgt, parse_all(entries, lambda entry: cls._pair(root, entry), problems)

    @classmethod
    def decode(cls, label: tv_tensors.Mask, spec: DatasetSpec) -> tv_tensors.Mask:
        """Raw label values -> ids (subtract 1, raw 0 -> ignore id)."""
        return shift_labels(label, spec)
