"""Which files a run may write: never one of its inputs, and, in a folder it shares with the
user, only those it wrote there.

- ``check_outputs_not_inputs``: the files a run will write (``Planned``) against the files it
  reads (``Input``): one that is, or would replace, an input is refused in one line, whatever
  --overwrite says.
- ``listed_files`` / ``write_listing`` / ``unlisted``: the marker a tool keeps in a folder it
  shares with the user, listing the files it wrote there (only those may be replaced).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from obsnet.errors import UsageError
from obsnet.outputs import atomic_write


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Input:
    """A file a run reads: ``flag`` says where it comes from (``--segnet_file``, or
    ``--img_folder image`` for one file of a folder), ``path`` is the file."""

    flag: str
    path: Path


@dataclass(frozen=True)
class Planned:
    """A file a run will write: ``flag`` ``where`` is the location that names it (the file
    itself, or the folder it goes into), ``path`` the file."""

    flag: str
    where: Path
    path: Path


def planned_in(flag: str, folder, names) -> list[Planned]:
    """The files ``names`` a run writes into the folder ``folder`` of ``flag``."""
    folder = Path(folder)
    return [Planned(flag, folder, folder / name) for name in names]


def _resolved(path: Path) -> Path:
    """``path`` made absolute with every symbolic link of its existing part followed."""
    return Path(os.path.abspath(path.expanduser())).resolve()


def _inode(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file (links followed), else None."""
    try:
        stat = path.stat()
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino


def same_file(a, b) -> bool:
    """Whether the paths ``a`` and ``b`` name one file or folder: equal once resolved, or
    ``os.path.samefile`` (hard links, symbolic links)."""
    a, b = Path(a), Path(b)
    if _resolved(a) == _resolved(b):
        return True
    inode = _inode(a)
    return inode is not None and inode == _inode(b)


def _replaces(planned: Planned, read: Input) -> UsageError:
    """The one-line refusal of an output that is, or would replace, an input."""
    if planned.path == planned.where:
        what = ""
    elif planned.path.is_relative_to(planned.where):
        what = f"{planned.path.relative_to(planned.where)} there "
    else:  # a file named after it (e.g. the .last.pth next to --segnet_file)
        what = f"{planned.path} "
    advice = (f"choose another {planned.flag}" if planned.flag != read.flag
              else f"{planned.path} must be a file of its own")
    return UsageError(f"{planned.flag} {planned.where}: {what}would replace {read.flag} "
                      f"{read.path}, an input of this run; {advice}")


def check_outputs_not_inputs(planned, inputs) -> None:
    """UsageError (one line, naming both flags and paths) when a file the run will write is,
    or would replace, one of its ``inputs``: the same path once resolved, or the same file
    (``same_file``). No flag allows it: --overwrite replaces earlier outputs, never inputs."""
    by_path, by_inode = {}, {}
    for read in inputs:
        by_path.setdefault(_resolved(read.path), read)
        inode = _inode(read.path)
        if inode is not None:
            by_inode.setdefault(inode, read)
    for output in planned:
        read = by_path.get(_resolved(output.path))
        if read is None:
            inode = _inode(output.path)
            read = by_inode.get(inode) if inode is not None else None
        if read is not None:
            raise _replaces(output, read)


# ----------------------------------------------------------------------------- shared folders

def listed_files(marker: Path) -> list[str] | None:
    """The file names a tool's marker file lists (JSON ``{"files": [...]}``): what it wrote in
    the marker's folder. None when there is no marker or it cannot be read as one. Only plain
    names are kept: a hand-edited marker must not reach outside the folder."""
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(files, list):
        return None
    return [f for f in files if isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..")]


def write_listing(marker: Path, files, label: str, **info) -> None:
    """Write the marker ``marker`` (atomically): ``info`` and the sorted names ``files``."""
    text = json.dumps({**info, "files": sorted(set(files))}, indent=1)
    atomic_write(marker, lambda f: f.write(text.encode()), label)


def exists(path: Path) -> bool:
    """Whether anything is at ``path``: a file, a folder, or a link (even a broken one)."""
    return path.exists() or path.is_symlink()


def unlisted(folder: Path, names, listed) -> list[str]:
    """The ``names`` already in ``folder`` that ``listed`` (a marker's list) does not hold:
    files a run would replace that it did not write."""
    listed = set(listed)
    return [name for name in names if name not in listed and exists(folder / name)]
