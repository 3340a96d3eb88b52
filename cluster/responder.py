"""Engine outputs as OpenAI response bodies and SSE chunks (chat and text completions).

A chat choice's text goes through the <think> splitter and then the tool-call parser; the
streaming path feeds the same parsers delta by delta, so streamed and whole responses carry
the same reasoning, content and tool calls. SSE framing is exactly OpenAI's:
`data: {json}\n\n` per chunk and `data: [DONE]\n\n` at the end.
"""
from __future__ import annotations

import json
import time
import uuid

from cluster.engine import CompletionOutput, RequestOutput
from cluster.reasoning import ReasoningStream, split_reasoning
from cluster.tool_parser import ToolCallStream, parse_tool_calls


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token id -> its text, for logprobs (a token that is part of a character shows as bytes)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def entry(self, token_id: int, logprob: float) -> dict:
        text = self(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tokens: TokenText, token_ids: list[int], logprobs: list[dict] | None,
                  top: int) -> dict | None:
    """OpenAI chat logprobs: one entry per token with its `top` alternatives."""
    if logprobs is None:
        return None
    content = []
    for token_id, table in zip(token_ids, logprobs):
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        content.append({**tokens.entry(token_id, table[token_id]),
                        "top_logprobs": [tokens.entry(t, lp) for t, lp in best]})
    return {"content": content}


def completion_logprobs(tokens: TokenText, token_ids: list[int], logprobs: list[dict] | None,
                        top: int, offset: int = 0) -> dict | None:
    """Legacy completions logprobs: parallel lists of tokens, logprobs, top maps, text offsets."""
    if logprobs is None:
        return None
    texts = [tokens(t) for t in token_ids]
    offsets = [offset + sum(len(x) for x in texts[:i]) for i in range(len(texts))]
    tops = [{tokens(t): lp for t, lp in sorted(table.items(), key=lambda kv: -kv[1])[:top]}
            for table in logprobs]
    return {"tokens": texts, "token_logprobs": [tb[t] for t, tb in zip(token_ids, logprobs)],
            "top_logprobs": tops, "text_offset": offsets}


def finish_reason(output: CompletionOutput, tool_calls: bool, forced: bool) -> str | None:
    if output.finish_reason is None:
        return None
    return "tool_calls" if tool_calls and not forced else output.finish_reason


class ChatResponder:
    """Builds chat.completion bodies and chat.completion.chunk events for one request."""

    def __init__(self, model: str, prompt, tokenizer, num_logprobs: int | None):
        self.model, self.prompt = model, prompt
        self.tokens, self.top = TokenText(tokenizer), num_logprobs
        self.id, self.created = new_id("chatcmpl"), int(time.time())
        self.streams: dict[int, tuple[ReasoningStream, ToolCallStream | None]] = {}
        self.called: set[int] = set()

    def message(self, output: CompletionOutput) -> tuple[dict, bool]:
        reasoning, content = split_reasoning(output.text, self.prompt.thinking)
        calls = []
        if self.prompt.tools is not None:
            content, calls = parse_tool_calls(content, self.prompt.tools, self.prompt.tool_prefix)
        message = {"role": "assistant", "content": content if content or not calls else None,
                   "reasoning_content": reasoning}
        if calls:
            message["tool_calls"] = calls
        return message, bool(calls)

    def body(self, final: RequestOutput) -> dict:
        choices = []
        for out in final.outputs:
            message, called = self.message(out)
            choices.append({"index": out.index, "message": message,
                            "logprobs": chat_logprobs(self.tokens, out.token_ids, out.logprobs,
                                                      self.top or 0) if self.top is not None else None,
                            "finish_reason": finish_reason(out, called, bool(self.prompt.tool_prefix))})
        completion = sum(len(o.token_ids) for o in final.outputs)
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": choices,
                "usage": usage(len(final.prompt_token_ids), completion)}

    def chunk(self, choices: list[dict], with_usage: bool) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices}
        if with_usage:
            chunk["usage"] = None
        return chunk

    def first_chunks(self, n: int, with_usage: bool) -> list[str]:
        return [sse(self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}], with_usage))
                for i in range(n)]

    def delta(self, out: CompletionOutput) -> dict | None:
        """The delta of one choice this step, or None when it has nothing to say."""
        if out.index not in self.streams:
            tools = None
            if self.prompt.tools is not None:
                tools = ToolCallStream(self.prompt.tools, self.prompt.tool_prefix)
            self.streams[out.index] = (ReasoningStream(self.prompt.thinking), tools)
        reasoning_stream, tool_stream = self.streams[out.index]
        done = out.finish_reason is not None
        reasoning, content = reasoning_stream.feed(out.delta_text, final=done)
        delta, calls = {}, []
        if tool_stream is not None:
            content, calls = tool_stream.feed(content, final=done)
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
            self.called.add(out.index)
        if not delta and not done and not out.delta_token_ids:
            return None
        return delta

    def step_chunks(self, step: RequestOutput, with_usage: bool) -> list[str]:
        events = []
        for out in step.outputs:
            delta = self.delta(out)
            if delta is None:
                continue
            new = len(out.delta_token_ids)
            logprobs = None
            if self.top is not None and new:
                logprobs = chat_logprobs(self.tokens, out.delta_token_ids,
                                         out.logprobs[-new:], self.top)
            reason = finish_reason(out, out.index in self.called, bool(self.prompt.tool_prefix))
            events.append(sse(self.chunk([{"index": out.index, "delta": delta,
                                           "logprobs": logprobs, "finish_reason": reason}],
                                         with_usage)))
        return events

    def usage_chunk(self, final: RequestOutput) -> str:
        completion = sum(len(o.token_ids) for o in final.outputs)
        chunk = self.chunk([], False)
        chunk["usage"] = usage(len(final.prompt_token_ids), completion)
        return sse(chunk)


class CompletionResponder:
    """Builds text_completion bodies and chunks; prompt k's choice j has index k * n + j."""

    def __init__(self, model: str, tokenizer, num_logprobs: int | None, n: int, echo: bool):
        self.model, self.tokens, self.top, self.n, self.echo = model, TokenText(tokenizer), num_logprobs, n, echo
        self.id, self.created = new_id("cmpl"), int(time.time())

    def choice(self, k: int, out: CompletionOutput, text: str, token_ids: list[int],
               logprobs: list[dict] | None, prompt: str) -> dict:
        lp = None
        if self.top is not None:
            lp = completion_logprobs(self.tokens, token_ids, logprobs, self.top,
                                     len(prompt) if self.echo else 0)
        return {"index": k * self.n + out.index, "text": text, "logprobs": lp,
                "finish_reason": out.finish_reason}

    def body(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for k, final in enumerate(finals):
            prompt = (final.prompt or "") if self.echo else ""
            choices += [self.choice(k, o, prompt + o.text, o.token_ids, o.logprobs, prompt)
                        for o in final.outputs]
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": self.totals(finals)}

    def totals(self, finals: list[RequestOutput]) -> dict:
        return usage(sum(len(f.prompt_token_ids) for f in finals),
                     sum(len(o.token_ids) for f in finals for o in f.outputs))

    def chunk(self, choices: list[dict], with_usage: bool) -> dict:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created,
                 "model": self.model, "choices": choices}
        if with_usage:
            chunk["usage"] = None
        return chunk

    def step_chunks(self, k: int, step: RequestOutput, with_usage: bool, first: bool) -> list[str]:
        events = []
        for out in step.outputs:
            new = len(out.delta_token_ids)
            if not out.delta_text and out.finish_reason is None and not new:
                continue
            text = ((step.prompt or "") if self.echo and first else "") + out.delta_text
            logprobs = out.logprobs[-new:] if out.logprobs is not None and new else (
                [] if out.logprobs is not None else None)
            events.append(sse(self.chunk([self.choice(k, out, text, out.delta_token_ids,
                                                      logprobs, "")], with_usage)))
        return events

    def usage_chunk(self, finals: list[RequestOutput]) -> str:
        chunk = self.chunk([], False)
        chunk["usage"] = self.totals(finals)
        return sse(chunk)
