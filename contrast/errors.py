"""The base class of errors caused by input: a recipe, a path, a checkpoint, a data file.

The command line prints these as one message, without a traceback, and exits with status 2.
"""


class UserError(Exception):
    """Input that cannot be used; the message says what is wrong and what to do."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or run directory that is missing, incomplete, or made for a different model."""


def unpickling_problem(e: BaseException) -> str:
    """What a ``torch.load(..., weights_only=True)`` refusal found, in one line (without torch's advice to load the
    file unsafely)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__
