"""Decoding client images safely, for every image task.

Accepts PNG, JPEG, WebP, BMP and GIF (first frame) of any size and mode, applies EXIF orientation,
and refuses what would hurt the server: a file over the byte limit or an image over the pixel
limit is a 413 (checked from the header, before any pixel is decoded, so a decompression bomb never
allocates), a file that is not an image is a 415, a truncated or corrupt one a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def decode_base64(text: object, index: int) -> bytes:
    """Base64 (standard or URL-safe, optionally a ``data:image/...;base64,`` URL) to bytes."""
    if not isinstance(text, str):
        raise InvalidImage(f"image {index}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    text = "".join(text.split())
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"image {index}: not valid base64") from None


@dataclass(frozen=True)
class Decoded:
    """An upright image, maybe decoded at a reduced scale, and the size it has as sent (upright):
    what boxes must be mapped back to."""

    image: Image.Image
    width: int
    height: int


# EXIF orientations that swap width and height (transpose, rotate 90, transverse, rotate 270).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def decode_image(
    data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image", reduce_to: int | None = None
) -> Image.Image:
    """Bytes to a fully loaded, upright PIL image (first frame for animations)."""
    return decode(data, max_bytes=max_bytes, max_pixels=max_pixels, name=name, reduce_to=reduce_to).image


def decode(
    data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image", reduce_to: int | None = None
) -> Decoded:
    """Bytes to a fully loaded, upright image. With ``reduce_to``, a JPEG is decoded at the smallest
    of its 1/2, 1/4, 1/8 scales that still covers ``reduce_to`` pixels on both sides (libjpeg's DCT
    scaling: a 12-megapixel phone photo decodes to 0.2-0.8 megapixels instead of 36 MB of RGB)."""
    image = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=name)
    width, height = image.size
    swapped = _orientation(image) in _SWAPPING_ORIENTATIONS
    if reduce_to is not None and image.format == "JPEG":
        image.draft(image.mode, (reduce_to, reduce_to))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{name}: image dimensions exceed the pixel limit") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"{name}: corrupt or truncated {image.format} image ({exc})") from None
    upright_image = upright(image)
    if swapped and upright_image is not image:
        width, height = height, width
    return Decoded(upright_image, width, height)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):
        return 1


def open_image(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image") -> Image.Image:
    """The image's header read and checked (bytes, format, pixels), no pixel decoded yet."""
    if not data:
        raise InvalidImage(f"{name}: the file is empty")
    if len(data) > max_bytes:
        # Only the limit and one byte more are read from an upload, so its size is not known here.
        raise ImageTooLarge(f"{name}: larger than the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, on large images; our own pixel limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{name}: image dimensions exceed the pixel limit") from None
    except UnidentifiedImageError:
        raise UnsupportedImageFormat(
            f"{name}: not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"{name}: corrupt image header ({exc})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} pixels")
    return image


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, as a phone's gallery would show the photo."""
    try:
        return ImageOps.exif_transpose(image) or image
    except (OSError, ValueError, TypeError, KeyError, SyntaxError):
        return image  # a broken EXIF block must not cost the client its answer


def to_gray(image: Image.Image, *, max_side: int | None = None) -> np.ndarray:
    """A float32 grey image in [0, 1] from any mode.

    16-bit images keep their range (scaled from 65535, not clipped at 255). Transparent pixels are
    laid on a background that contrasts with the visible ink: a dark drawing on a transparent canvas
    (what an HTML canvas exports) lands on white, a light one on black.
    """
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        peak = float(values.max(initial=0.0))
        if mode == "F":
            top = max(peak, 1.0)
        else:  # integer modes: 16-bit range unless the values fit in 8 bits
            top = 65535.0 if peak > 255 else 255.0
        return np.clip(values / top, 0.0, 1.0)
    has_alpha = mode in _ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    gray = np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0
    weight = alpha.sum()
    if weight < 1e-6:
        return np.zeros_like(gray)  # fully transparent: nothing drawn
    ink = float((gray * alpha).sum() / weight)
    background = 1.0 if ink < 0.5 else 0.0
    return alpha * gray + (1.0 - alpha) * background


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image from any mode; transparent pixels laid on white (as a browser shows them)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        gray = (to_gray(image) * 255.0).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")
