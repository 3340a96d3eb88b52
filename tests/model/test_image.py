"""Image inputs: every accepted form decodes to the same RGB pixels; bad inputs raise ImageError
naming the input."""
from __future__ import annotations

import base64
import io
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from model.image import ImageError, load_image

PIXELS = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def encoded(fmt: str, image: Image.Image | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    (image or Image.fromarray(PIXELS)).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_to_the_original_pixels(fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    img = load_image(encoded(fmt, **kw))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), PIXELS)


def test_jpeg_decodes_like_pillow():
    data = encoded("JPEG", quality=90)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(data)), expected)


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (255, 0, 0)


def test_path_file_uri_data_url_and_filesystem_give_the_same_pixels(tmp_path):
    data = encoded("PNG")
    (tmp_path / "a b.png").write_bytes(data)
    b64 = "data:image/png;base64," + base64.b64encode(data).decode()
    pct = "data:image/png," + urllib.parse.quote_from_bytes(data)

    class Bucket:                              # stands in for s3fs.S3FileSystem
        def open(self, uri, mode):
            assert uri == "s3://bucket/key.png" and mode == "rb"
            return io.BytesIO(data)

    sources = [str(tmp_path / "a b.png"), tmp_path / "a b.png",
               "file://" + urllib.parse.quote(str(tmp_path / "a b.png")), b64, pct,
               bytearray(data), memoryview(data)]
    for src in sources:
        assert np.array_equal(np.asarray(load_image(src)), PIXELS), src
    assert np.array_equal(np.asarray(load_image("s3://bucket/key.png", filesystem=Bucket())), PIXELS)


def test_modes_become_rgb_like_the_reference():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))              # fully transparent -> white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)
    assert load_image(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    gray16 = load_image(encoded("PNG", Image.new("I;16", (4, 4), 5)))
    assert gray16.mode == "RGB"


def test_corrupt_bytes_name_the_input():
    with pytest.raises(ImageError, match=r"<9 bytes>.*not a recognised image"):
        load_image(b"not image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_a_clear_error(tmp_path, fmt):
    data = encoded(fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\..*(truncated|corrupt)"):
        load_image(str(path))


def test_empty_and_zero_size_inputs():
    with pytest.raises(ImageError, match="empty input"):
        load_image(b"")
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 5)))


def test_decompression_bomb_is_refused_from_the_header():
    big = encoded("PNG", Image.new("1", (3000, 2000)))     # 6 MP of zeros: a few KB of PNG
    assert len(big) < 50_000
    with pytest.raises(ImageError, match=r"3000x2000 = 6000000 pixels is over the limit"):
        load_image(big, max_decode_pixels=5_000_000)
    assert load_image(big, max_decode_pixels=6_000_000).size == (3000, 2000)


def test_unreadable_locations_and_types():
    with pytest.raises(ImageError, match="cannot read the file"):
        load_image("/nonexistent/x.png")
    with pytest.raises(ImageError, match="needs a filesystem"):
        load_image("s3://bucket/key.png")
    with pytest.raises(ImageError, match="not fetched"):
        load_image("https://example.com/x.png")
    with pytest.raises(ImageError, match="malformed data: URL"):
        load_image("data:image/png;base64")
    with pytest.raises(ImageError, match="unsupported input type int"):
        load_image(42)

    class Broken:
        def open(self, uri, mode):
            raise FileNotFoundError(uri)
    with pytest.raises(ImageError, match=r"s3://b/missing.*FileNotFoundError"):
        load_image("s3://b/missing.png", filesystem=Broken())
