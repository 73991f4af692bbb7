"""Opening real-world image files safely: header sizes, EXIF orientation, colour modes, bombs.

Two levels of reading:

- :func:`read_header` parses only the file header (size, mode, EXIF orientation). Bucketing
  100,000 images never decodes a pixel.
- :func:`load_rgb` / :func:`load_gray` decode, honour EXIF orientation and convert any mode
  (CMYK, RGBA/LA on a background colour, paletted, 16-bit, grayscale) to what training needs.

Every failure is a :class:`BadImage` whose message says what is wrong with the file, so callers
can report it by path and carry on.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Iterator, Optional

import attrs
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config.values import RGB, parse_colour  # noqa: F401  (moved to config; importable here too)
from ..interfaces import Size
from .files import describe_os_error

#: File name endings an image folder is scanned for (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: PIL formats accepted behind those endings (PIL's JPEG opener also returns "MPO" camera files).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
#: Default largest image, in pixels: PIL's own decompression-bomb threshold.
DEFAULT_MAX_PIXELS = 89_478_485
#: EXIF orientations that rotate by 90 degrees, so the displayed width and height swap.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112

class BadImage(Exception):
    """A file that cannot be used as an image; ``str(err)`` says why (no path: callers add it)."""


def is_image_name(name: str) -> bool:
    """True when ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


@attrs.frozen
class Header:
    """What the file header says, without decoding pixels."""

    size: Size  # (w, h) as displayed: EXIF orientation applied
    stored_size: Size  # (w, h) as stored in the file
    orientation: int
    mode: str
    format: str


# PIL's own bomb check raises for images over twice Image.MAX_IMAGE_PIXELS. hcp applies its own
# (configurable) limit from the header first, so files that passed it are opened with PIL's check
# off; the switch is process-global, hence the lock, and only used after PIL refused.
_UNCHECKED_LOCK = threading.Lock()


@contextlib.contextmanager
def _open(path: str, *, checked_by_caller: bool) -> Iterator[Image.Image]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:
            if not checked_by_caller:
                raise
            with _UNCHECKED_LOCK:
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    im = Image.open(path, formats=IMAGE_FORMATS)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    try:
        yield im
    finally:
        im.close()


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header's EXIF block (1 when absent or unreadable).

    Reads ``im.info["exif"]`` directly: ``PngImageFile.getexif()`` would decode the whole image.
    """
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make a good image unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _describe_open_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:  # the file system's, not PIL's (PIL sets no errno)
        return f"cannot read file ({describe_os_error(exc)})"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unrecognised or unsupported file format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large to open safely ({exc})"
    return f"corrupt image header ({type(exc).__name__}: {exc})"


def read_header(path: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Header:
    """Read ``path``'s size and mode from its header; raise :class:`BadImage` if it is unusable.

    ``max_pixels`` (None: no limit) rejects images that are too large to decode safely.
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with _open(path, checked_by_caller=max_pixels is None or max_pixels > DEFAULT_MAX_PIXELS) as im:
            w, h = im.size
            header_mode, header_format = im.mode, im.format or ""
            orientation = _orientation(im)
    except BadImage:
        raise
    except Exception as exc:  # PIL raises many types for broken headers; all mean "unusable"
        raise BadImage(_describe_open_error(exc)) from exc
    if w <= 0 or h <= 0:
        raise BadImage(f"image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise BadImage(
            f"image too large: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} "
            f"(possible decompression bomb; raise max_image_pixels to allow it)"
        )
    shown = (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)
    return Header(size=shown, stored_size=(w, h), orientation=orientation, mode=header_mode, format=header_format)


def _decode(path: str, draft: Optional[Size]) -> Image.Image:
    """Decode ``path`` fully with EXIF orientation applied; ``draft`` lets JPEGs decode smaller."""
    try:
        with _open(path, checked_by_caller=True) as im:
            if draft is not None and im.format in ("JPEG", "MPO"):
                turned = _orientation(im) in _TRANSPOSED_ORIENTATIONS
                # draft() picks a DCT scale that keeps the image at least this big (stored axes).
                im.draft(im.mode, (draft[1], draft[0]) if turned else draft)
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as exc:
        if isinstance(exc, (UnidentifiedImageError, Image.DecompressionBombError)) or getattr(exc, "errno", None):
            raise BadImage(_describe_open_error(exc)) from exc
        raise BadImage(f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale modes as "L", scaling the full range (convert() would clip)."""
    import numpy as np

    arr = np.asarray(im)
    if im.mode in _SIXTEEN_BIT or (im.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float32) / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image, background: RGB = (255, 255, 255)) -> Image.Image:
    """Any PIL image as "RGB"; transparency is composited on ``background``."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        return _to_8bit_gray(im).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    try:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr ...
    except ValueError as exc:
        raise BadImage(f"unsupported colour mode {im.mode}") from exc


def load_rgb(path: str, background: RGB = (255, 255, 255), draft: Optional[Size] = None) -> Image.Image:
    """Decode ``path`` as an upright "RGB" image; raise :class:`BadImage` if it cannot be read.

    ``draft`` (w, h): the size the caller will resize to; JPEGs may then decode at a reduced
    scale that is still at least that big (much faster for large photos).
    """
    return to_rgb(_decode(path, draft), background)


def load_gray(path: str) -> Image.Image:
    """Decode ``path`` as an upright 8-bit grayscale ("L") image; alpha is ignored."""
    im = _decode(path, None)
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        return _to_8bit_gray(im)
    if im.mode in ("LA", "La"):
        return im.getchannel("L")
    try:
        return im.convert("L")
    except ValueError as exc:
        raise BadImage(f"unsupported colour mode {im.mode}") from exc


def verify(path: str) -> None:
    """Decode ``path`` completely (catches truncated files a header read cannot see).

    JPEGs decode at 1/8 scale: the whole compressed stream is still read, so a truncated or
    corrupt file still fails, at a fraction of the cost.
    """
    _decode(path, (1, 1))
