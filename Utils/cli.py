"""Command-line plumbing shared by main.py and inference.py: one-line errors, exit codes,
and graceful stops on SIGINT / SIGTERM."""
import re
import signal
import sys
import threading

from Dataset.errors import DatasetError
from Models.load_net import CheckpointError


ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")


class UsageError(Exception):
    """A command-line value that cannot work (exit code 2)."""


class Interrupted(Exception):
    """Training stopped by a signal at a consistent point; ``code`` is 128 + the signal
    number (130 for SIGINT, 143 for SIGTERM) and the message says what can be resumed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + int(signum)


RUNTIME_ERRORS = (DatasetError, CheckpointError, FloatingPointError, OSError, ValueError)


class StopSignal:
    """Context manager: SIGINT and SIGTERM only set a flag (``signum``), which the training
    loops check after each optimizer step; nothing is saved from the handler itself.

    A second signal while the flag is set stops at once (KeyboardInterrupt, exit code 130).
    Outside the main thread (where handlers cannot be installed) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def signal_name(signum: int) -> str:
    """"SIGTERM" for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


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

    ``--debug`` in ``argv`` re-raises them with their traceback.
    """
    try:
        return fn(argv)
    except Interrupted as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return exc.code
    except (UsageError, *RUNTIME_ERRORS) as exc:
        if "--debug" in argv:
            raise
        print(f"{program}: error: {ANSI_ESCAPES.sub('', one_line(exc))}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
