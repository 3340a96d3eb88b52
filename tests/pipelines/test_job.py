"""Whole jobs on a real local Ray cluster, reading from and writing to a moto S3 server.

One Ray start for the file. Results are read back and checked row by row against the engine's
own `LLM.chat` on the same prompts (greedy), and resumption is checked by ids and by the commit
times of the shard files.
"""
from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.engine import SamplingParams
from pipelines.job import run_job
from pipelines.spec import parse_spec
from tests.pipelines.conftest import jsonl, news_rows, png, put

SAMPLING = {"max_tokens": 4, "temperature": 0.0, "seed": 0}


@pytest.fixture(scope="module")
def ray_cluster(s3):
    import ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    from cluster.engine import LLM
    return LLM(model=str(tiny_checkpoint), seed=0)


def job(model, endpoint: str, **sections):
    raw = {"name": "t", "model": str(model), "sampling": SAMPLING,
           "storage": {"endpoint_url": endpoint}, "resources": {"batch_size": 8}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_spec(raw)


def read_output(fs, folder: str, fmt: str) -> list[dict]:
    names = sorted(i.path for i in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(folder))
                   if i.base_name.startswith("part-"))
    rows = []
    for name in names:
        with fs.open_input_stream(name) as f:
            data = f.read()
        rows += (pq.read_table(pa.BufferReader(data)).to_pylist() if fmt == "parquet"
                 else [json.loads(line) for line in data.decode().splitlines()])
    return rows


def exactly_once(rows: list[dict], key: str = "id") -> dict[str, dict]:
    ids = [r[key] for r in rows]
    assert len(ids) == len(set(ids)), "an id appears twice"
    return {r[key]: r for r in rows}


def test_mixed_corpus_s3_to_s3_matches_llm_chat(ray_cluster, s3, tiny_checkpoint, llm):
    from cluster.engine import SamplingParams
    endpoint, fs = s3
    news = news_rows(36)
    long_row = {"id": "long", "text": "word " * 200, "lang": "xx"}
    put(fs, "corpus/mix/news.jsonl", jsonl(news[:18] + [b"\xff bad utf-8", b"{oops", long_row]))
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(news[18:]), sink)
    put(fs, "corpus/mix/more.parquet", sink.getvalue())
    put(fs, "corpus/mix/docs/readme.md", "# Hallo\n\nEin kurzes Dokument.")
    spec = job(tiny_checkpoint, endpoint,
               input={"uri": "s3://corpus/mix/"},
               task={"template": "Translate into English:\n\n{text}", "max_prompt_tokens": 64},
               output={"uri": "s3://corpus/mix-out/", "keep_columns": ["lang"],
                       "rows_per_shard": 8})
    progress = run_job(spec, quiet=True)
    got = exactly_once(read_output(fs, "corpus/mix-out", "parquet"))
    assert len(got) == 36 + 3 + 1
    assert progress.rows_failed == 3, sorted({r["error"] for r in got.values()})[:3]
    prompts = {f"news.jsonl:{i}": r["text"] for i, r in enumerate(news[:18])}
    prompts.update({f"more.parquet:{i}": r["text"] for i, r in enumerate(news[18:])})
    prompts["docs/readme.md:0"] = "# Hallo\n\nEin kurzes Dokument."
    ids = sorted(prompts)
    want = llm.chat([[{"role": "user", "content": f"Translate into English:\n\n{prompts[i]}"}]
                     for i in ids], SamplingParams(**SAMPLING))
    for i, out in zip(ids, want):
        row = got[i]
        assert (row["text"], row["error"]) == (out.outputs[0].text, None), i
        assert row["prompt_tokens"] == len(out.prompt_token_ids)
        assert row["completion_tokens"] == len(out.outputs[0].token_ids)
    assert got["news.jsonl:3"]["lang"] == "l3" and got["more.parquet:0"]["lang"] == news[18]["lang"]
    assert got["news.jsonl:18"]["error"] == "invalid UTF-8 at byte 0"
    assert got["news.jsonl:19"]["error"].startswith("malformed JSON line")
    assert "over task.max_prompt_tokens=64" in got["news.jsonl:20"]["error"]
    assert got["news.jsonl:20"]["text"] is None
    summary = json.loads(fs.open_input_stream("corpus/mix-out/_job.json").read())
    assert (summary["rows_ok"], summary["rows_failed"], summary["rows_skipped_done"]) == (37, 3, 0)
    assert fs.get_file_info("corpus/mix-out/_SUCCESS").size == 0


def test_images_from_s3(ray_cluster, s3, tiny_checkpoint, llm):
    from pipelines.replica import image_support
    endpoint, fs = s3
    put(fs, "corpus/pics/a.png", png(16, 16))
    put(fs, "corpus/pics/b.webp", b"RIFF\x00\x00\x00\x00WEBPbroken")
    spec = job(tiny_checkpoint, endpoint, input={"uri": "s3://corpus/pics/"},
               task={"template": "Describe the image.", "image_column": "image"},
               output={"uri": "s3://corpus/pics-out/", "format": "jsonl"})
    run_job(spec, quiet=True)
    got = exactly_once(read_output(fs, "corpus/pics-out", "jsonl"))
    assert got["b.webp:0"]["error"].startswith("corrupt image:")
    assert image_support(llm) == ""             # the tiny preset is a vision-language checkpoint
    [want] = llm.chat([{"role": "user", "content": [{"type": "image", "image": png(16, 16)},
                                                    {"type": "text", "text": "Describe the image."}]}],
                      SamplingParams(**spec.sampling.model_dump()))
    assert got["a.png:0"]["error"] is None and got["a.png:0"]["text"] == want.outputs[0].text
    assert got["a.png:0"]["prompt_tokens"] == len(want.prompt_token_ids)


def openai_corpus(n: int) -> list[dict]:
    lines = []
    for i in range(n):
        if i % 2:
            body = {"model": "m", "messages": [{"role": "user", "content": f"Hi {i}"}]}
            url = "/v1/chat/completions"
        else:
            body, url = {"model": "m", "prompt": f"Once upon a time {i}", "max_tokens": 3}, \
                "/v1/completions"
        lines.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    return lines


def test_openai_batch_resumes_exactly_once(ray_cluster, s3, tiny_checkpoint):
    endpoint, fs = s3
    put(fs, "corpus/oai/requests.jsonl", jsonl(openai_corpus(20)))
    spec = job(tiny_checkpoint, endpoint,
               input={"uri": "s3://corpus/oai/requests.jsonl", "format": "openai_batch"},
               output={"uri": "s3://corpus/oai-out", "format": "openai_batch",
                       "rows_per_shard": 3})
    first = run_job(spec, quiet=True, stop_after_shards=2)     # "killed" after two commits
    parts = {i.path: i.mtime for i in fs.get_file_info(
        __import__("pyarrow.fs").fs.FileSelector("corpus/oai-out")) if "part-" in i.path}
    assert first.shards_written == 2 and len(parts) == 2
    assert fs.get_file_info("corpus/oai-out/_SUCCESS").type.name == "NotFound"
    time.sleep(1.1)                                      # S3 mtimes have one-second resolution
    second = run_job(spec, quiet=True)
    assert second.skipped_rows == 6 and second.rows_ok + second.rows_failed == 14
    for path, mtime in parts.items():                    # committed shards were not redone
        assert fs.get_file_info(path).mtime == mtime
    lines = exactly_once(read_output(fs, "corpus/oai-out", "jsonl"), key="custom_id")
    assert sorted(lines) == sorted(f"req-{i}" for i in range(20))
    chat, comp = lines["req-1"]["response"]["body"], lines["req-0"]["response"]["body"]
    assert chat["object"] == "chat.completion" and comp["object"] == "text_completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert comp["usage"]["completion_tokens"] == 3 and lines["req-0"]["error"] is None
    assert comp["usage"]["total_tokens"] == comp["usage"]["prompt_tokens"] + 3
    third = run_job(spec, quiet=True)                      # nothing left to do
    assert third.skipped_rows == 20 and third.shards_written == 0


def replica_pids() -> list[int]:
    """Ray worker processes of this test's cluster that hold a ModelReplica."""
    mine = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"MapBatches(ModelReplica)" in cmd and descends_from(int(pid), os.getpid()):
            mine.append(int(pid))
    return mine


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def test_killed_replica_is_replaced_and_every_row_lands_once(ray_cluster, tmp_path, tiny_checkpoint):
    rows = news_rows(30)
    (tmp_path / "in.jsonl").write_bytes(jsonl(rows))
    spec = job(tiny_checkpoint, None, input={"uri": str(tmp_path / "in.jsonl"), "id_column": "id"},
               sampling={"max_tokens": 12},
               output={"uri": str(tmp_path / "out"), "format": "jsonl", "rows_per_shard": 2},
               resources={"replicas": 2, "cpus_per_replica": 1, "batch_size": 2})
    result = {}
    runner = threading.Thread(target=lambda: result.update(p=run_job(spec, quiet=True)))
    runner.start()
    deadline = time.monotonic() + 240
    while not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("part-*")):
        assert time.monotonic() < deadline and runner.is_alive()
        time.sleep(0.2)
    pids = replica_pids()
    assert pids, "no replica process found"
    os.kill(pids[0], signal.SIGKILL)
    shards_at_kill = len(list((tmp_path / "out").glob("part-*")))
    runner.join(300)
    assert shards_at_kill < 15 and "p" in result
    got = exactly_once([json.loads(line) for f in sorted((tmp_path / "out").glob("part-*"))
                        for line in f.read_text().splitlines()])
    assert sorted(got) == [r["id"] for r in rows]
    assert all(r["error"] is None and r["completion_tokens"] > 0 for r in got.values())


def test_a_lost_pass_resumes_from_committed_shards(ray_cluster, s3, tiny_checkpoint, monkeypatch,
                                                   capsys):
    """A Ray-level failure in the middle of a pass (here: the first pass stops after two commits
    and raises the error a cancelled replica actor gives, since no real part can make Ray cancel
    an actor on cue) resumes within the same run; each id lands exactly once."""
    import ray.exceptions

    import pipelines.job as job_module
    endpoint, fs = s3
    rows = news_rows(10)
    put(fs, "corpus/lost/news.jsonl", jsonl(rows))
    spec = job(tiny_checkpoint, endpoint, input={"uri": "s3://corpus/lost/news.jsonl",
                                                 "id_column": "id"},
               output={"uri": "s3://corpus/lost-out", "format": "jsonl", "rows_per_shard": 2})
    real_pass, calls = job_module.run_pass, []

    def flaky_pass(spec, todo, progress, quiet, stop_after_shards):
        calls.append(len(todo))
        if len(calls) == 1:
            real_pass(spec, todo, progress, quiet, stop_after_shards=2)
            raise ray.exceptions.ActorDiedError()
        return real_pass(spec, todo, progress, quiet, stop_after_shards)

    monkeypatch.setattr(job_module, "run_pass", flaky_pass)
    progress = run_job(spec, quiet=True)
    assert calls == [5, 3] and progress.rows_ok == 10
    assert "attempt 1 lost its workers" in capsys.readouterr().out
    got = exactly_once(read_output(fs, "corpus/lost-out", "jsonl"))
    assert sorted(got) == sorted(r["id"] for r in rows)


def test_a_failure_of_the_job_itself_is_not_retried(ray_cluster, s3, tiny_checkpoint, monkeypatch):
    import pipelines.job as job_module
    endpoint, fs = s3
    put(fs, "corpus/bug/news.jsonl", jsonl(news_rows(2)))
    spec = job(tiny_checkpoint, endpoint, input={"uri": "s3://corpus/bug/news.jsonl"},
               output={"uri": "s3://corpus/bug-out", "format": "jsonl"})
    calls = []

    def broken_pass(*args):
        calls.append(1)
        raise RuntimeError("shards incomplete")

    monkeypatch.setattr(job_module, "run_pass", broken_pass)
    with pytest.raises(job_module.JobFailed, match="attempt 1 of 3.*shards incomplete"):
        run_job(spec, quiet=True)
    assert calls == [1]
