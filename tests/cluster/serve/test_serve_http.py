"""Real HTTP against a real Ray Serve app on a local Ray cluster, with the tiny model.

One Serve start-up for the module: the main app at / (API key required) and a second app with a
tiny queue at /small for the overload test.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

import httpx
import pytest
from PIL import Image

from cluster.engine import LLM, SamplingParams
from cluster.serve_config import ServeConfig
from tests.ports import free_port

KEY = "test-key-123"
HEADERS = {"Authorization": f"Bearer {KEY}"}
ENGINE = {"max_model_len": 128, "max_num_seqs": 32, "kv_cache_memory": 32 << 20}
MAX_BYTES = 64 << 10


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    import ray
    from ray import serve

    from cluster.serve_app import build_app
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text(KEY + "\n")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        main = ServeConfig(model=str(tiny_checkpoint), served_model_name="tiny", engine=ENGINE,
                           api_key_env=None, api_key_file=str(keys), max_ongoing_requests=110,
                           max_queued_requests=10, max_request_bytes=MAX_BYTES, num_cpus=0.5)
        small = ServeConfig(model=str(tiny_checkpoint), served_model_name="tiny", engine=ENGINE,
                            api_key_env=None, max_ongoing_requests=1, max_queued_requests=1,
                            retry_after_s=2, num_cpus=0.5, name="small", route_prefix="/small")
        serve.run(build_app(main), name="main", route_prefix="/")
        serve.run(build_app(small), name="small", route_prefix="/small")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers=HEADERS, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), max_model_len=ENGINE["max_model_len"],
               kv_cache_memory=ENGINE["kv_cache_memory"], max_num_seqs=8)


def sse_events(text: str) -> list[dict]:
    """Exact OpenAI framing: only `data: {json}\\n\\n` frames, then `data: [DONE]\\n\\n`."""
    assert text.endswith("data: [DONE]\n\n") and text.count("data: [DONE]") == 1
    frames = text.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: {") for f in frames[:-2])
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]


def chat(messages, **extra) -> dict:
    return {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 6,
            "chat_template_kwargs": {"enable_thinking": False}, **extra}


HELLO = [{"role": "user", "content": "Hello there"}]


def test_chat_greedy_matches_offline(client, llm):
    body = client.post("/v1/chat/completions", json=chat(HELLO)).json()
    [offline] = llm.chat(HELLO, SamplingParams(temperature=0, max_tokens=6))
    choice = body["choices"][0]
    assert choice["message"]["content"] == offline.outputs[0].text
    assert choice["finish_reason"] == offline.outputs[0].finish_reason
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["usage"] == {"prompt_tokens": len(offline.prompt_token_ids),
                             "completion_tokens": len(offline.outputs[0].token_ids),
                             "total_tokens": len(offline.prompt_token_ids) + len(offline.outputs[0].token_ids)}


def test_chat_stream_framing_and_usage(client, llm):
    response = client.post("/v1/chat/completions", json=chat(
        HELLO, stream=True, stream_options={"include_usage": True}))
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(response.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    [offline] = llm.chat(HELLO, SamplingParams(temperature=0, max_tokens=6))
    assert text == offline.outputs[0].text
    assert chunks[-2]["choices"][0]["finish_reason"] == offline.outputs[0].finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == len(offline.outputs[0].token_ids)


def test_completions_greedy_stream_and_logprobs(client, llm):
    [offline] = llm.generate("The capital of France", SamplingParams(temperature=0, max_tokens=5,
                                                                    logprobs=2))
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "The capital of France",
                                                "temperature": 0, "max_tokens": 5, "logprobs": 2}).json()
    choice = body["choices"][0]
    assert choice["text"] == offline.outputs[0].text and body["object"] == "text_completion"
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["token_logprobs"] == pytest.approx(
        [table[t] for t, table in zip(offline.outputs[0].token_ids, offline.outputs[0].logprobs)],
        abs=1e-4)
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]):
        assert len(top) == 2 and max(top.values()) <= 0
    assert body["usage"]["completion_tokens"] == 5
    streamed = sse_events(client.post("/v1/completions", json={
        "prompt": "The capital of France", "temperature": 0, "max_tokens": 5, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in streamed) == offline.outputs[0].text


def test_n_choices_and_chat_logprobs(client):
    body = client.post("/v1/chat/completions", json=chat(
        HELLO, n=3, temperature=1.0, seed=7, logprobs=True, top_logprobs=3)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    total = 0
    for choice in body["choices"]:
        entries = choice["logprobs"]["content"]
        total += len(entries)
        assert "".join(e["token"] for e in entries) == choice["message"]["content"]
        for e in entries:
            assert len(e["top_logprobs"]) == 3 and e["logprob"] <= 0
            assert e["logprob"] >= e["top_logprobs"][-1]["logprob"] - 1e-6 or e["token"] not in {
                t["token"] for t in e["top_logprobs"]}
    assert body["usage"]["completion_tokens"] == total


def image_url(size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "blue").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def with_image(url, **extra):
    return chat([{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                              {"type": "image_url", "image_url": {"url": url}}]}],
                **extra)


def test_image_data_url_runs_like_offline_chat(client, llm):
    """The tiny preset is a vision-language checkpoint: a data: URL image is decoded, expanded
    to its vision tokens and run; the answer equals LLM.chat with the same content parts."""
    request = with_image(image_url())
    body = client.post("/v1/chat/completions", json=request).json()
    [offline] = llm.chat(request["messages"], SamplingParams(temperature=0, max_tokens=6))
    assert offline.prompt_token_ids.count(llm.model.config.image_token_id) == 64   # 256x256 px
    assert body["choices"][0]["message"]["content"] == offline.outputs[0].text
    assert body["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    streamed = client.post("/v1/chat/completions", json=with_image(image_url(), stream=True))
    text = "".join(c["choices"][0]["delta"].get("content", "")
                   for c in sse_events(streamed.text) if c["choices"])
    assert text == offline.outputs[0].text


def test_images_refused_by_policy(client):
    for url in ("http://169.254.169.254/x.png", "s3://not-allowed/x.png", "file:///etc/passwd"):
        refused = client.post("/v1/chat/completions", json=with_image(url))
        assert refused.status_code == 400, url
        assert refused.json()["error"]["param"] == "messages.0.content.1.image_url.url"
    assert client.get("/health").status_code == 200          # and the engine still serves


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    return error


def test_errors(client, server):
    post = client.post
    error_of(post("/v1/chat/completions", content=b"{not json"), 400)
    assert error_of(post("/v1/chat/completions", json=chat(HELLO, temperature=-1)), 400)["param"] == "temperature"
    assert error_of(post("/v1/chat/completions", json=chat(HELLO, n=0)), 400)["param"] == "n"
    assert error_of(post("/v1/completions", json={"prompt": 5}), 400)["param"].startswith("prompt")
    long = error_of(post("/v1/completions", json={"prompt": "word " * 200}), 400)
    assert long["code"] == "context_length_exceeded" and "128" in long["message"]
    assert re.search(r"prompt has \d{3} tokens", long["message"])
    over = error_of(post("/v1/completions", json={"prompt": "hi", "max_tokens": 500}), 400)
    assert "128" in over["message"] and "500" in over["message"]
    assert error_of(post("/v1/chat/completions", json=chat(HELLO, model="gpt-4")), 404)["param"] == "model"
    error_of(post("/v1/completions", content=b"x" * (MAX_BYTES + 1)), 413)
    error_of(httpx.post(server + "/v1/completions", json={"prompt": "hi"}), 401)
    error_of(httpx.get(server + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error_of(client.get("/v1/nothing"), 404)


def test_models_health_metrics(client, server):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}       # open for probes
    text = httpx.get(server + "/metrics").text
    for name in ("deltaray_requests_total", "deltaray_prompt_tokens_total",
                 "deltaray_generation_tokens_total", "deltaray_time_to_first_token_seconds_bucket",
                 "deltaray_inter_token_latency_seconds_bucket", "deltaray_running_sequences",
                 "deltaray_waiting_sequences", "deltaray_cache_usage"):
        assert name in text, name
    assert metric(text, "deltaray_generation_tokens_total") > 0


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


async def stream_some(client, n_streams: int, n_leave: int) -> list:
    async def one(i):
        body = chat([{"role": "user", "content": f"count {i}"}], stream=True, max_tokens=8,
                    temperature=1.0, ignore_eos=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            text = ""
            async for piece in response.aiter_text():
                text += piece
                if i < n_leave and text.count("data: ") >= 3:
                    return None                  # leave mid-stream: closes the connection
            return sse_events(text)
    return await asyncio.gather(*(one(i) for i in range(n_streams)))


def test_disconnects_abort_and_free_slots(server):
    async def run():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server, headers=HEADERS, timeout=120,
                                     limits=limits) as client:
            return await stream_some(client, 100, 20)
    results = asyncio.run(run())
    finished = [r for r in results if r is not None]
    assert len(finished) == 80
    for chunks in finished:
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.time() + 30
    while True:
        text = httpx.get(server + "/metrics").text
        idle = (metric(text, "deltaray_running_sequences") == 0
                and metric(text, "deltaray_waiting_sequences") == 0
                and metric(text, "deltaray_free_state_slots") == metric(text, "deltaray_state_slots")
                and metric(text, "deltaray_free_kv_blocks") == metric(text, "deltaray_kv_blocks"))
        if idle or time.time() > deadline:
            break
        time.sleep(0.5)
    assert idle, text
    assert metric(text, "deltaray_aborted_requests_total") >= 20


def test_overload_503_with_retry_after_then_service(server):
    async def run():
        async with httpx.AsyncClient(base_url=server + "/small", timeout=120) as client:
            body = chat(HELLO, max_tokens=40, ignore_eos=True)
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body)
                                          for _ in range(8)))
    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected
    for r in rejected:
        assert r.headers["retry-after"] == "2"
        assert r.headers["content-type"].startswith("application/json"), r.text
        error_of(r, 503)
    again = httpx.post(server + "/small/v1/chat/completions", json=chat(HELLO), timeout=60)
    assert again.status_code == 200


class FakeS3:
    """Stands in for s3fs: a dict of objects with s3fs's `info` and `open`."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects

    def info(self, uri: str) -> dict:
        return {"size": len(self.objects[uri])}

    def open(self, uri: str, mode: str):
        return io.BytesIO(self.objects[uri])


def test_allowed_s3_images_run_and_others_are_refused(llm):
    from cluster.engine import RequestError
    from cluster.image_source import MAX_IMAGE_BYTES, AllowedS3
    png = base64.b64decode(image_url().partition(",")[2])
    fake = FakeS3({"s3://imgs/a.png": png, "s3://imgs/big.png": b"x" * (MAX_IMAGE_BYTES + 1),
                   "s3://other/a.png": png})
    llm.engine.image_filesystem = AllowedS3(["imgs"], fake)
    try:
        params = SamplingParams(temperature=0, max_tokens=4)
        prompt = "<|vision_start|><|image_pad|><|vision_end|>"
        [from_s3] = llm.generate({"prompt": prompt, "images": ["s3://imgs/a.png"]}, params)
        [from_bytes] = llm.generate({"prompt": prompt, "images": [png]}, params)
        assert from_s3.outputs[0].token_ids == from_bytes.outputs[0].token_ids
        for uri, why in (("s3://other/a.png", "not allowed"), ("s3://imgs/big.png", "over the image")):
            with pytest.raises(RequestError, match=why):
                llm.generate({"prompt": prompt, "images": [uri]}, params)
    finally:
        llm.engine.image_filesystem = None
