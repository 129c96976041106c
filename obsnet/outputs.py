"""Where runs write: atomic file writes, output locations probed and locked at start.

Building blocks, each defined once:

- ``atomic_write``: every checkpoint, config and results file goes through a temporary
  file next to the target (created with the process's umask), fsynced, then ``os.replace``d;
  a failed write (full disk, permissions) is one line naming the flag and the path and leaves
  the previous file intact. Temporary files left by a killed save are removed at the next save
  of the same target (only names of our own pattern whose writer is gone).
- ``Output``: one output location of a run (the flag that names it, its path, a folder or a
  file) and ``probe`` it at start: created if missing, refused with one line when it cannot be
  written.
- ``OutputLock``: a run's exclusive claim on its outputs: a lock file holding the PID,
  created with O_EXCL, refused while its holder lives, taken over when the holder is gone,
  removed at exit.
- ``temp_folder``: a folder next to an output where a run writes before swapping it in.

Which files a run may write at all (never an input; in a folder it shares with the user, only
those it wrote) is ``obsnet.ownership``.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from obsnet.errors import UsageError


class OutputError(OSError):
    """An output location that cannot be written, as one line naming the flag and the path
    (an OSError: exit code 1)."""


def _reason(exc: OSError) -> str:
    """"Permission denied" for a PermissionError, and so on (without the path)."""
    return exc.strerror or str(exc) or type(exc).__name__


def _name(label, path) -> str:
    return f"{label} {path}" if label else str(path)


# ----------------------------------------------------------------------------- processes

def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs (and, when ``start`` is given and known, is the same
    process that started then, not a later one that reused the PID)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    current = _start_time(pid)
    return start is None or current is None or current == start


def _owner_tag() -> str:
    """What a lock file holds: this PID, then its start time (empty when unknown)."""
    return f"{os.getpid()}\n{_start_time(os.getpid()) or ''}\n"


# ----------------------------------------------------------------------------- atomic writes

def temp_pattern(target: Path) -> re.Pattern:
    """Names of the temporary files of a save of ``target``: ``.NAME.PID.HEX8.tmp``, and
    ``.NAME.XXXXXXXX.tmp`` (tempfile.mkstemp's, written by earlier versions)."""
    name = re.escape(target.name)
    return re.compile(rf"^\.{name}\.(?:(?P<pid>\d+)\.[0-9a-f]{{8}}|[a-z0-9_]{{8}})\.tmp$")


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temporary files of earlier saves of ``target`` whose writer is gone (a save
    killed before its rename), and the temporary folders (``temp_folder``) of killed runs;
    returns them. Other files are never touched."""
    pattern, removed = temp_pattern(target), []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        folder = entry.is_dir() and not entry.is_symlink()
        if match is None or not (entry.is_file() or (folder and match["pid"])):
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if pid is not None and (pid == os.getpid() or alive(pid)):
            continue
        if folder:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _temp_name(target: Path) -> Path:
    """A fresh name of this process's pattern for a temporary file or folder next to ``target``."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new temporary file next to ``target``, mode 0666 less the umask (as ``open``)."""
    while True:
        tmp = _temp_name(target)
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def temp_folder(target: Path) -> Path:
    """A new empty folder next to the folder ``target`` (``.NAME.PID.HEX8.tmp``), where a run
    writes its output aside before moving it in; those of killed runs are removed first."""
    remove_stale_temps(target)
    while True:
        tmp = _temp_name(target)
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


class Sink:
    """The file a save writes through. It keeps the first OSError of a write: torch.save
    reports a failed write (e.g. a full disk) as an unrelated RuntimeError."""

    def __init__(self, file, target: Path):
        self.file, self.target, self.error = file, target, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, label: str | None = None) -> None:
    """Write ``path`` through ``write(sink)`` (bytes) into a temporary file next to it, fsync
    it, then rename it over ``path``. An OSError is an ``OutputError`` naming ``label`` (the
    flag) and the path; the previous file, if any, is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp, fd = _create_temp(path)
        try:
            with os.fdopen(fd, "wb") as f:
                sink = Sink(f, path)
                try:
                    write(sink)
                except Exception:
                    if sink.error is not None:
                        raise sink.error from None
                    raise
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        kept = "; the previous file is unchanged" if path.is_file() else ""
        raise OutputError(f"{_name(label, path)}: cannot be written ({_reason(exc)}){kept}") from None
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- locations

@dataclass(frozen=True)
class Output:
    """An output location of a run: the flag naming it, its path, a folder or a file."""

    flag: str
    path: Path
    folder: bool

    @property
    def directory(self) -> Path:
        """The folder the run writes into."""
        return self.path if self.folder else self.path.parent

    @property
    def lock_file(self) -> Path:
        """``FOLDER/.obsnet.lock`` or ``.FILE.lock`` next to the file."""
        return self.path / ".obsnet.lock" if self.folder else self.path.with_name(f".{self.path.name}.lock")

    def fail(self, reason: str) -> OutputError:
        """The one-line error of this location."""
        return OutputError(f"{self.flag} {self.path}: cannot be written ({reason})")


def probe(output: Output) -> None:
    """Create ``output``'s folder if missing; an ``OutputError`` when it is of the wrong kind
    or cannot be created (whether files can be created in it is tested by the lock)."""
    if output.folder and output.path.exists() and not output.path.is_dir():
        raise output.fail("it is a file; a folder is needed")
    if not output.folder and output.path.is_dir():
        raise output.fail("it is a folder; a file name is needed")
    try:
        output.directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = _reason(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.errno == errno.ENOTDIR:
            reason = "a part of the path is a file, not a folder"
        raise output.fail(reason) from None


# ----------------------------------------------------------------------------- the lock

def _holder(lock_file: Path) -> tuple[int, str | None] | None:
    """(PID, start time) written in a lock file; None when it cannot be read as one."""
    try:
        lines = lock_file.read_text().splitlines()
        return int(lines[0]), (lines[1] if len(lines) > 1 and lines[1] else None)
    except (OSError, ValueError, IndexError):
        return None


def _age(path: Path) -> float:
    """Seconds since ``path`` was last modified (infinite when it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


class OutputLock:
    """Context manager: probe and lock every output location (rank 0 of a run only).

    A second run with a live holder is refused with one line naming its PID; a lock whose
    holder is gone (killed, machine restarted) is taken over. Locks are removed on exit,
    also after an error or a stop signal, and only while they still hold this process.
    """

    def __init__(self, outputs):
        unique = {o.lock_file.resolve(): o for o in outputs}  # one lock per location
        self.outputs, self.held = list(unique.values()), []

    def acquire(self) -> "OutputLock":
        """Probe and lock every location (all or none)."""
        try:
            for output in self.outputs:
                probe(output)
                self._acquire(output)
        except BaseException:
            self.release()
            raise
        return self

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self, output: Output) -> None:
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(output.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale(output)
                continue
            except OSError as exc:
                raise output.fail(_reason(exc)) from None
            with os.fdopen(fd, "w") as f:
                f.write(_owner_tag())
            self.held.append(output.lock_file)
            return
        raise self._busy(output)

    def _take_over_if_stale(self, output: Output) -> None:
        """Remove the lock file when its holder is gone; raise when it lives."""
        holder = _holder(output.lock_file)
        if holder is not None and alive(*holder):
            raise self._busy(output, holder[0])
        if holder is None and _age(output.lock_file) < 10:  # being written this instant
            raise self._busy(output)
        output.lock_file.unlink(missing_ok=True)

    @staticmethod
    def _busy(output: Output, pid: int | None = None):
        who = f"another run (PID {pid})" if pid else "another run"
        return UsageError(f"{output.flag} {output.path}: in use by {who}, which holds "
                          f"{output.lock_file}; wait for it to end or choose another {output.flag}")

    def release(self) -> None:
        """Remove the lock files this process holds."""
        for lock_file in self.held:
            if _holder(lock_file) == (os.getpid(), _start_time(os.getpid())):
                lock_file.unlink(missing_ok=True)
        self.held = []
