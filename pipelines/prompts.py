"""Preprocess (CPU tasks): a raw row becomes a fixed-schema record the model replica can run.

Templating, the OpenAI Batch envelope, and image loading + checking happen here, so that a
replica only ever sees rows that are well formed or already marked as errors. Every column of
the record always has the same type (empty string / bytes for "none"), which keeps Ray Data's
Arrow blocks of one schema.
"""
from __future__ import annotations

import base64
import io
import json

from pipelines.plan import Shard
from pipelines.readers import RawRow
from pipelines.spec import JobSpec, template_fields
from pipelines.storage import locate, read_bytes

MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 64 * 2**20
OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")


def empty_record(shard: Shard, raw: RawRow, keep_columns: list[str]) -> dict:
    return {"id": f"{raw.rel}:{raw.row}", "_shard": shard.key, "_row": raw.row, "_rel": raw.rel,
            "prompt": "", "system": "", "image": b"", "body": "",
            "keep": json.dumps({k: None for k in keep_columns}), "error": ""}


def row_id(columns: dict, raw: RawRow, id_column: str | None) -> str:
    if id_column is None:
        return f"{raw.rel}:{raw.row}"
    value = columns.get(id_column)
    if value is None or value == "":
        raise ValueError(f"id column {id_column!r} is missing or empty")
    return str(value)


def fill_template(template: str, columns: dict) -> str:
    for name in template_fields(template):
        value = columns.get(name)
        if value is None:
            raise ValueError(f"template needs column {name!r}, which this row lacks")
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"column {name!r} is empty")
    return template.format_map(columns)


def jsonable(value):
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def check_image(data: bytes) -> bytes:
    """Decode the image fully (not just the header) so corrupt data fails here, named."""
    from PIL import Image
    if not data:
        raise ValueError("image is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image is {img.width}x{img.height} pixels; the limit is "
                                 f"{MAX_IMAGE_PIXELS} pixels")
            img.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"image over the pixel limit (decompression-bomb guard): {e}") from None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"corrupt image: {type(e).__name__}: {e}") from None
    return data


def load_image(value, spec: JobSpec, shard_root: str) -> bytes:
    """Image bytes from bytes, an s3:// URI (configured storage), a data: URL or a local path."""
    if isinstance(value, (bytes, bytearray)):
        return check_image(bytes(value))
    if not isinstance(value, str) or not value:
        raise ValueError(f"image column holds {type(value).__name__}, not bytes or a path/URI")
    if value.startswith("data:"):
        return check_image(base64.b64decode(value.partition(",")[2]))
    if value.startswith(("http://", "https://")):
        raise ValueError("image URLs over HTTP are not fetched; use s3:// or a path")
    if "://" not in value and not value.startswith("/"):
        value = f"{shard_root}/{value}"
    loc = locate(value, spec.storage)
    try:
        return check_image(read_bytes(loc.fs, loc.path))
    except (OSError, FileNotFoundError) as e:
        raise ValueError(f"cannot read image {value!r}: {e}") from None


def openai_body(columns: dict) -> str:
    for key in ("custom_id", "url", "body"):
        if key not in columns:
            raise ValueError(f"OpenAI batch line has no {key!r}")
    if columns.get("method", "POST") != "POST":
        raise ValueError(f"OpenAI batch method must be POST, got {columns['method']!r}")
    if columns["url"] not in OPENAI_URLS:
        raise ValueError(f"OpenAI batch url must be one of {OPENAI_URLS}, got {columns['url']!r}")
    body = columns["body"]
    if not isinstance(body, dict):
        raise ValueError("OpenAI batch body must be an object")
    return json.dumps({**body, "_url": columns["url"]})


def fill_record(record: dict, columns: dict, spec: JobSpec, fmt: str, raw: RawRow,
                root: str) -> None:
    task = spec.task
    if spec.input.columns is not None:
        columns = {k: columns[k] for k in spec.input.columns if k in columns}
    record["keep"] = json.dumps({k: jsonable(columns.get(k)) for k in spec.output.keep_columns})
    if fmt == "openai_batch":
        record["id"] = str(columns.get("custom_id", record["id"]))
        record["body"] = openai_body(columns)
        return
    record["id"] = row_id(columns, raw, spec.input.id_column)
    record["prompt"] = fill_template(task.template, columns)
    record["system"] = task.system or ""
    if task.image_column is not None:
        record["image"] = load_image(columns.get(task.image_column), spec, root)


def prepare(shard: Shard, raw: RawRow, spec: JobSpec, root: str) -> dict:
    """One fixed-schema record; a failure anywhere becomes the record's `error`."""
    record = empty_record(shard, raw, spec.output.keep_columns)
    if raw.error is not None:
        record["error"] = raw.error
        return record
    try:
        fill_record(record, raw.columns, spec, shard.format, raw, root)
    except ValueError as e:
        record["error"] = str(e)
    return record
