"""Text side of the Qwen3.5 processor: tokenizer and chat template.

The tokenizer is the checkpoint's own `tokenizer.json`, loaded as-is with the `tokenizers`
library (never rebuilt from vocab/merges: that drops the `ignore_merges` flag Qwen3.5 needs).
The chat template is the checkpoint's (chat_template.jinja, else tokenizer_config.json), else the
built-in Qwen3.5 ChatML template below. Templates are untrusted input: they run in jinja2's
immutable sandbox, and see only plain data (dicts, lists, strings, numbers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

# Renders the same strings as Qwen3.5's own chat_template.jinja (Apache-2.0): ChatML turns;
# tools listed as JSON in the system turn, called in the Qwen3-Coder XML format; tool results
# grouped into one user turn; reasoning kept only for turns after the last real user query;
# images/videos as vision placeholders; thinking on unless enable_thinking is false.
CHAT_TEMPLATE = r"""{%- set vision = namespace(images=0, videos=0) %}
{%- macro render_content(content, count_vision, in_system=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for part in content %}
            {%- if 'image' in part or 'image_url' in part or part.type == 'image' %}
                {%- if in_system %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if count_vision %}
                    {%- set vision.images = vision.images + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ vision.images ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in part or part.type == 'video' %}
                {%- if in_system %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if count_vision %}
                    {%- set vision.videos = vision.videos + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ vision.videos ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in part %}
                {{- part.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is not none and content is defined %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- set system_text = '' %}
{%- if messages[0].role == 'system' %}
    {%- set system_text = render_content(messages[0].content, false, true)|trim %}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' ~ (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n'
        '\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\n'
        'value_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\n'
        'that can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n'
        '\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n'
        '- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n'
        '- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n'
        '</IMPORTANT>' }}
    {%- if system_text %}
        {{- '\n\n' + system_text }}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' }}
{%- endif %}
{#- The last user turn that is a real query (not only tool responses): reasoning of assistant
    turns after it is kept, reasoning before it is dropped. #}
{%- set query = namespace(index=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set text = render_content(message.content, false)|trim %}
        {%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) %}
            {%- set query.index = loop.index0 %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if query.index < 0 %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > query.index %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning|trim + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for call in message.tool_calls %}
                {%- set call = call.function if call.function is defined else call %}
                {%- if not loop.first %}
                    {{- '\n' }}
                {%- elif content|trim %}
                    {{- '\n\n' }}
                {%- endif %}
                {{- '<tool_call>\n<function=' + call.name + '>\n' }}
                {%- if call.arguments is defined %}
                    {%- for name, value in call.arguments|items %}
                        {%- if value is mapping or (value is sequence and value is not string) %}
                            {%- set value = value | tojson %}
                        {%- endif %}
                        {{- '<parameter=' + name + '>\n' ~ value ~ '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.previtem and loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""


def raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """HF's `tojson`: plain json.dumps (jinja's own escapes <, >, & and sorts keys)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class GenerationBlock(jinja2.ext.Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` tags; render the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class TemplateSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, but an unsafe attribute (`x.__class__`) fails at once instead of quietly
    rendering as an empty Undefined."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                            "object is unsafe")


def compile_template(source: str) -> jinja2.Template:
    env = TemplateSandbox(trim_blocks=True, lstrip_blocks=True,
                          extensions=[jinja2.ext.loopcontrols, GenerationBlock])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


def plain(value):
    """Plain template data: dicts, lists, strings, numbers, None.

    Anything else (a PIL image in an image part, say) becomes a short placeholder string, so an
    untrusted template can test for its presence but cannot call its methods.
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "model_dump"):
        return plain(value.model_dump())
    return f"<{type(value).__name__}>"


def parse_tool_arguments(call: dict) -> dict:
    """OpenAI clients send `function.arguments` as a JSON string; templates need a mapping."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call arguments are not valid JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise ValueError("tool call arguments must be a JSON object")
        function["arguments"] = parsed
    return call


def template_messages(messages) -> list[dict]:
    """Plain copies of the messages with tool-call arguments as mappings."""
    copies = plain(list(messages))
    for message in copies:
        if not isinstance(message, dict):
            raise ValueError(f"each message must be a mapping, got {message!r}")
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict):
                parse_tool_arguments(call)
    return copies


def pick_template(config_template, tools) -> str | None:
    """tokenizer_config's chat_template is a string, or a list of named templates."""
    if config_template is None or isinstance(config_template, str):
        return config_template
    named = {t["name"]: t["template"] for t in config_template}
    if tools and "tool_use" in named:
        return named["tool_use"]
    return named.get("default")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


class Tokenizer:
    """A checkpoint's tokenizer.json plus its chat template.

    vocab_size counts every id (248,077 for Qwen3.5: 248,044 BPE ranks + 33 added tokens).
    special_ids holds the ids of added tokens flagged special (what skip_special_tokens drops);
    Qwen3.5's markup tokens (<think>, <tool_call>, ...) are added tokens but not special.
    """

    def __init__(self, backend: BackendTokenizer, config: dict, chat_template: str | None = None):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template or CHAT_TEMPLATE
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.added_tokens = {t.content: i for i, t in added.items()}
        self.special_ids = {i for i, t in added.items() if t.special}
        self.eos_token_id = self.token_to_id(config.get("eos_token"))
        self.pad_token_id = self.token_to_id(config.get("pad_token"))
        self._compiled = {}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        config = read_json(path / "tokenizer_config.json")
        jinja_file = path / "chat_template.jinja"
        template = jinja_file.read_text(encoding="utf-8") if jinja_file.exists() else None
        return cls(backend, config, template or config.get("chat_template"))

    def token_to_id(self, token) -> int | None:
        if isinstance(token, dict):  # tokenizer_config may hold an AddedToken dict
            token = token.get("content")
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def template(self, tools) -> jinja2.Template:
        source = pick_template(self.chat_template, tools)
        if source is None:
            raise ValueError("tokenizer_config.json names no usable chat template")
        if source not in self._compiled:
            self._compiled[source] = compile_template(source)
        return self._compiled[source]

    def special_token_strings(self) -> dict:
        keys = ("bos_token", "eos_token", "pad_token", "unk_token")
        return {k: v.get("content") if isinstance(v, dict) else v
                for k, v in self.config.items() if k in keys}

    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True,
                            enable_thinking: bool = True, **kwargs) -> str:
        """The prompt string for `messages` (and `tools`), as the checkpoint's template renders it.

        Extra kwargs (add_vision_id, ...) reach the template as variables. Template errors,
        including sandbox violations, raise ValueError.
        """
        template = self.template(tools)
        variables = {**self.special_token_strings(), **plain(kwargs)}
        variables.update(messages=template_messages(messages), tools=plain(tools),
                         add_generation_prompt=add_generation_prompt,
                         enable_thinking=enable_thinking)
        try:
            return template.render(**variables)
        except (jinja2.TemplateError, TypeError) as e:
            raise ValueError(f"chat template error: {e}") from e
