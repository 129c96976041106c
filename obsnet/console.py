"""Library messages go to the ``obsnet`` logger (``logging.getLogger(__name__)`` in each
module); a program that imports the package decides where they go. The command lines show
them on stdout, one line each, without breaking the progress bars."""
import contextlib
import logging
import sys

from tqdm import tqdm

LOGGER = logging.getLogger("obsnet")


class TqdmHandler(logging.Handler):
    """Writes each record on stdout above the progress bars (``tqdm.write``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)


@contextlib.contextmanager
def messages_on_stdout():
    """Within: the ``obsnet`` logger's INFO messages and above are printed on stdout, unless
    the program already gave the logger a handler of its own."""
    if LOGGER.handlers:
        yield
        return
    handler, level = TqdmHandler(), LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
