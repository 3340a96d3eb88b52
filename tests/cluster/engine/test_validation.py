"""Bad input fails with a clear error before the engine does any work."""
from __future__ import annotations

import pytest

from cluster.engine import RequestError, SamplingError, SamplingParams


@pytest.mark.parametrize("field,value,words", [
    ("temperature", -0.5, "temperature"), ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"),
    ("top_k", -2, "top_k"), ("min_p", 1.5, "min_p"), ("max_tokens", 0, "max_tokens"),
    ("n", 0, "n"), ("repetition_penalty", 0.0, "repetition_penalty"),
    ("presence_penalty", 3.0, "presence_penalty"), ("logprobs", -1, "logprobs"),
    ("stop", [""], "stop"), ("min_tokens", 50, "min_tokens"),
])
def test_invalid_sampling_values_are_rejected(field, value, words):
    with pytest.raises(SamplingError, match=words):
        SamplingParams(**{field: value})


def test_invalid_requests_leave_the_engine_untouched(tiny):
    engine = tiny.engine(max_model_len=64)
    good = SamplingParams(max_tokens=4)
    cases = [([1] * 64, good, "max_model_len"), ([], good, "empty"),
             ([1, 10**9], good, "token ids"), ({"text": "x"}, good, "prompt")]
    for prompt, params, words in cases:
        with pytest.raises(RequestError, match=words):
            engine.add_request("bad", prompt, params)
    params = SamplingParams(max_tokens=4)
    params.temperature = -1.0                     # mutated after construction: re-checked
    with pytest.raises(SamplingError):
        engine.add_request("bad", [1, 2], params)
    assert not engine.has_unfinished() and not engine.requests
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_llm_generate_validates_every_prompt_first(tiny_checkpoint):
    from cluster.engine import LLM
    llm = LLM(str(tiny_checkpoint), max_model_len=32, kv_cache_memory=4 << 20)
    with pytest.raises(RequestError, match="max_model_len"):
        llm.generate([[1, 2, 3], [5] * 40], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()
    out = llm.generate("hello", SamplingParams(max_tokens=2, temperature=0))
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) <= 2
