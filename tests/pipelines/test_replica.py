"""The infer stage without Ray: ModelReplica against LLM.generate / LLM.chat on the same prompts."""
from __future__ import annotations

import json
import math

import pytest

from pipelines.replica import ModelReplica
from pipelines.spec import parse_spec
from tests.pipelines.conftest import png


def record(i: int, prompt: str = "", **extra) -> dict:
    return {"id": f"r{i}", "_shard": "s", "_row": i, "_rel": "f", "prompt": prompt, "system": "",
            "image": b"", "body": "", "keep": "{}", "error": "", **extra}


def batch(records: list[dict]) -> dict:
    return {k: [r[k] for r in records] for k in records[0]}


def replica(model: str, **task) -> ModelReplica:
    return ModelReplica(parse_spec({
        "name": "t", "model": model, "input": {"uri": "/x"}, "output": {"uri": "/y"},
        "task": task, "sampling": {"max_tokens": 5}}).model_dump_json())


@pytest.fixture(scope="module")
def chat_replica(tiny_checkpoint):
    return replica(str(tiny_checkpoint), kind="chat", max_prompt_tokens=40)


def with_task(rep: ModelReplica, **task) -> ModelReplica:
    """The same loaded model under another task (one model load for the whole file)."""
    from pipelines.spec import TaskSpec
    rep.spec = rep.spec.model_copy(update={"task": TaskSpec(**task)})
    return rep


def rows(out: dict) -> list[dict]:
    return [dict(zip(out, values)) for values in zip(*out.values())]


def test_chat_rows_match_llm_chat_and_bad_rows_become_errors(chat_replica):
    from cluster.engine import SamplingParams
    prompts = ["Bonjour le monde", "日本語のテキスト", "Hola " * 60, "x"]
    recs = [record(i, p) for i, p in enumerate(prompts)]
    recs.append(record(4, error="malformed JSON line: boom"))
    recs.append(record(5, "look", image=png()))
    recs[1]["system"] = "Reply in English."
    got = rows(with_task(chat_replica, kind="chat", max_prompt_tokens=40)(batch(recs)))
    llm = chat_replica.llm
    convs = [[{"role": "user", "content": prompts[0]}],
             [{"role": "system", "content": "Reply in English."},
              {"role": "user", "content": prompts[1]}],
             [{"role": "user", "content": prompts[3]}]]
    want = llm.chat(convs, SamplingParams(max_tokens=5, temperature=0.0, seed=0))
    for row, out in zip([got[0], got[1], got[3]], want):
        assert row["text"] == out.outputs[0].text and row["error"] == ""
        assert row["prompt_tokens"] == len(out.prompt_token_ids)
        assert row["completion_tokens"] == len(out.outputs[0].token_ids)
        assert row["finish_reason"] == out.outputs[0].finish_reason
    assert got[2]["error"].startswith("prompt has ") and "over task.max_prompt_tokens=40" in got[2]["error"]
    assert got[4]["error"] == "malformed JSON line: boom"
    assert chat_replica.no_images == ""        # the tiny preset is a vision-language checkpoint
    [image_out] = llm.chat([{"role": "user", "content": [{"type": "image", "image": png()},
                                                         {"type": "text", "text": "look"}]}],
                           SamplingParams(max_tokens=5, temperature=0.0, seed=0))
    assert got[5]["error"] == "" and got[5]["text"] == image_out.outputs[0].text
    assert got[5]["prompt_tokens"] == len(image_out.prompt_token_ids) > got[3]["prompt_tokens"] + 60


def test_truncate_keeps_the_prompt_within_the_limit(chat_replica):
    rep = with_task(chat_replica, kind="completion", max_prompt_tokens=12, truncate=True)
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    got = rows(rep(batch([record(0, text)])))[0]
    assert got["error"] == "" and got["prompt_tokens"] == 12
    ids = rep.llm.tokenizer.encode(text)
    from cluster.engine import SamplingParams
    want = rep.llm.generate(rep.llm.tokenizer.decode(ids[:12]),
                            SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert got["text"] == want.outputs[0].text


def test_score_is_the_prompt_logprob_sum(chat_replica):
    from cluster.engine import SamplingParams
    rep = with_task(chat_replica, kind="score")
    texts = ["The quick brown fox jumps", "Zxq"]
    got = rows(rep(batch([record(i, t) for i, t in enumerate(texts)])))
    outs = rep.llm.generate(texts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    for row, out in zip(got, outs):
        ids = out.prompt_token_ids
        total = sum(out.prompt_logprobs[j][ids[j]] for j in range(1, len(ids)))
        assert row["prompt_tokens"] == len(ids) and row["logprob_sum"] == pytest.approx(total)
        assert total < 0 and row["perplexity"] == pytest.approx(math.exp(-total / (len(ids) - 1)))


def test_openai_batch_bodies(chat_replica):
    from cluster.engine import SamplingParams
    chat = {"_url": "/v1/chat/completions", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3}
    comp = {"_url": "/v1/completions", "prompt": "Once upon", "max_tokens": 2}
    empty = {"_url": "/v1/chat/completions", "messages": []}
    recs = [record(i, body=json.dumps(b)) for i, b in enumerate([chat, comp, empty])]
    got = rows(chat_replica(batch(recs)))
    llm = chat_replica.llm
    want_chat = llm.chat([{"role": "user", "content": "hi"}],
                         SamplingParams(max_tokens=3, temperature=0.0))[0]
    want_comp = llm.generate("Once upon", SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert (got[0]["kind"], got[0]["text"]) == ("chat", want_chat.outputs[0].text)
    assert (got[1]["kind"], got[1]["text"]) == ("completion", want_comp.outputs[0].text)
    assert got[1]["completion_tokens"] == 2
    assert got[2]["error"] == "OpenAI batch body needs a non-empty 'messages' list"


def test_model_from_s3_is_fetched_once(s3, tmp_path, monkeypatch):
    from pipelines.model_fetch import local_model
    from pipelines.spec import StorageSpec
    from tests.pipelines.conftest import put
    endpoint, fs = s3
    files = {"config.json": b'{"model_type": "qwen3_5_moe"}', "model.safetensors": bytes(range(256)),
             "sub/extra.txt": b"x"}                  # the copy, not loading, is under test here
    for name, data in files.items():
        put(fs, f"corpus/models/m/{name}", data)
    monkeypatch.setenv("DELTARAY_CACHE", str(tmp_path))
    storage = StorageSpec(endpoint_url=endpoint)
    path = local_model("s3://corpus/models/m/", storage)
    assert path.startswith(str(tmp_path / "models"))
    assert {n: (tmp_path / path / n).read_bytes() for n in files} == files
    fs.delete_dir("corpus/models/m")                     # a second call reuses the local copy
    assert local_model("s3://corpus/models/m/", storage) == path
    with pytest.raises(FileNotFoundError, match="no config.json"):
        local_model("s3://corpus/models/nothing/", storage)


def test_a_row_that_crashes_the_engine_becomes_an_error_row(chat_replica, monkeypatch):
    from cluster.engine import SamplingParams
    rep = with_task(chat_replica, kind="completion")
    engine, real_step = rep.llm.engine, rep.llm.engine.step

    def step():
        if any("POISON" in (r.prompt or "") for r in engine.requests.values()):
            raise RuntimeError("boom")
        return real_step()
    monkeypatch.setattr(engine, "step", step)
    got = rows(rep(batch([record(0, "Good one"), record(1, "POISON row"), record(2, "Fine")])))
    monkeypatch.undo()
    assert got[1]["error"] == "engine failed on this row: RuntimeError: boom"
    want = rep.llm.generate(["Good one", "Fine"], SamplingParams(max_tokens=5, temperature=0.0))
    assert [got[0]["text"], got[2]["text"]] == [o.outputs[0].text for o in want]
    assert not engine.has_unfinished() and not engine.requests
