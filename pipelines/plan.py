"""Split the input into shards: the unit that is read, committed and skipped on resume.

A shard is a fixed run of rows of one file (jsonl, json, csv, parquet, openai_batch) or a run of
whole files (text, images: one row per file). Its key depends only on the file paths and row
numbers, so the same input planned again gives the same shards, and an output file named after
a shard key says exactly which input rows it holds. Rows are numbered from 0 per file (line
index for line formats, blank lines skipped but counted), which makes the default row id
`relative/path:row` stable across runs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.spec import EXTENSION_FORMATS, JobSpec
from pipelines.storage import Location, list_files, locate, read_bytes

LINE_FORMATS = ("jsonl", "openai_batch")
FILE_FORMATS = ("text", "images")              # one row per file


@dataclass(frozen=True)
class Shard:
    key: str
    format: str
    files: tuple[str, ...]        # one file, or several for text/images
    rel: tuple[str, ...]          # the same, relative to the input root (used in row ids)
    start: int                    # first row number in the file (0 for file formats)
    count: int                    # rows the shard yields; the driver waits for exactly these
    offset: int = 0               # byte offset of row `start` (line formats)


def file_format(path: str, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSION_FORMATS:
        raise ValueError(f"input.format: cannot tell the format of {path!r} from its extension; "
                         f"set input.format")
    return EXTENSION_FORMATS[ext]


def shard_key(rel: str, start: int) -> str:
    digest = hashlib.sha1(rel.encode()).hexdigest()[:16]
    return f"{digest}-{start:010d}"


def stream_lines(f, chunk_bytes: int = 1 << 20):
    """(byte offset, line without its newline) for each line of a file object, chunk by chunk."""
    offset, tail = 0, b""
    while chunk := f.read(chunk_bytes):
        *lines, tail = (tail + chunk).split(b"\n")
        for line in lines:
            yield offset, line.rstrip(b"\r")
            offset += len(line) + 1
    if tail:
        yield offset, tail.rstrip(b"\r")


def count_rows(loc: Location, path: str, fmt: str) -> list[tuple[int, int]]:
    """(row number, byte offset) of every row of one file, in order."""
    if fmt == "parquet":
        try:
            n = pq.ParquetFile(loc.fs.open_input_file(path)).metadata.num_rows
        except Exception:                       # unreadable file: one error row stands for it
            n = 1
        return [(i, 0) for i in range(n)]
    if fmt in LINE_FORMATS:
        with loc.fs.open_input_stream(path) as f:
            return [(i, off) for i, (off, line) in enumerate(stream_lines(f)) if line.strip()]
    data = read_bytes(loc.fs, path)
    if fmt == "csv":
        try:
            n = pacsv.read_csv(io.BytesIO(data)).num_rows
        except Exception:
            n = 1
        return [(i, 0) for i in range(n)]
    try:
        rows = json.loads(data)
    except ValueError:
        return [(0, 0)]
    return [(i, 0) for i in range(len(rows) if isinstance(rows, list) else 1)]


def file_shards(loc: Location, root: str, path: str, fmt: str, per_shard: int) -> list[Shard]:
    rel = os.path.relpath(path, root) if root else path
    rows = count_rows(loc, path, fmt)
    shards = []
    for i in range(0, len(rows), per_shard):
        chunk = rows[i:i + per_shard]
        shards.append(Shard(shard_key(rel, chunk[0][0]), fmt, (path,), (rel,), chunk[0][0],
                            len(chunk), chunk[0][1]))
    return shards


def group_shards(root: str, paths: list[str], fmt: str, per_shard: int) -> list[Shard]:
    rels = [os.path.relpath(p, root) for p in paths]
    return [Shard(shard_key("\n".join(rels[i:i + per_shard]), 0), fmt,
                  tuple(paths[i:i + per_shard]), tuple(rels[i:i + per_shard]), 0,
                  len(paths[i:i + per_shard]))
            for i in range(0, len(paths), per_shard)]


def apply_limit(shards: list[Shard], limit: int | None) -> list[Shard]:
    if limit is None:
        return shards
    kept, left = [], limit
    for s in shards:
        if left <= 0:
            break
        kept.append(s if s.count <= left else _shorten(s, left))
        left -= kept[-1].count
    return kept


def _shorten(s: Shard, n: int) -> Shard:
    if s.format in FILE_FORMATS:
        return Shard(s.key, s.format, s.files[:n], s.rel[:n], 0, n)
    return Shard(s.key, s.format, s.files, s.rel, s.start, n, s.offset)


def plan_shards(spec: JobSpec) -> list[Shard]:
    """Every shard of the input, in a stable order, `input.limit` applied."""
    loc = locate(spec.input.uri, spec.storage)
    root, paths = list_files(loc)
    formats = {p: file_format(p, spec.input.format) for p in paths}
    per = spec.output.rows_per_shard
    shards = []
    for fmt in FILE_FORMATS:
        shards += group_shards(root, [p for p in paths if formats[p] == fmt], fmt, per)
    row_files = [p for p in paths if formats[p] not in FILE_FORMATS]
    with ThreadPoolExecutor(8) as pool:
        for found in pool.map(lambda p: file_shards(loc, root, p, formats[p], per), row_files):
            shards += found
    shards.sort(key=lambda s: (s.rel[0], s.start))
    return apply_limit(shards, spec.input.limit)
