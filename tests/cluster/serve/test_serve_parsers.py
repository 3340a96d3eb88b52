"""The pure parts of the server: tool-call parser, <think> splitter, image URL policy, API keys,
serve config, admission. Random weights never write tool calls or reasoning, so the parsers are
tested here on crafted model outputs; the HTTP path for them is in test_serve_app.py."""
from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from PIL import Image

from cluster.admission import Admission
from cluster.api import APIError
from cluster.auth import APIKeys, load_keys
from cluster.image_source import check_image_url
from cluster.reasoning import ReasoningStream, split_reasoning
from cluster.serve_config import ServeConfig
from cluster.tool_parser import ToolCallStream, merge_tool_deltas, parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "units": {"type": "object"}}}}}]
CALLS = ("I will look.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n"
         "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=units>\n{\"t\": \"C\"}\n"
         "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n"
         "<parameter=city>\n42\n</parameter>\n</function>\n</tool_call>")


def stream_pieces(text: str, size: int):
    return [text[i:i + size] for i in range(0, len(text), size)]


def run_tool_stream(text: str, size: int, prefix: str = ""):
    stream, content, deltas = ToolCallStream(TOOLS, prefix), "", []
    for piece in stream_pieces(text, size) + [""]:
        c, d = stream.feed(piece, final=piece == "")
        content, deltas = content + c, deltas + d
    return content, merge_tool_deltas(deltas), deltas


def test_tool_calls_parse_with_schema_types():
    content, calls = parse_tool_calls(CALLS, TOOLS)
    assert content == "I will look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "New\nYork", "days": 3,
                                                             "units": {"t": "C"}}
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "42"}   # string stays text
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 64])
def test_streamed_tool_calls_equal_whole_parse(size):
    whole_content, whole_calls = parse_tool_calls(CALLS, TOOLS)
    content, calls, deltas = run_tool_stream(CALLS, size)
    assert content == whole_content
    assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]
    names = [d for d in deltas if "id" in d]
    assert [d["index"] for d in names] == [0, 1] and len(deltas) > 2   # arguments come in pieces


def test_text_without_calls_is_content_unchanged():
    for text in ("plain answer", "a <tool but not a call\n\n", "x < y and <tool_cal", ""):
        assert parse_tool_calls(text, TOOLS) == (text, [])
        assert run_tool_stream(text, 2)[:2] == (text, [])


def test_unclosed_call_and_forced_prefix():
    content, calls = parse_tool_calls("<tool_call>\n<function=get_weather>\n<parameter=days>\n"
                                      "7\n</parameter>\n", TOOLS)
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"days": 7}
    content, calls = parse_tool_calls("<parameter=city>\nRome\n</parameter>\n</function>",
                                      TOOLS, prefix="<tool_call>\n<function=get_weather>\n")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}


THOUGHT = "<think>\nStep one.\n\nStep two.\n</think>\n\nThe answer is 4.\n"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_reasoning_stream_equals_whole_split(size):
    assert split_reasoning(THOUGHT, True) == ("Step one.\n\nStep two.", "The answer is 4.\n")
    stream, reasoning, content = ReasoningStream(True), "", ""
    for piece in stream_pieces(THOUGHT.removeprefix("<think>\n"), size) + [""]:
        r, c = stream.feed(piece, final=piece == "")
        reasoning, content = reasoning + r, content + c
    assert (reasoning, content) == ("Step one.\n\nStep two.", "The answer is 4.\n")


def test_reasoning_edge_cases():
    assert split_reasoning("still thinking", True) == ("still thinking", "")
    assert split_reasoning("no think here </think> x", False) == (None, "no think here </think> x")
    assert split_reasoning("</think>\n\nonly content", True) == (None, "only content")


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_image_url_policy():
    ok = check_image_url(png_data_url(), "p", [], [])
    assert ok.data.startswith(b"\x89PNG")
    assert check_image_url("s3://good/a.png", "p", ["good"], []).data is None
    assert check_image_url("https://img.example.com/a.png", "p", [],
                           ["https://img.example.com/"]).data is None
    refused = ["s3://bad/a.png", "https://img.example.com.evil.org/a.png",
               "http://169.254.169.254/latest/meta-data", "file:///etc/passwd",
               "data:image/png;base64,not-base64!", "data:text/plain;base64,aGk=",
               "data:image/png;base64," + base64.b64encode(b"not an image").decode()]
    for url in refused:
        with pytest.raises(APIError) as e:
            check_image_url(url, "messages.0.content.1.image_url.url", ["good"],
                            ["https://img.example.com/"])
        assert e.value.status == 400 and e.value.param == "messages.0.content.1.image_url.url"


def test_api_keys(tmp_path, monkeypatch):
    (tmp_path / "keys").write_text("file-key\n\n")
    monkeypatch.setenv("KEYS_VAR", "a, b")
    keys = APIKeys(load_keys("KEYS_VAR", str(tmp_path / "keys")))
    for good in ("Bearer a", "Bearer b", "bearer file-key"):
        keys.check(good)
    for bad in (None, "", "Bearer", "Bearer c", "Basic a", "Bearer a b"):
        with pytest.raises(APIError) as e:
            keys.check(bad)
        assert e.value.status == 401
    APIKeys([]).check(None)        # none configured: open


def test_serve_config_validation_and_serve_config():
    with pytest.raises(ValueError, match="ep_size"):
        ServeConfig(ep_size=0)
    assert ServeConfig(ep_size=2, num_gpus=1).deployment_options()["ray_actor_options"][
        "num_gpus"] == 0                      # the GPUs are the ranks', not the coordinator's
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValueError, match="path after the host"):
        ServeConfig(allowed_image_url_prefixes=["https://example.com"])
    config = ServeConfig(model="/ckpt/qwen", autoscaling={"max_replicas": 3}, port=9000)
    assert config.model_name == "qwen"
    app = config.to_serve_config()["applications"][0]
    deployment = app["deployments"][0]
    assert app["import_path"] == "cluster.serve_app:build_app"
    assert ServeConfig.model_validate(app["args"]) == config
    assert deployment["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in deployment
    assert deployment["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}


def test_admission_queues_then_refuses():
    async def scenario():
        admission = Admission(max_ongoing=1, max_queued=1, retry_after=2)
        await admission.enter()                        # runs
        waiter = asyncio.create_task(admission.enter())  # queues
        await asyncio.sleep(0)
        with pytest.raises(APIError) as e:
            await admission.enter()
        assert e.value.status == 503 and e.value.retry_after == 2
        admission.leave()
        await waiter                                   # got the place
        admission.leave()
        await admission.enter()                        # normal service again
    asyncio.run(scenario())
