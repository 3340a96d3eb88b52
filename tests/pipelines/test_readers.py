"""Plan + read + preprocess for every input format, from local files and from S3 (no Ray)."""
from __future__ import annotations

import io
import json
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.job import read_and_prepare
from pipelines.plan import plan_shards
from pipelines.spec import parse_spec
from tests.pipelines.conftest import jsonl, local_tree, news_rows, png, put


def huge_png(width: int = 9000, height: int = 9000) -> bytes:
    """A PNG whose header claims width x height pixels (over the limit) but holds a tiny image."""
    data = bytearray(png())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def spec_for(uri: str, endpoint: str | None = None, **sections) -> object:
    raw = {"name": "t", "model": "preset:tiny", "input": {"uri": uri},
           "output": {"uri": "/tmp/unused", "rows_per_shard": 4},
           "storage": {"endpoint_url": endpoint}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_spec(raw)


def records(spec) -> list[dict]:
    from dataclasses import asdict
    out = []
    for shard in plan_shards(spec):
        rows = read_and_prepare({"shard": json.dumps(asdict(shard))}, spec.model_dump_json())
        assert len(rows) == shard.count
        out += rows
    return out


def by_id(rows: list[dict]) -> dict[str, dict]:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids"
    return {r["id"]: r for r in rows}


def test_jsonl_from_s3_with_bad_rows(s3):
    endpoint, fs = s3
    lines = news_rows(9) + [b"\xff\xfe not utf-8", b"{\"id\": \"x\", broken", b"",
                            {"id": "empty", "text": "   "}, [1, 2], {"id": "nolang"}]
    put(fs, "corpus/news/part1.jsonl", jsonl(lines))
    spec = spec_for("s3://corpus/news/", endpoint,
                    task={"template": "Translate: {text}", "system": "Be brief."},
                    output={"keep_columns": ["lang"]})
    rows = records(spec)
    assert len(rows) == 14                                       # the blank line is not a row
    good = [r for r in rows if not r["error"]]
    assert [r["id"] for r in good] == [f"part1.jsonl:{i}" for i in range(9)]
    assert good[4]["prompt"] == "Translate: " + news_rows(9)[4]["text"]
    assert good[4]["system"] == "Be brief." and json.loads(good[4]["keep"]) == {"lang": "l4"}
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert errors["part1.jsonl:9"] == "invalid UTF-8 at byte 0"
    assert errors["part1.jsonl:10"].startswith("malformed JSON line:")
    assert errors["part1.jsonl:12"] == "column 'text' is empty"       # row 11 was blank
    assert errors["part1.jsonl:13"] == "JSON line is a list, not an object"
    assert errors["part1.jsonl:14"] == "template needs column 'text', which this row lacks"


def test_shards_are_stable_and_limit_cuts(s3):
    endpoint, fs = s3
    put(fs, "corpus/many/a.jsonl", jsonl(news_rows(10)))
    put(fs, "corpus/many/b.jsonl", jsonl(news_rows(3)))
    spec = spec_for("s3://corpus/many/*.jsonl", endpoint, input={"id_column": "id"})
    shards = plan_shards(spec)
    assert [s.count for s in shards] == [4, 4, 2, 3]
    assert [s.key for s in plan_shards(spec)] == [s.key for s in shards]
    limited = spec_for("s3://corpus/many/", endpoint, input={"limit": 6})
    assert [s.count for s in plan_shards(limited)] == [4, 2]
    assert [r["id"] for r in records(limited)] == [f"a.jsonl:{i}" for i in range(6)]


def test_parquet_from_s3_with_id_column_and_projection(s3):
    endpoint, fs = s3
    rows = news_rows(6)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    put(fs, "corpus/pq/x.parquet", sink.getvalue())
    spec = spec_for("s3://corpus/pq", endpoint,
                    input={"id_column": "id", "columns": ["id", "text"]},
                    output={"keep_columns": ["lang"]})
    got = by_id(records(spec))
    assert sorted(got) == [r["id"] for r in rows]
    assert got["n002"]["prompt"] == rows[2]["text"]
    assert json.loads(got["n002"]["keep"]) == {"lang": None}       # projected away


def test_csv_and_json_local(tmp_path):
    root = local_tree(tmp_path, {
        "t.csv": "id,text\nc1,hello there\nc2,\"quoted, with comma\"\n",
        "t.json": json.dumps([{"id": "j1", "text": "un"}, "not an object"]),
        "bad.json": "[{\"id\": ",
    })
    got = by_id(records(spec_for(root, task={"kind": "completion"})))
    assert got["t.csv:1"]["prompt"] == "quoted, with comma"
    assert got["t.json:0"]["prompt"] == "un"
    assert got["t.json:1"]["error"] == "JSON array item is a str, not an object"
    assert got["bad.json:0"]["error"].startswith("cannot read json file:")


def test_text_documents(s3):
    endpoint, fs = s3
    put(fs, "corpus/docs/guide.md", "# Titre\n\nUn document en *français*.")
    put(fs, "corpus/docs/page.html", "<html><head><title>x</title><script>var a=1;</script>"
                                      "</head><body><p>Hallo   Welt</p><p>zwei</p></body></html>")
    put(fs, "corpus/docs/bad.txt", b"ok then \xc3\x28 broken")
    spec = spec_for("s3://corpus/docs/", endpoint, task={"template": "Summarise:\n{text}"})
    got = by_id(records(spec))
    assert got["guide.md:0"]["prompt"] == "Summarise:\n# Titre\n\nUn document en *français*."
    assert got["page.html:0"]["prompt"] == "Summarise:\nHallo Welt\nzwei"
    assert got["bad.txt:0"]["error"] == "invalid UTF-8 at byte 8"


def test_images_and_image_column(s3, tmp_path):
    endpoint, fs = s3
    for name, data in {"ok.png": png(), "corrupt.jpg": b"\xff\xd8\xff garbage",
                       "huge.png": huge_png(), "bomb.png": huge_png(30000, 30000), "empty.gif": b""}.items():
        put(fs, f"corpus/img/{name}", data)
    spec = spec_for("s3://corpus/img", endpoint,
                    task={"template": "Describe the image.", "image_column": "image"})
    got = by_id(records(spec))
    assert got["ok.png:0"]["image"] == png() and not got["ok.png:0"]["error"]
    assert got["corrupt.jpg:0"]["error"].startswith("corrupt image:")
    assert got["huge.png:0"]["error"] == (f"image is 9000x9000 pixels; the limit is "
                                          f"{64 * 2**20} pixels")
    assert got["bomb.png:0"]["error"].startswith("image over the pixel limit (decompression-bomb")
    assert got["empty.gif:0"]["error"] == "image is empty (0 bytes)"
    # a row column holding a path relative to the file, or an s3:// URI
    root = local_tree(tmp_path, {"pics/a.png": png(4, 4), "rows.jsonl": jsonl([
        {"id": "p", "text": "t", "img": "pics/a.png"},
        {"id": "s", "text": "t", "img": "s3://corpus/img/ok.png"},
        {"id": "h", "text": "t", "img": "http://example.com/x.png"}])})
    spec = spec_for(root + "/rows.jsonl", endpoint,
                    input={"id_column": "id"}, task={"image_column": "img"})
    got = by_id(records(spec))
    assert got["p"]["image"] == png(4, 4) and got["s"]["image"] == png()
    assert got["h"]["error"] == "image URLs over HTTP are not fetched; use s3:// or a path"


def test_openai_batch_lines(tmp_path):
    chat = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 3}}
    comp = {"custom_id": "b", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": "Once"}}
    bad_url = {**comp, "custom_id": "c", "url": "/v1/embeddings"}
    no_body = {"custom_id": "d", "method": "POST", "url": "/v1/completions"}
    root = local_tree(tmp_path, {"req.jsonl": jsonl([chat, comp, bad_url, no_body])})
    got = by_id(records(spec_for(root, input={"format": "openai_batch"})))
    assert json.loads(got["a"]["body"])["_url"] == "/v1/chat/completions"
    assert json.loads(got["b"]["body"])["prompt"] == "Once"
    assert got["c"]["error"].startswith("OpenAI batch url must be one of")
    assert got["d"]["error"] == "OpenAI batch line has no 'body'"


def test_unknown_extension_and_missing_input(tmp_path):
    root = local_tree(tmp_path, {"a.xyz": "?"})
    with pytest.raises(ValueError, match="^input.format: cannot tell the format"):
        plan_shards(spec_for(root))
    with pytest.raises(FileNotFoundError, match="^input.uri: nothing at"):
        plan_shards(spec_for(str(tmp_path / "nope")))
