"""The OpenAI wire format: request schemas (validated once, here), errors, and sampling settings.

Field names, ranges and defaults follow the OpenAI API; vLLM's extensions (top_k, min_p,
repetition_penalty, chat_template_kwargs, ...) are accepted too. Unknown fields are ignored,
as clients send provider-specific extras; known fields with bad values are a 400 naming the field.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.engine import SamplingParams

MAX_N = 16
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with its status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (`messages.0.content`, ...)."""
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param,
                    code="invalid_value")


class Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- chat messages ---------------------------------------------------------------------------
class ImageURL(Schema):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ImagePart(Schema):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class FunctionCall(Schema):
    name: str
    arguments: str = "{}"


class ToolCall(Schema):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionSpec(Schema):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Schema):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(Schema):
    type: Literal["function"]
    function: dict[str, str]

    @field_validator("function")
    @classmethod
    def has_name(cls, value):
        if not value.get("name"):
            raise ValueError("a named tool_choice needs function.name")
        return value


class StreamOptions(Schema):
    include_usage: bool = False


class ResponseFormat(Schema):
    type: Literal["text"]


# ---- requests --------------------------------------------------------------------------------
class SamplingFields(Schema):
    """The sampling settings chat and completions share."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, value):
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 16 or not all(items):
            raise ValueError("stop takes at most 16 non-empty strings")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=min(self.min_tokens, max_tokens or 2**31),
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def enable_thinking(self) -> bool:
        value = (self.chat_template_kwargs or {}).get("enable_thinking", True)
        if not isinstance(value, bool):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean",
                           param="chat_template_kwargs.enable_thinking", code="invalid_value")
        return value

    @property
    def forced_function(self) -> str | None:
        """The function a named tool_choice forces, else None."""
        return self.tool_choice.function["name"] if isinstance(self.tool_choice, NamedToolChoice) else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def not_empty(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, value):
        if value:
            raise ValueError("suffix is not supported")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (a string, or a list of token ids, each)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)
