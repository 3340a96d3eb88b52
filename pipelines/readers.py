"""Read one shard into raw rows: `(row number, relative path, columns | None, error | None)`.

A row that cannot be read (invalid UTF-8, a malformed JSON line, an unreadable file) comes back
with `columns=None` and a message; it never raises, so one bad row cannot stop the shard.
"""
from __future__ import annotations

import html.parser
import io
import json
from typing import NamedTuple

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.plan import Shard, stream_lines
from pipelines.storage import Location, read_bytes


class RawRow(NamedTuple):
    row: int
    rel: str
    columns: dict | None
    error: str | None = None


def decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None


class _TextOnly(html.parser.HTMLParser):
    SKIP = {"script", "style", "head"}

    def __init__(self):
        super().__init__()
        self.parts, self.depth = [], 0

    def handle_starttag(self, tag, attrs):
        self.depth += tag in self.SKIP

    def handle_endtag(self, tag):
        self.depth -= tag in self.SKIP and self.depth > 0
        if tag in ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "tr", "section"):
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextOnly()
    parser.feed(markup)
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def parse_json_line(line: bytes) -> dict:
    text = decode_utf8(line)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"malformed JSON line: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"JSON line is a {type(value).__name__}, not an object")
    return value


def read_lines(loc: Location, shard: Shard):
    """The shard's rows from its byte offset on; reads only as far as the shard goes."""
    emitted, row = 0, shard.start
    with loc.fs.open_input_file(shard.files[0]) as f:
        f.seek(shard.offset)
        for _, line in stream_lines(f):
            if emitted == shard.count:
                return
            if line.strip():
                yield _guarded(row, shard.rel[0], parse_json_line, line)
                emitted += 1
            row += 1


def _guarded(row: int, rel: str, parse, data) -> RawRow:
    try:
        return RawRow(row, rel, parse(data))
    except ValueError as e:
        return RawRow(row, rel, None, str(e))


def read_table_rows(loc: Location, shard: Shard):
    """csv, parquet and json (an array of objects): parse the file, slice the shard's rows."""
    path, rel, stop = shard.files[0], shard.rel[0], shard.start + shard.count
    try:
        rows = load_table(loc, path, shard.format)
    except Exception as e:                 # the planner gave an unreadable file exactly one row
        yield RawRow(0, rel, None, f"cannot read {shard.format} file: {str(e).splitlines()[0]}")
        return
    for i in range(shard.start, stop):
        row = rows[i]
        yield RawRow(i, rel, row) if isinstance(row, dict) else RawRow(
            i, rel, None, f"JSON array item is a {type(row).__name__}, not an object")


def load_table(loc: Location, path: str, fmt: str) -> list:
    if fmt == "parquet":
        return pq.read_table(loc.fs.open_input_file(path)).to_pylist()
    data = read_bytes(loc.fs, path)
    if fmt == "csv":
        return pacsv.read_csv(io.BytesIO(data)).to_pylist()
    value = json.loads(decode_utf8(data))
    return value if isinstance(value, list) else [value]


def read_document(loc: Location, path: str, rel: str) -> dict:
    text = decode_utf8(read_bytes(loc.fs, path))
    if rel.lower().endswith((".html", ".htm")):
        text = html_to_text(text)
    return {"text": text, "path": rel}


def read_files(loc: Location, shard: Shard):
    for path, rel in zip(shard.files, shard.rel):
        if shard.format == "text":
            yield _guarded(0, rel, lambda p: read_document(loc, p, rel), path)
        else:
            yield RawRow(0, rel, {"image": read_bytes(loc.fs, path), "path": rel})


def read_shard(loc: Location, shard: Shard):
    """The shard's raw rows, exactly `shard.count` of them."""
    if shard.format in ("jsonl", "openai_batch"):
        return list(read_lines(loc, shard))
    if shard.format in ("text", "images"):
        return list(read_files(loc, shard))
    return list(read_table_rows(loc, shard))
