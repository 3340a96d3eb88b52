"""Where an image content part may come from, checked before anything is read.

`data:` URLs are always accepted (decoded here, size-limited, checked to be an image).
`s3://BUCKET/KEY` only for buckets in the serve config's allow-list; `http(s)://` only under
an allow-listed prefix (each prefix names its host and a path, so it cannot match another
host). Everything else (file:, ftp:, other hosts, internal addresses) is refused: user input
must never make the server fetch an address of its choosing.

Accepted sources reach the engine as bytes (data: URLs) or as the URI. `s3://` URIs are read by
`AllowedS3`, the engine's image filesystem, which opens allow-listed buckets only and refuses
objects over MAX_IMAGE_BYTES. `http(s)://` URIs, even allow-listed, are not fetched yet: the
engine refuses them, so such a request gets a 400 naming the image.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass

from cluster.api import APIError

MAX_IMAGE_BYTES = 20 << 20


@dataclass
class ImageSource:
    url: str
    data: bytes | None = None       # decoded bytes of a data: URL; remote sources are read later


def refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_image_url")


def decode_data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise refuse(param, "a data URL image must be data:image/<type>;base64,<data>")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise refuse(param, f"image is larger than {MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise refuse(param, "the data URL is not valid base64") from None
    check_image(data, param)
    return data


def check_image(data: bytes, param: str) -> None:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise refuse(param, "the data URL does not hold a readable image") from None


def check_image_url(url: str, param: str, s3_buckets: list[str],
                    url_prefixes: list[str]) -> ImageSource:
    """An accepted image source, or a 400 naming the part and why it was refused."""
    if url.startswith("data:"):
        return ImageSource(url, decode_data_url(url, param))
    if url.startswith("s3://"):
        bucket = url.removeprefix("s3://").split("/", 1)[0]
        if bucket in s3_buckets and "/" in url.removeprefix("s3://"):
            return ImageSource(url)
        raise refuse(param, f"s3 bucket {bucket!r} is not allowed for images on this server")
    if url.startswith(("http://", "https://")):
        if any(url.startswith(prefix) for prefix in url_prefixes) and ".." not in url:
            return ImageSource(url)
        raise refuse(param, "image URLs on other hosts are not fetched by this server; "
                            "send the image as a data: URL")
    raise refuse(param, "an image URL must be a data: URL (or an allowed s3:// or https:// "
                        "location)")


class AllowedS3:
    """The engine's image filesystem: `open("s3://BUCKET/KEY", "rb")` through s3fs for allow-listed
    buckets only (a second check behind check_image_url). The endpoint comes from
    AWS_ENDPOINT_URL when set, credentials from the usual AWS chain."""

    def __init__(self, buckets: list[str], fs=None):
        self.buckets, self.fs = set(buckets), fs

    def open(self, uri: str, mode: str = "rb"):
        bucket = uri.removeprefix("s3://").split("/", 1)[0]
        if not uri.startswith("s3://") or bucket not in self.buckets or mode != "rb":
            raise PermissionError(f"{uri.split('://')[0]}:// bucket {bucket!r} is not allowed")
        if self.fs is None:
            import s3fs
            self.fs = s3fs.S3FileSystem(endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
        size = self.fs.info(uri).get("size") or 0
        if size > MAX_IMAGE_BYTES:
            raise ValueError(f"object is {size} bytes, over the image limit of {MAX_IMAGE_BYTES}")
        return self.fs.open(uri, mode)


def image_filesystem(s3_buckets: list[str]) -> AllowedS3 | None:
    return AllowedS3(s3_buckets) if s3_buckets else None
