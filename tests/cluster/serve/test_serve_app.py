"""The HTTP layer for what random weights cannot produce: tool calls, reasoning, a dead engine.

SUBSTITUTE: the replica here is `ScriptedReplica`, which "generates" a fixed text token by token
(real tokenizer, real RequestOutput objects) instead of running the model, because a random-
weight model never writes <tool_call> or </think> blocks. Everything else (the FastAPI app,
parsers, SSE framing, tool-message rendering through the real chat template) is the real code.
The real model behind real Ray Serve is tested in test_serve_http.py.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cluster.engine import CompletionOutput, RequestOutput
from cluster.local_replica import ReplicaDead, ReplicaStats
from cluster.serve_app import create_app
from cluster.serve_config import ServeConfig
from model.processor import Tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALL = ("Checking.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")


class ScriptedReplica:
    """Answers every request with `script`, one token per step; records the prompts it got."""

    def __init__(self, tokenizer, script: str):
        self.tokenizer, self.script = tokenizer, script
        self.max_model_len, self.accepts_images, self.dead = 4096, False, False
        self.prompts: list[str] = []

    async def generate(self, prompt, params, request_id):
        self.prompts.append(prompt["prompt"])
        ids = self.tokenizer.encode(self.script)
        for i in range(1, len(ids) + 1):
            await asyncio.sleep(0)
            done = i == len(ids)
            delta = self.tokenizer.decode(ids[i - 1:i])
            out = CompletionOutput(0, self.tokenizer.decode(ids[:i]), ids[:i], None, None,
                                   "stop" if done else None, None, delta, ids[i - 1:i])
            yield RequestOutput(request_id, prompt["prompt"], prompt["prompt_token_ids"], None,
                                [out], done)

    def stats(self):
        return ReplicaStats(0, 0, 1, 1, 1, 1)

    def check_health(self):
        if self.dead:
            raise ReplicaDead("the engine failed: boom")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint)


def call(replica, path: str, body: dict | None = None, method: str = "POST") -> httpx.Response:
    async def go():
        app = create_app(ServeConfig(api_key_env=None, served_model_name="tiny"), replica)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as client:
            return await client.request(method, path, json=body)
    return asyncio.run(go())


def events(response: httpx.Response) -> list[dict]:
    """SSE chunks, checking the exact framing: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`."""
    text = response.text
    assert text.endswith("data: [DONE]\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames)
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]


def test_tool_calls_whole_and_streamed(tokenizer):
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS,
            "chat_template_kwargs": {"enable_thinking": False}}
    replica = ScriptedReplica(tokenizer, CALL)
    whole = call(replica, "/v1/chat/completions", body).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    assert whole["message"]["content"] == "Checking."
    [tool_call] = whole["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert "<tools>" in replica.prompts[0] and '"get_weather"' in replica.prompts[0]

    chunks = events(call(replica, "/v1/chat/completions", {**body, "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content", "") for d in deltas)
    tool_deltas = [t for d in deltas for t in d.get("tool_calls", [])]
    assert content == "Checking."
    assert tool_deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(t["function"]["arguments"] for t in tool_deltas)
    assert json.loads(arguments) == {"city": "Paris", "days": 2} and len(tool_deltas) > 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_and_named(tokenizer):
    replica = ScriptedReplica(tokenizer, CALL)
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
    message = call(replica, "/v1/chat/completions", {**body, "tool_choice": "none"}).json()
    assert "<tools>" not in replica.prompts[-1]
    assert "tool_calls" not in message["choices"][0]["message"]
    replica.script = "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = call(replica, "/v1/chat/completions", {**body, "tool_choice": named}).json()["choices"][0]
    assert replica.prompts[-1].endswith("<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n")
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    bad = call(replica, "/v1/chat/completions",
               {**body, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_tool_result_round_trip_renders(tokenizer):
    replica = ScriptedReplica(tokenizer, "It is sunny.")
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    response = call(replica, "/v1/chat/completions", {"messages": messages, "tools": TOOLS})
    assert response.status_code == 200
    assert replica.prompts[-1] == tokenizer.apply_chat_template(
        [messages[0], {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "content": "sunny, 21C"}], tools=TOOLS)
    assert ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            in replica.prompts[-1])
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in replica.prompts[-1]
    bad = [*messages[:1], {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]
    assert call(replica, "/v1/chat/completions", {"messages": bad}).status_code == 400


def test_reasoning_content_whole_and_streamed(tokenizer):
    replica = ScriptedReplica(tokenizer, "Two plus two.\n</think>\n\nFour.")
    body = {"messages": [{"role": "user", "content": "2+2?"}]}
    message = call(replica, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "Two plus two." and message["content"] == "Four."
    assert replica.prompts[-1].endswith("<|im_start|>assistant\n<think>\n")
    chunks = events(call(replica, "/v1/chat/completions", {**body, "stream": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Two plus two."
    assert "".join(d.get("content", "") for d in deltas) == "Four."
    assert not any("reasoning_content" in d and "content" in d and d["content"] for d in deltas[1:2])
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    message = call(replica, "/v1/chat/completions", off).json()["choices"][0]["message"]
    assert message["reasoning_content"] is None and "</think>" in message["content"]
    bad = call(replica, "/v1/chat/completions", {**body, "chat_template_kwargs": {"enable_thinking": "yes"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs.enable_thinking"


def test_health_503_when_engine_dead(tokenizer):
    replica = ScriptedReplica(tokenizer, "x")
    assert call(replica, "/health", method="GET").status_code == 200
    replica.dead = True
    response = call(replica, "/health", method="GET")
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
