"""Helpers shared by the command groups: device names and turning library errors into one-line messages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from PIL import UnidentifiedImageError

from contrast.errors import UserError


def device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; any other name as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Errors that describe bad input (a data file, a task file, an index, a checkpoint) surface from the library as
    ValueError; the command line prints them as one message instead of a traceback."""
    try:
        yield
    except UnidentifiedImageError as e:
        raise UserError(f"{e}; pass an image file (PNG, JPEG, ...)") from e
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from e
