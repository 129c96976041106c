"""The command-line error every layer may raise: a value that cannot work (exit code 2).

A leaf module, so that ``obsnet.outputs`` (imported by the checkpoint module) and the command
lines share it without importing each other."""


class UsageError(Exception):
    """A command-line value that cannot work (exit code 2)."""
