"""A chat request as the engine's prompt: messages through the chat template, images checked.

Tool results (`tool` messages) and earlier assistant `tool_calls` are rendered back by the
Qwen3.5 template. A named `tool_choice` (or `required`) is enforced by starting the assistant
turn with the call itself ("<tool_call>\n<function=NAME>\n"), with thinking closed first; the
parser is then given that same start so the output parses as a whole call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cluster.api import APIError, ChatCompletionRequest, ImagePart, Message
from cluster.image_source import ImageSource, check_image_url
from cluster.serve_config import ServeConfig


@dataclass
class ChatPrompt:
    text: str
    token_ids: list[int]
    thinking: bool                      # split <think> from the output
    tools: list[dict] | None            # parse tool calls with these schemas (None: no parsing)
    tool_prefix: str = ""               # forced call start, already in the prompt
    images: list[ImageSource] = field(default_factory=list)

    def engine_prompt(self) -> dict:
        prompt = {"prompt": self.text, "prompt_token_ids": self.token_ids}
        if self.images:
            prompt["images"] = [image.data or image.url for image in self.images]
        return prompt


def render_content(message: Message, where: str, config: ServeConfig,
                   images: list[ImageSource]) -> str | list[dict] | None:
    """Template-ready content; image parts are checked against the URL policy and collected."""
    if not isinstance(message.content, list):
        return message.content
    parts = []
    for j, part in enumerate(message.content):
        if isinstance(part, ImagePart):
            param = f"{where}.content.{j}.image_url.url"
            images.append(check_image_url(part.image_url.url, param, config.allowed_s3_buckets,
                                          config.allowed_image_url_prefixes))
            parts.append({"type": "image"})
        else:
            parts.append({"type": "text", "text": part.text})
    return parts


def render_message(message: Message, where: str, config: ServeConfig,
                   images: list[ImageSource]) -> dict:
    role = "system" if message.role == "developer" else message.role
    out = {"role": role, "content": render_content(message, where, config, images)}
    if message.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": c.function.model_dump()}
                             for c in message.tool_calls]
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    return out


def forced_call(request: ChatCompletionRequest, tools: list[dict]) -> str:
    """The text that opens the assistant turn for a named or required tool_choice, else ""."""
    names = [t["function"]["name"] for t in tools]
    if request.tool_choice == "required":
        if not names:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return "<tool_call>\n<function="
    name = request.forced_function
    if name is None:
        return ""
    if name not in names:
        raise APIError(400, f"tool_choice names function {name!r}, which is not in tools",
                       param="tool_choice")
    return f"<tool_call>\n<function={name}>\n"


def build_chat_prompt(request: ChatCompletionRequest, tokenizer, config: ServeConfig,
                      accepts_images: bool) -> ChatPrompt:
    images: list[ImageSource] = []
    messages = [render_message(m, f"messages.{i}", config, images)
                for i, m in enumerate(request.messages)]
    if images and not accepts_images:
        raise APIError(400, f"model {config.model_name!r} does not accept images",
                       param="messages", code="images_not_supported")
    tools = [t.model_dump(exclude_none=True) for t in request.tools or []]
    use_tools = bool(tools) and request.tool_choice != "none"
    prefix = forced_call(request, tools) if use_tools else ""
    thinking = request.enable_thinking and not prefix
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools if use_tools else None,
                                             add_generation_prompt=True,
                                             enable_thinking=thinking)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    text += prefix
    return ChatPrompt(text, tokenizer.encode(text), thinking, tools if use_tools else None,
                      prefix, images)
