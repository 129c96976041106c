"""The error types of the data pipeline."""
import signal


class DatasetError(ValueError):
    """A dataset folder, list file or image pair that cannot be used, in one line.

    The message names the offending file (and the line number for list files) and what is
    wrong with it, so a user can fix the data without reading a traceback.
    """


class WorkerDied(RuntimeError):
    """A DataLoader worker process died: ``exitcode`` as multiprocessing gives it (``-N``:
    killed by signal N, e.g. SIGKILL from the out-of-memory killer), None when unknown."""

    def __init__(self, pid, exitcode: int | None):
        if exitcode is not None and exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-exitcode}"
        else:
            how = "exited unexpectedly" + ("" if exitcode is None else f" (exit code {exitcode})")
        super().__init__(f"data loading worker (pid {pid}) {how}, often the out-of-memory killer's "
                         f"doing; try fewer --num_workers or a smaller --bsize")
