"""Decoding one image input into an RGB `PIL.Image`, with clear errors for bad inputs.

Accepted inputs: a `PIL.Image.Image`; raw bytes (JPEG, PNG, WebP, GIF (first frame), BMP, TIFF,
anything Pillow reads); a local path (str or Path, or a `file://` URI); an `s3://` (or other
`scheme://`) URI read through the filesystem you pass (an fsspec filesystem such as s3fs, anything
with `.open(uri, "rb")`); a `data:` URL (base64 or percent-encoded).

Conversion to RGB follows the reference processor: anything with transparency (RGBA, LA, palette
with a transparent index) is composited onto white, everything else (grayscale, palette, CMYK,
16-bit) goes through Pillow's `convert("RGB")`.

The decompression-bomb guard reads the header first and refuses images whose decoded pixel count
exceeds `max_decode_pixels` before any pixel data is decoded.
"""
from __future__ import annotations

import base64
import io
import urllib.parse
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_DECODE_PIXELS = 1 << 27            # 134M pixels (~400 MB as RGB) before resizing


class ImageError(ValueError):
    """An image input that cannot be used; the message names the input."""


def describe(source) -> str:
    """A short, log-safe name for an image input (never the whole payload)."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    text = str(source)
    return repr(text if len(text) <= 80 else text[:60] + "...")


def load_image(source, filesystem=None, max_decode_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Decode `source` (see module docstring) into a fully loaded RGB image."""
    name = describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = open_bytes(bytes(source), name)
    elif isinstance(source, (str, Path)):
        image = open_bytes(read_location(str(source), filesystem, name), name)
    else:
        raise ImageError(f"image {name}: unsupported input type {type(source).__name__}; pass a "
                         "PIL image, bytes, a path, an s3:// URI or a data: URL")
    check_size(image, name, max_decode_pixels)
    return to_rgb(decode(image, name))


def read_location(location: str, filesystem, name: str) -> bytes:
    if location.startswith("data:"):
        return decode_data_url(location, name)
    if location.startswith("file://"):
        location = urllib.parse.unquote(urllib.parse.urlparse(location).path)
    elif "://" in location:
        if location.startswith(("http://", "https://")):
            raise ImageError(f"image {name}: http(s) URLs are not fetched; pass the bytes, a path, "
                             "an s3:// URI or a data: URL")
        if filesystem is None:
            raise ImageError(f"image {name}: reading a {location.split('://')[0]}:// URI needs a "
                             "filesystem (e.g. s3fs.S3FileSystem) and none was configured")
        try:
            with filesystem.open(location, "rb") as f:
                return f.read()
        except Exception as e:          # each filesystem raises its own error types
            raise ImageError(f"image {name}: cannot read it: {type(e).__name__}: {e}") from None
    try:
        return Path(location).read_bytes()
    except OSError as e:
        raise ImageError(f"image {name}: cannot read the file: {e.strerror or e}") from None


def decode_data_url(url: str, name: str) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise ImageError(f"image {name}: malformed data: URL (no comma)")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=False)
        except ValueError as e:
            raise ImageError(f"image {name}: data: URL is not valid base64: {e}") from None
    return urllib.parse.unquote_to_bytes(payload)


def open_bytes(data: bytes, name: str) -> Image.Image:
    """Read the header only (Pillow decodes lazily); pixel data is decoded in `decode`."""
    if not data:
        raise ImageError(f"image {name}: empty input (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"image {name}: not a recognised image format (corrupt or not an image)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name}: refused as a decompression bomb: {e}") from None
    except Exception as e:
        raise ImageError(f"image {name}: cannot open it: {type(e).__name__}: {e}") from None


def check_size(image: Image.Image, name: str, max_decode_pixels: int) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {name}: zero-size image ({w}x{h})")
    if w * h > max_decode_pixels:
        raise ImageError(f"image {name}: {w}x{h} = {w * h} pixels is over the limit of "
                         f"{max_decode_pixels} decoded pixels (decompression-bomb guard)")


def decode(image: Image.Image, name: str) -> Image.Image:
    try:
        image.seek(0)                    # first frame of animated GIF / WebP / multi-page TIFF
    except EOFError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as e:
        raise ImageError(f"image {name}: corrupt or truncated image data ({type(e).__name__}: "
                         f"{e})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
