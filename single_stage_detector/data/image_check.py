"""Cheap checks of image files against their annotation entries, shared by every reader.

Both input pipelines (PyTorch DataLoader and DALI) and ``scripts/verify_dataset.py`` use
:func:`check_image`, so that every path skips the same files for the same reasons. It
reads only the file's header (Pillow's ``Image.open`` does not decode pixels) and its
last bytes, so it costs well under a millisecond per file on a local disk:

* ``unreadable``: missing, empty, or not an image Pillow can identify;
* ``truncated``: a JPEG without its end-of-image marker (``FF D9``) or a PNG without its
  ``IEND`` chunk near the end of the file (a partial download or copy);
* ``too_large``: above Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
  89.5 megapixels by default; Pillow refuses twice that), which a DataLoader worker would
  otherwise hit mid-epoch;
* ``unsupported``: a format or pixel mode that not every backend decodes to the same
  8-bit RGB (formats other than JPEG and PNG; 16-bit and float modes);
* ``size_mismatch``: the stored width x height differs from the annotation's. Boxes are
  in the annotation's pixel frame (as in COCO and the MLPerf reference), so such an
  image would get wrong targets and a wrong AP;

and one note that does not skip the image:

* ``exif_orientation``: the file carries an EXIF Orientation tag other than 1. Both
  backends ignore it (Pillow does not apply it; DALI's decoders are told not to), because
  COCO's boxes refer to the stored pixels.

This module imports only the standard library and Pillow, so the verification script can
load it on a host without PyTorch.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from PIL import Image

__all__ = ["SKIP_REASONS", "ImageCheck", "check_image", "REASON_TEXT"]

# Reasons that make an image unusable, in the order they are tested.
SKIP_REASONS = ("unreadable", "truncated", "too_large", "unsupported", "size_mismatch")

REASON_TEXT = {
    "unreadable": "unreadable (missing, empty or not an image)",
    "truncated": "truncated (no end-of-image marker)",
    "too_large": "above Pillow's decompression-bomb limit",
    "unsupported": "format or pixel mode not decoded alike by every backend",
    "size_mismatch": "stored size differs from the annotation's width/height",
    "exif_orientation": "EXIF orientation tag (ignored: boxes refer to the stored pixels)",
}

# Pillow warns (DecompressionBombWarning) when a header declares more than MAX_IMAGE_PIXELS;
# check_image reports such files itself (reason "too_large") and every reader skips them.
# A filter, not warnings.catch_warnings(): the checks run in threads, and catch_warnings
# saves and restores the process-wide filter list, which threads would leave disabled.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_FORMATS = ("JPEG", "PNG")
_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
_TAIL_BYTES = 1024  # JPEG encoders may pad a few bytes after FF D9; PNG's IEND is the last 12 bytes
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of :func:`check_image` for one file.

    Attributes:
        reason: one of :data:`SKIP_REASONS`, or ``None`` when the image is usable.
        detail: human-readable detail of the problem (sizes, exception text), ``""`` if none.
        size: stored (width, height) in pixels, or ``None`` when the header is unreadable.
        exif_orientation: the EXIF Orientation value when it is present and not 1, else ``None``.
    """

    reason: str | None
    detail: str = ""
    size: tuple[int, int] | None = None
    exif_orientation: int | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def message(self, path: str | os.PathLike) -> str:
        """``"<path>: <reason text> (<detail>)"``."""
        text = REASON_TEXT.get(self.reason or "", self.reason or "ok")
        return f"{path}: {text}" + (f" ({self.detail})" if self.detail else "")


def _has_end_marker(path: str | os.PathLike, fmt: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    if fmt == "JPEG":
        # FF D9 cannot occur inside entropy-coded data (FF is always followed by 00 or a
        # restart marker there), so its presence in the tail marks a complete scan.
        return b"\xff\xd9" in tail
    return b"IEND" in tail[-12:]


def check_image(path: str | os.PathLike, width: int, height: int) -> ImageCheck:
    """Check the image file at ``path`` against its annotation's ``width`` x ``height`` (pixels).

    Never raises for a bad file: every problem is returned as an :class:`ImageCheck`
    whose ``reason`` is one of :data:`SKIP_REASONS`.
    """
    try:
        with Image.open(path) as im:
            fmt, mode, size = im.format or "?", im.mode, (int(im.size[0]), int(im.size[1]))
            orientation = None
            if fmt == "JPEG":
                value = im.getexif().get(_EXIF_ORIENTATION)
                orientation = int(value) if isinstance(value, int) and value != 1 else None
    except Image.DecompressionBombError as e:
        return ImageCheck("too_large", str(e))
    except Exception as e:  # Pillow raises many types for broken headers
        return ImageCheck("unreadable", f"{type(e).__name__}: {e}")
    try:
        complete = fmt not in _FORMATS or _has_end_marker(path, fmt)
    except OSError as e:
        return ImageCheck("unreadable", f"{type(e).__name__}: {e}", size)
    if not complete:
        return ImageCheck("truncated", f"{fmt} file ends without its end marker", size, orientation)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        return ImageCheck("too_large", f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels > {limit}", size,
                          orientation)
    if fmt not in _FORMATS:
        return ImageCheck("unsupported", f"format {fmt}; JPEG and PNG are read alike by every backend", size,
                          orientation)
    if mode not in _MODES:
        return ImageCheck("unsupported", f"pixel mode {mode}", size, orientation)
    if size != (int(width), int(height)):
        return ImageCheck("size_mismatch", f"stored {size[0]}x{size[1]}, annotation says {int(width)}x{int(height)}",
                          size, orientation)
    return ImageCheck(None, "", size, orientation)
