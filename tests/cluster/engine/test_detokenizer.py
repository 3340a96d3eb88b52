"""Incremental detokenization never splits a character, and streams the same text as a
one-shot decode; special tokens are skipped when asked."""
from __future__ import annotations

from cluster.engine.detokenizer import Detokenizer


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (byte-level BPE has all 256), so characters span tokens."""
    table = byte_to_unicode()
    return [tokenizer.token_to_id(table[b]) for b in text.encode("utf-8")]


def byte_to_unicode() -> dict[int, str]:
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return table


def test_multibyte_characters_stream_intact(tiny):
    text = "naïve 日本語 😀 ok"
    ids = byte_tokens(tiny.tokenizer, text)
    assert len(ids) == len(text.encode("utf-8"))
    detok = Detokenizer(tiny.tokenizer, [9707], True, stop=[], include_stop=False)
    deltas = []
    for t in ids:
        detok.add_token(t)
        deltas.append(detok.take_delta(finished=False))
    detok.flush()
    deltas.append(detok.take_delta(finished=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == tiny.tokenizer.decode(ids)


def test_special_tokens_skipped_or_kept(tiny):
    special = sorted(tiny.tokenizer.special_ids)[0]
    ids = tiny.tokenizer.encode("Hello") + [special] + tiny.tokenizer.encode(" there")
    for skip in (True, False):
        detok = Detokenizer(tiny.tokenizer, [], skip, stop=[], include_stop=False)
        for t in ids:
            detok.add_token(t)
        detok.flush()
        assert detok.take_delta(True) == tiny.tokenizer.decode(ids, skip_special_tokens=skip)


def test_stop_string_is_held_back_while_streaming(tiny):
    ids = byte_tokens(tiny.tokenizer, "abcSTOPdef")
    detok = Detokenizer(tiny.tokenizer, [], True, stop=["STOP"], include_stop=False)
    streamed, found = "", None
    for t in ids:
        found = detok.add_token(t)
        streamed += detok.take_delta(finished=found is not None)
        if found:
            break
    assert found == "STOP" and streamed == "abc" and "S" not in streamed
