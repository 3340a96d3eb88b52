"""Real HTTP against a Ray Serve app whose replica is expert-parallel (`ep_size: 2`), with the
tiny model, against the one-process `LLM.chat` (greedy).

One Serve start-up for the module, on 3 logical CPUs: the deployment (the coordinator) takes
0.5 and its placement group of 2 rank actors 1 each. ep_size 4 is left to tests/cluster (four
rank processes loading torch on 2 cores would make this file several times slower).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster.engine import LLM, SamplingParams
from cluster.serve_config import ServeConfig
from tests.ports import free_port

import ray  # noqa: E402  (a declared dependency)

ENGINE = {"max_model_len": 128, "max_num_seqs": 8, "kv_cache_memory": 16 << 20}
MESSAGES = [[{"role": "user", "content": "Hello there"}],
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Name three colours of the rainbow, please."}]]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    from ray import serve

    from cluster.serve_app import build_app
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(model=str(tiny_checkpoint), served_model_name="tiny", engine=ENGINE,
                             api_key_env=None, ep_size=2, num_cpus=0.5)
        serve.run(build_app(config), name="ep", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    """LLM.chat's greedy answer to each of MESSAGES, in one process."""
    llm = LLM(str(tiny_checkpoint), max_model_len=ENGINE["max_model_len"],
              kv_cache_memory=ENGINE["kv_cache_memory"], max_num_seqs=8)
    return llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=6))


def chat(messages, **extra) -> dict:
    return {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 6,
            "chat_template_kwargs": {"enable_thinking": False}, **extra}


def test_the_replica_spans_two_rank_actors(client):
    assert client.get("/health").status_code == 200
    live = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"
            and list(g["bundles"].values()) == [{"CPU": 1.0}] * 2 and g["strategy"] == "PACK"]
    assert len(live) == 1


def test_concurrent_greedy_chats_match_offline(client, offline):
    with ThreadPoolExecutor(len(MESSAGES)) as pool:      # at once: usually one on each rank
        bodies = list(pool.map(lambda m: client.post("/v1/chat/completions", json=chat(m)).json(),
                               MESSAGES))
    for body, out in zip(bodies, offline):
        choice = body["choices"][0]
        assert choice["message"]["content"] == out.outputs[0].text
        assert choice["finish_reason"] == out.outputs[0].finish_reason
        assert body["usage"]["prompt_tokens"] == len(out.prompt_token_ids)
        assert body["usage"]["completion_tokens"] == len(out.outputs[0].token_ids) > 0


def test_streamed_greedy_chat_matches_offline(client, offline):
    response = client.post("/v1/chat/completions", json=chat(MESSAGES[1], stream=True))
    frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == offline[1].outputs[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == offline[1].outputs[0].finish_reason
