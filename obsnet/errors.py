"""The command-line error every layer may raise (a value that cannot work, exit code 2), and
the warning category the command lines print as one line.

A leaf module, so that ``obsnet.outputs`` (imported by the checkpoint module) and the command
lines share it without importing each other."""


class UsageError(Exception):
    """A command-line value that cannot work (exit code 2)."""


class ObsnetWarning(UserWarning):
    """A condition the user should know of that does not stop the run (printed as one line)."""
