"""The one error type of the data pipeline."""


class DatasetError(ValueError):
    """A dataset folder, list file or image pair that cannot be used, in one line.

    The message names the offending file (and the line number for list files) and what is
    wrong with it, so a user can fix the data without reading a traceback.
    """
