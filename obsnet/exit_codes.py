"""One-line errors and exit codes for every command line (main.py, inference.py, export,
paste, the benchmarks): 2 for a usage error, 1 for a runtime error, 128 + the signal number for
a stop; ``--debug`` shows the traceback."""
import argparse
import math
import re
import signal
import sys
import warnings

from obsnet.console import messages_on_stdout
from obsnet.data.errors import DatasetError, WorkerDied
from obsnet.errors import ObsnetWarning, UsageError
from obsnet.models.checkpoint import CheckpointError
from obsnet.signals import Interrupted, signal_name, sigterm_as_interrupt


ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")
RUNTIME_ERRORS = (DatasetError, CheckpointError, FloatingPointError, OSError, ValueError,
                  WorkerDied)


def parse_checked(parser, argv):
    """``parser.parse_args(argv)``, then a UsageError for a NaN or infinite value of any float
    flag (``nan <= 0`` is false, so range checks alone let them through)."""
    args = parser.parse_args(argv)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type is not float or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not math.isfinite(item):
                raise UsageError(f"{action.option_strings[0]} must be a finite number (got {item})")
    return args


def explicit_flags(parser, argv) -> frozenset[str]:
    """The destinations of the flags ``argv`` gives explicitly (parsed again with every
    default suppressed); ``argv`` must already parse."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return frozenset(vars(parser.parse_known_args(argv)[0]))
    finally:
        for action, default in saved:
            action.default = default


# torch's own messages when a worker dies: from its SIGCHLD handler, or when a batch is missing
TORCH_WORKER_DEATH = re.compile(r"DataLoader worker \(pid\(?s?\)? ?([\d, ]+)\) "
                                r"(?:is killed by signal: ([^.]+)|exited unexpectedly)")
SIGNAL_BY_TEXT = {signal.strsignal(s): s for s in signal.Signals if signal.strsignal(s)}


def worker_death(exc: BaseException) -> WorkerDied | None:
    """torch's RuntimeError of a DataLoader worker that died, as a WorkerDied; else None."""
    match = TORCH_WORKER_DEATH.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if match is None:
        return None
    signum = SIGNAL_BY_TEXT.get((match.group(2) or "").strip())
    return WorkerDied(match.group(1).strip(), -signum if signum else None)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    A DataLoader worker's exception is re-raised by PyTorch as "Caught X in DataLoader worker
    process N. Original Traceback ...": its last line "X: message" holds the original cause.
    """
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name = type(exc).__name__
        for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
        return last
    return str(exc)


def run_friendly(program: str, fn, argv) -> int:
    """Call ``fn(argv)``; print known errors as one line (exit 2 usage, 1 runtime,
    128 + signal number for a graceful stop).

    ``--debug`` in ``argv`` re-raises them with their traceback. Our own warnings
    (``ObsnetWarning``) are printed as one line, ``program: warning: ...``, and the library's
    messages (the ``obsnet`` logger) on stdout.
    """
    with warnings.catch_warnings(), sigterm_as_interrupt(), messages_on_stdout():
        if "--debug" not in argv:
            warnings.showwarning = one_line_warnings(program, warnings.showwarning)
        return _run_reporting_errors(program, fn, argv)


def one_line_warnings(program: str, show_other):
    """A ``warnings.showwarning`` that prints ``ObsnetWarning`` as one line and hands the
    others to ``show_other``."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ObsnetWarning):
            print(f"{program}: warning: {message}", file=sys.stderr)
        else:
            show_other(message, category, filename, lineno, file, line)
    return show


def _run_reporting_errors(program: str, fn, argv) -> int:
    try:
        return fn(argv)
    except Interrupted as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return exc.code
    except (UsageError, RuntimeError, *RUNTIME_ERRORS) as exc:
        known = exc if isinstance(exc, (UsageError, *RUNTIME_ERRORS)) else worker_death(exc)
        if known is None or "--debug" in argv:
            raise
        print(f"{program}: error: {ANSI_ESCAPES.sub('', one_line(known))}", file=sys.stderr)
        return 2 if isinstance(known, UsageError) else 1
    except KeyboardInterrupt as exc:
        print(f"{program}: {str(exc) or f'interrupted ({signal_name(signal.SIGINT)})'}",
              file=sys.stderr)
        return getattr(exc, "code", 130)
