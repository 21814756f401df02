"""The one image decoder and caption cleaner used by every command that reads samples.

Failures raise :class:`BadSample` with a ``cause`` from :data:`CAUSES`; callers skip and count them (or, with
``data.strict``, stop naming the sample). :class:`Skips` counts them by cause; :class:`SampleReader` bundles the
decode settings, the counting and the strict rule for a command that reads a collection.

What :func:`load_image` does, in order:

1. open without decoding pixels (a path is read into memory, so no file handle outlives the call);
2. check ``width * height`` against ``max_pixels`` before any pixel is decoded (Pillow's decompression-bomb warning
   is held back around open and decode, its limit raised for the call when ``max_pixels`` is larger, and its error,
   which some formats raise for a frame or sub-image, counted as too_large);
3. for a JPEG and ``draft``, decode at 1/2, 1/4 or 1/8 scale while the short side stays at least ``draft``;
4. decode, apply the EXIF orientation and convert to RGB: alpha (RGBA, LA, PA, a palette or greyscale with a
   transparent colour) is composited on white; 16-bit greyscale is scaled by 255/65535; 32-bit integer greyscale
   outside 0..65535 and float greyscale outside 0..1 are scaled from their own min..max (float in 0..1 by 255);
   palette, CMYK, YCbCr and 1-bit images go through Pillow's conversion; an animated image gives its first frame.

Pillow's global settings (``ImageFile.LOAD_TRUNCATED_IMAGES``, ``Image.MAX_IMAGE_PIXELS``) are read, never left
changed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from contrast.errors import UserError

log = logging.getLogger(__name__)

# why a sample was skipped (or, for caption_fixed, repaired); counted per cause in this order. New causes go at the
# end: training checkpoints store counts by position.
CAUSES = ("missing", "not_a_file", "empty_file", "not_an_image", "truncated", "corrupt", "too_large",
          "no_caption", "empty_caption", "caption_fixed", "unreadable", "unsupported", "bad_label")
REPAIRED = "caption_fixed"  # the one cause that repairs a sample instead of skipping it
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (a 0.25 GB RGBA image)

WHITE = (255, 255, 255)
ORIENTATION = 0x0112  # the EXIF orientation tag
# leading bytes of the formats Pillow reads -> its format name; data that starts like an image but cannot be
# identified is damaged (truncated or corrupt), anything else is not an image at all
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WEBP"), (b"\x00\x00\x01\x00", "ICO"))


class BadSample(Exception):
    """A sample that cannot be used; ``cause`` is one of :data:`CAUSES`."""

    def __init__(self, cause: str, detail: str):
        super().__init__(f"{cause}: {detail}")
        self.cause, self.detail = cause, detail


class StrictDataError(UserError, ValueError):
    """A bad sample met with ``data.strict: true``."""


# --------------------------------------------------------------------------------------------------- images


def load_image(value: Any, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft: int | Callable[[tuple[int, int]], tuple[int, int]] | None = None) -> Image.Image:
    """A PIL image, bytes, a ``{'bytes', 'path'}`` cell or a path -> an RGB image; :class:`BadSample` if unusable.

    ``draft`` lets a JPEG decode at 1/2 to 1/8 scale: an int is the short side the result keeps at least; a function
    gets the upright full size ``(w, h)`` and returns the upright size the result must keep at least (a crop that is
    resized afterwards needs fewer pixels than the whole image)."""
    data = None if isinstance(value, Image.Image) else _bytes_of(value)
    with _pillow_limits(max_pixels):
        try:
            img = value if data is None else _open(data)
            w, h = img.size
            if w * h > max_pixels:
                raise BadSample("too_large", f"{w}x{h} pixels, more than data.max_image_pixels = {max_pixels}")
            if draft and data is not None and img.format == "JPEG":  # (never resize a caller's own image)
                img.draft(None, _draft_request(img, draft))  # the largest scale-down keeping at least that size
            img.load()
            img = _first_frame(img)
        except BadSample:
            raise
        except Exception as e:  # noqa: BLE001 - decoders raise anything (OSError, SyntaxError, struct.error, ...)
            raise _classify(e, max_pixels) from e
    return to_rgb(img)


def _draft_request(img: Image.Image, draft: int | Callable[[tuple[int, int]], tuple[int, int]]) -> tuple[int, int]:
    """The stored-orientation size a JPEG must keep for ``draft`` (see :func:`load_image`)."""
    if not callable(draft):
        return int(draft), int(draft)
    w, h = img.size
    try:
        turned = img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)  # stored on its side: width and height swap
    except Exception:  # noqa: BLE001 - a damaged EXIF block: _upright keeps the pixels as stored too
        turned = False
    rw, rh = draft((h, w) if turned else (w, h))
    return (int(rh), int(rw)) if turned else (int(rw), int(rh))


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise _unidentified(data) from e


def _bytes_of(value: Any) -> bytes:
    """The encoded bytes of a cell; :class:`BadSample` for nothing, an empty file, a missing path or a folder."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, Mapping):
        if value.get("bytes") is not None:
            data = bytes(value["bytes"])
        elif value.get("path"):
            return _read(value["path"])
        else:
            raise BadSample("missing", "the image cell holds neither bytes nor a path")
    elif isinstance(value, str | os.PathLike):
        return _read(value)
    elif value is None:
        raise BadSample("missing", "no image")
    else:
        raise BadSample("not_an_image", f"an image cell cannot be a {type(value).__name__}")
    if not data:
        raise BadSample("empty_file", "zero bytes")
    return data


def _read(path: str | os.PathLike) -> bytes:
    p = Path(path)
    try:
        if p.is_dir():
            raise BadSample("not_a_file", f"{p} is a directory")
        data = p.read_bytes()
    except FileNotFoundError:
        raise BadSample("missing", f"{p} does not exist") from None
    except OSError as e:
        raise BadSample("unreadable", f"{p}: {e.strerror or e}") from None
    if not data:
        raise BadSample("empty_file", f"{p} has zero bytes")
    return data


@contextlib.contextmanager
def _pillow_limits(max_pixels: int) -> Iterator[None]:
    """Around open and decode: Pillow's decompression-bomb warning held back (our own check follows the open), and
    its limit raised to ``max_pixels`` when that is larger; restored after."""
    old = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if old is not None and max_pixels > old:
                Image.MAX_IMAGE_PIXELS = max_pixels
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _unidentified(data: bytes) -> BadSample:
    """Why Pillow could not identify ``data``: not an image at all, or an image format with a damaged header."""
    fmt = next((f for magic, f in _MAGIC if data.startswith(magic)), None)
    if fmt is None or (fmt == "WEBP" and data[8:12] != b"WEBP"):
        head = data[:16].decode("ascii", "replace").strip()
        return BadSample("not_an_image", f"not a format Pillow reads (it begins {head!r})")
    if len(data) < 64:
        return BadSample("truncated", f"a {fmt} file of only {len(data)} bytes")
    Image.init()
    try:  # the format's own reader tells the reason that Pillow's open, trying every format, hides
        Image.OPEN[fmt][0](io.BytesIO(data), None)
    except Exception as e:  # noqa: BLE001
        return _classify(e)
    return BadSample("corrupt", f"begins like a {fmt} file but Pillow cannot read it")


def _classify(e: BaseException, max_pixels: int | None = None) -> BadSample:
    """A decoder's exception as a cause: truncated when the data ran out, too_large, else corrupt."""
    if isinstance(e, BadSample):
        return e
    if isinstance(e, Image.DecompressionBombError):  # Pillow's own check, inside a frame or a sub-image
        size = re.search(r"\((\d+) pixels\)", str(e))
        return BadSample("too_large", f"{size.group(1) if size else 'too many'} pixels, more than "
                                      f"data.max_image_pixels = {max_pixels}")
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError):
        return BadSample("too_large", text)
    ran_out = isinstance(e, EOFError) or isinstance(e.__cause__, EOFError | struct.error)
    if ran_out or any(w in str(e).lower() for w in ("truncated", "incomplete")):
        return BadSample("truncated", text)
    return BadSample("corrupt", text)


def _first_frame(img: Image.Image) -> Image.Image:
    if getattr(img, "n_frames", 1) > 1 and img.tell() != 0:
        img.seek(0)
        img.load()
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """A loaded image -> RGB, upright (EXIF orientation), alpha on white, high bit depths scaled (see module doc)."""
    img = _upright(img)
    mode = img.mode
    try:
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            return _scale_grey(img).convert("RGB")
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
        return img if mode == "RGB" else img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadSample("unsupported", f"cannot convert a {mode} image to RGB ({e})") from e


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (unchanged, not copied, when it has none or it is damaged)."""
    try:
        if img.getexif().get(ORIENTATION, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: keep the pixels as stored
        return img


def _scale_grey(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale -> 8-bit L, scaled rather than clipped."""
    import numpy as np

    a = np.asarray(img).astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        a = a * (255.0 / 65535.0)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))
    else:
        a = np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


# --------------------------------------------------------------------------------------------------- captions

# control characters other than whitespace (\t \n \r \v \f), lone surrogates, and U+FFFD from an earlier repair
_NEEDS_FIX = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def clean_caption(value: Any) -> tuple[str, str | None]:
    """``(text, note)``: the caption stripped; ``note`` is ``caption_fixed`` when it had to be repaired.

    Lone UTF-16 surrogates (text that cannot be written as UTF-8) become U+FFFD (a valid surrogate pair is joined
    into its character); control characters other than whitespace become spaces. A caption that already holds
    U+FFFD (replaced upstream, when its bytes were decoded) counts as repaired too.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise BadSample("no_caption", "no caption")
    if not isinstance(value, str):
        raise BadSample("no_caption", f"caption is a {type(value).__name__}, not text")
    note = None
    if _NEEDS_FIX.search(value):
        note = REPAIRED
        if any("\ud800" <= c <= "\udfff" for c in value):
            value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        value = _CONTROL.sub(" ", value)
    text = value.strip()
    if not text:
        raise BadSample("empty_caption", "empty caption" if note is None else "caption of control characters only")
    return text, note


def clean_label(value: Any) -> Any:
    """A class label as given (an integer, or text stripped); :class:`BadSample` ``bad_label`` when it is missing,
    empty, or text that had to be repaired (it cannot name a class)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        text, note = clean_caption(value)
    except BadSample as e:
        raise BadSample("bad_label", e.detail.replace("caption", "label")) from None
    if note is not None:
        raise BadSample("bad_label", f"label {text!r} held undecodable or control characters")
    return text


# --------------------------------------------------------------------------------------------------- counting


class Skips:
    """Samples skipped (or repaired), counted by cause; with the first sample seen of each cause."""

    def __init__(self, counts: Mapping[str, int] | None = None):
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}
        if counts:
            self.merge(counts)

    def add(self, cause: str, n: int = 1, where: str | None = None) -> None:
        if cause not in CAUSES:
            raise ValueError(f"unknown skip cause {cause!r}; one of {CAUSES}")
        self.counts[cause] = self.counts.get(cause, 0) + int(n)
        if where is not None:
            self.first.setdefault(cause, where)

    def merge(self, other: Skips | Mapping[str, int]) -> Skips:
        """Add ``other``'s counts (a :class:`Skips` or a ``{cause: n}`` mapping) to these; returns self."""
        counts = other.counts if isinstance(other, Skips) else other
        for cause, n in counts.items():
            if n:
                self.add(cause, n)
        if isinstance(other, Skips):
            for cause, where in other.first.items():
                self.first.setdefault(cause, where)
        return self

    def as_dict(self) -> dict[str, int]:
        """``{cause: n}`` of the causes seen, in the order of :data:`CAUSES`."""
        return {c: self.counts[c] for c in CAUSES if self.counts.get(c)}

    @property
    def total(self) -> int:
        """Samples skipped (repaired captions are used, so they are not counted here)."""
        return sum(n for c, n in self.counts.items() if c != REPAIRED)

    @property
    def repaired(self) -> int:
        return self.counts.get(REPAIRED, 0)

    def __bool__(self) -> bool:
        return bool(self.as_dict())

    def summary(self) -> str:
        """One line, e.g. ``skipped 3 samples: 2 truncated, 1 missing``."""
        counts = self.as_dict()
        parts = [f"{n} {c}" for c, n in counts.items() if c != REPAIRED]
        total = self.total
        line = f"skipped {total} sample{'s' if total != 1 else ''}" + (": " + ", ".join(parts) if parts else "")
        if self.repaired:
            line += f"; repaired {self.repaired} caption{'s' if self.repaired != 1 else ''} (caption_fixed)"
        return line


class SampleReader:
    """Decodes images and cleans captions / labels for one command, counting what it skips in ``skips``.

    ``strict`` (``data.strict``) turns the first bad sample into a one-line :class:`StrictDataError` naming it.
    ``draft`` is passed to :func:`load_image` (a transform's ``decode_size``; None decodes at full size).
    """

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False, draft: int | None = None,
                 skips: Skips | None = None):
        self.max_pixels, self.strict, self.draft = max_pixels, strict, draft
        self.skips = skips if skips is not None else Skips()
        self.first_error: tuple[str, BadSample] | None = None  # (where, error) of the first sample skipped

    @classmethod
    def of(cls, data_cfg: Any, draft: int | None = None) -> SampleReader:
        """A reader with a data config's ``max_image_pixels`` and ``strict``."""
        return cls(data_cfg.max_image_pixels, data_cfg.strict, draft)

    def bad(self, error: BadSample, where: str) -> None:
        """Count ``error`` for the sample ``where`` (or stop, when strict)."""
        if self.strict:
            raise StrictDataError(f"{where} is unusable ({error.cause}: {error.detail}); fix or remove it, or set "
                                  "data.strict false to skip such samples")
        if self.skips.total + self.skips.repaired < 5:
            log.warning("skipping %s: %s", where, error)
        self.skips.add(error.cause, where=where)
        if self.first_error is None:
            self.first_error = (where, error)

    def image(self, value: Any, where: str) -> Image.Image | None:
        """The RGB image of ``value``, or None (counted) when it cannot be used."""
        try:
            return load_image(value, self.max_pixels, self.draft)
        except BadSample as e:
            self.bad(e, where)
            return None

    def caption(self, value: Any, where: str) -> str | None:
        """The cleaned caption, or None (counted) when there is none; a repaired caption is counted and returned."""
        try:
            text, note = clean_caption(value)
        except BadSample as e:
            self.bad(e, where)
            return None
        if note is not None:
            self.repaired(note, text, where)
        return text

    def repaired(self, note: str, text: str, where: str) -> None:
        """Count a caption that had to be repaired (kept); with ``strict``, stop on it like on a bad sample."""
        if self.strict:
            self.bad(BadSample(note, f"caption {text!r} held undecodable or control characters"), where)
        self.skips.add(note, where=where)

    def label(self, value: Any, where: str) -> Any:
        """The label (see :func:`clean_label`), or None (counted) when it cannot name a class."""
        try:
            return clean_label(value)
        except BadSample as e:
            self.bad(e, where)
            return None


def describe_cell(value: Any, row: int | None = None) -> str:
    """How a message names a sample: its row and, when known, its file."""
    path = value.get("path") if isinstance(value, Mapping) else value if isinstance(value, str | os.PathLike) else None
    if path is None:
        path = getattr(value, "filename", None) or None
    if row is None:
        return str(path) if path else "sample"
    return f"row {row} ({path})" if path else f"row {row}"
