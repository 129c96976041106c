"""Command-line plumbing shared by main.py and inference.py: one-line errors, exit codes."""
import sys

from Dataset.errors import DatasetError
from Models.load_net import CheckpointError


class UsageError(Exception):
    """A command-line value that cannot work (exit code 2)."""


RUNTIME_ERRORS = (DatasetError, CheckpointError, FloatingPointError, OSError, ValueError)


def run_friendly(program: str, fn, argv) -> int:
    """Call ``fn(argv)``; print known errors as one line (exit 2 usage, 1 runtime).

    ``--debug`` in ``argv`` re-raises them with their traceback.
    """
    try:
        return fn(argv)
    except (UsageError, *RUNTIME_ERRORS) as exc:
        if "--debug" in argv:
            raise
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
