"""The base class of errors caused by input: a recipe, a path, a checkpoint, a data file.

The command line prints these as one message, without a traceback, and exits with status 2.
"""


class UserError(Exception):
    """Input that cannot be used; the message says what is wrong and what to do."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or run directory that is missing, incomplete, or made for a different model."""
