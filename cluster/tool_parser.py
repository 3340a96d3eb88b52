"""Parse Qwen3.5 tool-call blocks out of generated text into OpenAI `tool_calls`.

Qwen3.5 calls tools in the Qwen3-Coder XML form its chat template teaches:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are raw text; each is converted with the tool's JSON schema (a "string"
parameter stays text, anything else is read as JSON when it parses). The streaming parser
sends the function name as soon as `<function=…>` is complete and the arguments JSON one
parameter at a time, so the concatenated `arguments` deltas are exactly the final JSON.
The whole-text parse runs the same parser over the whole text, so both always agree.
"""
from __future__ import annotations

import json
import re
import uuid

from cluster.reasoning import held_back

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
FUNCTION_END = re.compile(r"\s*</function>")
CALL_END = re.compile(r"\s*</tool_call>")


def parameter_types(tools: list[dict] | None) -> dict[str, dict[str, str]]:
    """{function name: {parameter name: JSON-schema type}} from OpenAI `tools`."""
    types = {}
    for tool in tools or []:
        function = tool.get("function") or {}
        props = (function.get("parameters") or {}).get("properties") or {}
        types[function.get("name")] = {p: (s or {}).get("type", "string") if isinstance(s, dict)
                                       else "string" for p, s in props.items()}
    return types


def convert_value(raw: str, kind) -> object:
    """A parameter's raw text as the JSON value its schema type asks for."""
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Feed text deltas; get back (content delta, [OpenAI tool-call deltas])."""

    def __init__(self, tools: list[dict] | None, prefix: str = ""):
        self.types = parameter_types(tools)
        self.buffer = prefix          # a forced call start (named tool_choice) goes in here
        self.in_call = False
        self.name: str | None = None
        self.num_args = 0
        self.index = -1               # tool call index, -1 before the first
        self.held_space = ""          # whitespace that only counts as content if text follows

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        self.buffer += delta
        content, calls = "", []
        while True:
            step = self.step_call(calls) if self.in_call else self.step_content(final)
            if step is None:
                break
            content += step
        if final:
            content += self.finish(calls)
        return content, calls

    def step_content(self, final: bool) -> str | None:
        """Content up to the next <tool_call> (held back while the tag may still be forming)."""
        start = self.buffer.find(CALL_OPEN)
        if start < 0:
            keep = 0 if final else held_back(self.buffer, CALL_OPEN)
            text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
            return self.content(text, hold=not final) or None
        text, self.buffer = self.buffer[:start], self.buffer[start + len(CALL_OPEN):]
        self.in_call, self.name, self.num_args = True, None, 0
        text, self.held_space = (self.held_space + text).rstrip(), ""
        return text if self.index < 0 else ""

    def content(self, text: str, hold: bool) -> str:
        """Trailing whitespace waits: before a tool call it is dropped, before text it is kept."""
        text = self.held_space + text
        stripped = text.rstrip() if hold else text
        self.held_space = text[len(stripped):]
        return stripped if self.index < 0 or stripped.strip() else ""

    def step_call(self, calls: list[dict]) -> str | None:
        """One complete piece of a call: its name, a parameter, </function> or </tool_call>."""
        if self.name is None:
            return self.step_name(calls)
        if self.name == "":
            return self.step_call_end()
        return self.step_arguments(calls)

    def step_name(self, calls: list[dict]) -> str | None:
        match = FUNCTION.match(self.buffer)
        if match is None:
            return None
        self.name, self.index = match.group(1).strip(), self.index + 1
        calls.append({"index": self.index, "id": new_call_id(), "type": "function",
                      "function": {"name": self.name, "arguments": ""}})
        self.buffer = self.buffer[match.end():]
        return ""

    def step_arguments(self, calls: list[dict]) -> str | None:
        match = PARAMETER.match(self.buffer)
        if match is not None:
            key = match.group(1).strip()
            value = convert_value(match.group(2), self.types.get(self.name, {}).get(key, "string"))
            piece = json.dumps({key: value}, ensure_ascii=False)[1:-1]
            self.emit_arguments(calls, ("{" if self.num_args == 0 else ", ") + piece)
            self.num_args += 1
            self.buffer = self.buffer[match.end():]
            return ""
        match = FUNCTION_END.match(self.buffer)
        if match is None:
            return None
        self.close_arguments(calls)
        self.buffer = self.buffer[match.end():]
        return ""

    def step_call_end(self) -> str | None:
        match = CALL_END.match(self.buffer)
        if match is None and CALL_CLOSE.startswith(self.buffer.strip()):
            return None                   # </tool_call> may still be forming
        self.buffer = self.buffer[match.end():] if match else self.buffer
        self.in_call = False
        return ""

    def emit_arguments(self, calls: list[dict], text: str) -> None:
        calls.append({"index": self.index, "function": {"arguments": text}})

    def close_arguments(self, calls: list[dict]) -> None:
        self.emit_arguments(calls, "{}" if self.num_args == 0 else "}")
        self.name, self.num_args = "", 0      # "" = this call's arguments are closed

    def finish(self, calls: list[dict]) -> str:
        """End of text: close a call left open; an unopened block's text is plain content."""
        if not self.in_call:
            return self.held_space if self.index < 0 else ""
        if self.name:
            self.close_arguments(calls)
            return ""
        return "" if self.name == "" else CALL_OPEN + self.buffer


def merge_tool_deltas(deltas: list[dict]) -> list[dict]:
    """Whole tool calls from their streamed deltas (arguments concatenated)."""
    calls: list[dict] = []
    for delta in deltas:
        if "id" in delta:
            calls.append({"id": delta["id"], "type": "function",
                          "function": {"name": delta["function"]["name"], "arguments": ""}})
        else:
            calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    return calls


def parse_tool_calls(text: str, tools: list[dict] | None, prefix: str = "") -> tuple[str, list[dict]]:
    """(content, OpenAI tool_calls) of a whole completion; `prefix` is a forced call start."""
    stream = ToolCallStream(tools, prefix)
    content, deltas = stream.feed(text, final=True)
    return content, merge_tool_deltas(deltas)
