"""The offline API: preset checkpoints built once into the cache, every prompt form, chat."""
from __future__ import annotations

import pytest

from cluster.engine import LLM, SamplingParams
from cluster.engine.llm import resolve_model_dir
from model.config import ConfigError


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTARAY_CACHE", str(root))
        llm = LLM("preset:tiny", kv_cache_memory=4 << 20, max_num_seqs=8)
        assert llm.model_dir == root / "presets" / "tiny"
        written = (llm.model_dir / "config.json").stat().st_mtime_ns
        assert resolve_model_dir("preset:tiny") == llm.model_dir          # reused, not rewritten
        assert (llm.model_dir / "config.json").stat().st_mtime_ns == written
        with pytest.raises(ConfigError, match="unknown preset"):
            resolve_model_dir("preset:nope")
    return llm


def test_prompt_forms_agree(llm):
    text = "The capital of France is"
    ids = llm.tokenizer.encode(text)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate([text, ids, {"prompt": text}, {"prompt_token_ids": ids}], params)
    assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].prompt == text and outs[1].prompt is None
    assert outs[0].outputs[0].text == llm.tokenizer.decode(outs[0].outputs[0].token_ids,
                                                           skip_special_tokens=True)


def test_chat_uses_the_template(llm):
    conversation = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=3))[0]
    rendered = llm.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                 enable_thinking=False)
    assert out.prompt == rendered and out.prompt_token_ids == llm.tokenizer.encode(rendered)
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_engine_never_imports_ray():
    import subprocess
    import sys
    code = "import sys, cluster.engine; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
