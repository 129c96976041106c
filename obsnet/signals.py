"""Graceful stops on SIGINT / SIGTERM: the training loops' stop flag, SIGTERM handled as
Ctrl-C elsewhere, and the exceptions that carry the exit code (128 + the signal number)."""
import contextlib
import os
import signal
import threading


class Interrupted(Exception):
    """Training stopped by a signal at a consistent point; ``code`` is 128 + the signal
    number (130 for SIGINT, 143 for SIGTERM) and the message says what can be resumed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.code = 128 + int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loops, handled as Ctrl-C is: a KeyboardInterrupt (every
    ``finally`` runs: temporary files and locks are removed), exit code 143."""

    def __init__(self):
        super().__init__(f"interrupted ({signal_name(signal.SIGTERM)})")
        self.code = 128 + int(signal.SIGTERM)


class SecondSignal(KeyboardInterrupt):
    """A second SIGINT / SIGTERM while a graceful stop was pending: stop at once, exit code
    128 + that signal's number (a KeyboardInterrupt, so that no ``except Exception`` holds it)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted again ({signal_name(signum)}) while stopping: stopped at "
                         f"once, nothing saved from the current epoch")
        self.code = 128 + int(signum)


class StopSignal:
    """Context manager: SIGINT and SIGTERM only set a flag (``signum``), which the training
    loops check after each optimizer step; nothing is saved from the handler itself.

    A second signal while the flag is set stops at once (SecondSignal, exit code 128 + the
    second signal's number: 130 for SIGINT, 143 for SIGTERM).
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
            raise SecondSignal(signum)
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


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within: SIGTERM raises ``Terminated`` in the main thread, as SIGINT raises
    KeyboardInterrupt (the training loops' ``StopSignal`` overrides it while they run).

    Nothing changes outside the main thread or where SIGTERM was not at its default (e.g.
    ignored by the caller). A process forked meanwhile (a worker that did not set its own
    handler) dies of the signal as before: only this process raises.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:  # a forked child: the default action, death by the signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
