"""Write: one output file per input shard, committed atomically, named after the shard key.

`part-<shard key>.<ext>` existing in the output folder is the whole resume protocol: such a
shard is done and is skipped on the next run; a shard without its file is (re)computed.
Result rows become the user-facing columns here: `id`, kept columns, `text` (or the score
fields), `finish_reason`, `prompt_tokens`, `completion_tokens`, `error` (null on success).
"""
from __future__ import annotations

import hashlib
import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.spec import JobSpec
from pipelines.storage import Location, commit

EXTENSIONS = {"parquet": "parquet", "jsonl": "jsonl", "openai_batch": "jsonl"}
GENERATION_COLUMNS = ("text", "finish_reason", "prompt_tokens", "completion_tokens")
SCORE_COLUMNS = ("logprob_sum", "prompt_tokens", "perplexity")
TYPES = {"id": pa.string(), "text": pa.string(), "finish_reason": pa.string(),
         "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(), "error": pa.string(),
         "logprob_sum": pa.float64(), "perplexity": pa.float64()}


def part_name(key: str, fmt: str) -> str:
    return f"part-{key}.{EXTENSIONS[fmt]}"


def committed_keys(names: list[str], fmt: str) -> set[str]:
    ext = "." + EXTENSIONS[fmt]
    return {n[len("part-"):-len(ext)] for n in names if n.startswith("part-") and n.endswith(ext)}


def user_row(result: dict, spec: JobSpec) -> dict:
    row = {"id": result["id"], **json.loads(result["keep"])}
    columns = SCORE_COLUMNS if result["kind"] == "score" else GENERATION_COLUMNS
    for c in columns:
        row[c] = result[c]
    if result["error"]:
        row.update({c: None for c in columns})
    row["error"] = result["error"] or None
    return row


def to_parquet(rows: list[dict]) -> bytes:
    names = list(rows[0])
    arrays = {}
    for n in names:
        values = [r.get(n) for r in rows]
        arr = pa.array(values, type=TYPES.get(n))
        arrays[n] = arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr
    sink = io.BytesIO()
    pq.write_table(pa.table(arrays), sink)
    return sink.getvalue()


def openai_line(result: dict, model: str, created: int) -> dict:
    rid = hashlib.sha1(str(result["id"]).encode()).hexdigest()[:24]
    if result["error"]:
        return {"id": f"batch_req_{rid}", "custom_id": result["id"], "response": None,
                "error": {"code": "invalid_request", "message": result["error"]}}
    usage = {"prompt_tokens": result["prompt_tokens"],
             "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    if result["kind"] == "completion":
        choice = {"index": 0, "text": result["text"], "logprobs": None,
                  "finish_reason": result["finish_reason"]}
        obj, prefix = "text_completion", "cmpl"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                  "logprobs": None, "finish_reason": result["finish_reason"]}
        obj, prefix = "chat.completion", "chatcmpl"
    body = {"id": f"{prefix}-{rid}", "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": usage}
    return {"id": f"batch_req_{rid}", "custom_id": result["id"],
            "response": {"status_code": 200, "request_id": rid, "body": body}, "error": None}


def encode_shard(results: list[dict], spec: JobSpec) -> bytes:
    results = sorted(results, key=lambda r: (r["_rel"], r["_row"]))
    fmt = spec.output.format
    if fmt == "openai_batch":
        created = int(time.time())
        lines = (openai_line(r, spec.model, created) for r in results)
    else:
        rows = [user_row(r, spec) for r in results]
        if fmt == "parquet":
            return to_parquet(rows)
        lines = rows
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()


def write_shard(out: Location, key: str, results: list[dict], spec: JobSpec) -> None:
    commit(out.fs, f"{out.path}/{part_name(key, spec.output.format)}", encode_shard(results, spec))
