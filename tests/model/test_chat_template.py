"""The built-in Qwen3.5 chat template (exact strings), checkpoint templates and the sandbox."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from model.processor import Tokenizer
from model.vocabulary import write_tokenizer_files

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOLS_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": '
              '"Weather for a city.", "parameters": {"type": "object", "properties": '
              '{"city": {"type": "string"}}, "required": ["city"]}}}')
TOOLS_SYSTEM = (
    "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    + TOOLS_JSON + "\n</tools>\n\n"
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
    "</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\n"
    "that can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\n"
    "Reminder:\n- Function calls MUST follow the specified format: an inner <function=...>"
    "</function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your "
    "function call in natural language BEFORE the function call, but NOT after\n- If there is "
    "no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen35_template")
    write_tokenizer_files(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoint_dir)


def test_plain_conversation_thinking_on(tokenizer):
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")


def test_thinking_off(tokenizer):
    messages = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages, enable_thinking=False) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_no_generation_prompt_and_trimmed_content(tokenizer):
    messages = [{"role": "user", "content": "  Hi \n"}, {"role": "assistant", "content": "Yo"}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nYo<|im_end|>\n")


def test_earlier_reasoning_is_dropped(tokenizer):
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nR2\n</think>\n\nA2"},
    ]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n")


def test_tools_tool_calls_and_tool_responses(tokenizer):
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": [1, 2]}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Need tool.",
         "tool_calls": [call, {"name": "get_weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        {"role": "tool", "content": "Snow"},
        {"role": "assistant", "content": "Paris sunny, Oslo snow."},
    ]
    assert tokenizer.apply_chat_template(messages, tools=TOOLS) == (
        TOOLS_SYSTEM + "\n\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nNeed tool.\n</think>\n\nChecking.\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n[1, 2]\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nSunny\n</tool_response>\n"
        "<tool_response>\nSnow\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nParis sunny, Oslo snow.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")


def test_tool_call_without_content(tokenizer):
    messages = [{"role": "user", "content": "Go"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "<tool_call>\n<function=f>\n</function>\n</tool_call><|im_end|>\n")


def test_images_and_videos(tokenizer):
    messages = [{"role": "user", "content": [
        {"type": "image", "image": object()},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "video", "video": "clip.mp4"},
        {"type": "text", "text": "What is shown?"},
    ]}]
    vision = ("<|vision_start|><|image_pad|><|vision_end|>" * 2
              + "<|vision_start|><|video_pad|><|vision_end|>")
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>user\n" + vision + "What is shown?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    numbered = tokenizer.apply_chat_template(messages, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in numbered and "Picture 2: " in numbered
    assert "Video 1: <|vision_start|><|video_pad|>" in numbered


def test_rendered_prompt_tokenizes_to_control_ids(tokenizer):
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert ids[0] == 248045 and ids.count(248046) == 1 and ids[-2:] == [248068, 198]


@pytest.mark.parametrize("messages,error", [
    ([], "No messages provided"),
    ([{"role": "system", "content": "s"}], "No user query found"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "beginning"),
    ([{"role": "robot", "content": "q"}, {"role": "user", "content": "q"}], "Unexpected message role"),
    ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "q"}],
     "System message cannot contain images"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
      "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}], "not valid JSON"),
])
def test_bad_conversations_raise_value_error(tokenizer, messages, error):
    with pytest.raises(ValueError, match=error):
        tokenizer.apply_chat_template(messages)


@pytest.fixture(scope="module")
def small_tokenizer_json(tmp_path_factory):
    """A few-token tokenizer.json: the template tests below do not depend on the vocabulary,
    and loading the real 16 MB file per test would dominate their run time."""
    backend = BackendTokenizer(BPE(vocab={"a": 0, "b": 1}, merges=[]))
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True),
                                AddedToken("<|im_end|>", special=True)])
    path = tmp_path_factory.mktemp("small_tokenizer") / "tokenizer.json"
    backend.save(str(path))
    return path


def checkpoint_with(tmp_path, tokenizer_json, source_dir, jinja=None, config_template=None):
    """A checkpoint directory with our tokenizer_config.json minus its chat_template."""
    shutil.copyfile(tokenizer_json, tmp_path / "tokenizer.json")
    config = json.loads((source_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template")
    if config_template is not None:
        config["chat_template"] = config_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return Tokenizer.from_pretrained(tmp_path)


def test_checkpoint_template_overrides_builtin(tmp_path, small_tokenizer_json, checkpoint_dir):
    jinja = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
             "{% if add_generation_prompt %}[{{ eos_token }}]{% endif %}")
    tok = checkpoint_with(tmp_path, small_tokenizer_json, checkpoint_dir, jinja=jinja, config_template="unused")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi[<|im_end|>]"


def test_config_template_and_named_templates(tmp_path, small_tokenizer_json, checkpoint_dir):
    named = [{"name": "default", "template": "D{{ messages|length }}"},
             {"name": "tool_use", "template": "T{{ tools|length }}"}]
    tok = checkpoint_with(tmp_path, small_tokenizer_json, checkpoint_dir, config_template=named)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "D1"
    assert tok.apply_chat_template(messages, tools=TOOLS) == "T1"


def test_without_any_template_the_builtin_is_used(tmp_path, small_tokenizer_json, checkpoint_dir, tokenizer):
    tok = checkpoint_with(tmp_path, small_tokenizer_json, checkpoint_dir)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)


@pytest.mark.parametrize("jinja,error", [
    ("{{ messages.__class__ }}", "'__class__' of 'list' object is unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__' of 'str' object is unsafe"),
    ("{{ raise_exception.__globals__ }}", "'__globals__' of 'function' object is unsafe"),
    ("{% set _ = messages.append(1) %}", "'append' of 'list' object is unsafe"),
    # User objects (a PIL image in an image part) reach the template as placeholder strings.
    ("{{ messages[0].content[0].image.save('x.png') }}", "has no attribute 'save'"),
])
def test_malicious_template_is_blocked(tmp_path, small_tokenizer_json, checkpoint_dir, jinja,
                                       error):
    tok = checkpoint_with(tmp_path, small_tokenizer_json, checkpoint_dir, jinja=jinja)
    messages = [{"role": "user", "content": [{"type": "image", "image": _Image()}]}]
    with pytest.raises(ValueError, match="chat template error: .*" + error):
        tok.apply_chat_template(messages)
    assert not (tmp_path / "x.png").exists()


class _Image:
    """Stands in for a PIL image: the template must not reach its methods."""

    def save(self, path):
        raise AssertionError("template called a method on a user object")


def test_template_syntax_error(tmp_path, small_tokenizer_json, checkpoint_dir):
    tok = checkpoint_with(tmp_path, small_tokenizer_json, checkpoint_dir, jinja="{% for m in messages %}")
    with pytest.raises(ValueError, match="does not compile"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
