"""Long context: YaRN rope scaling matches transformers (frequencies and whole-model logits past
the original window), and a 32K-token prompt runs through the engine on the tiny preset."""
from __future__ import annotations

import shutil

import pytest
import torch

from cluster.engine import LLM, SamplingParams
from model.config import ModelConfig
from model.rotary import rope_frequencies
from tests.model.hf_reference import MOE, TEXT, randomize_hf_

YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, rope_theta=1e7,
            partial_rotary_factor=0.25, mrope_section=[2, 1, 1], mrope_interleaved=True)


def hf_yarn_model():
    import transformers as tf
    cfg = tf.Qwen3_5MoeTextConfig(**TEXT, **MOE, rope_parameters=dict(YARN))
    cfg._attn_implementation = "eager"
    model = tf.Qwen3_5MoeForCausalLM(cfg).eval()
    model.config._experts_implementation = "eager"
    randomize_hf_(model, seed=3)
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("scaling", [
    dict(factor=4.0, original_max_position_embeddings=262144),        # Qwen3.5's 1M window
    dict(factor=2.0, original_max_position_embeddings=4096, beta_fast=16, truncate=False),
    dict(factor=8.0, original_max_position_embeddings=32768, mscale=1.0, mscale_all_dim=0.5),
])
def test_yarn_frequencies_match_transformers(scaling):
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = dict(rope_type="yarn", rope_theta=1e7, partial_rotary_factor=0.25,
                mrope_section=[11, 11, 10], **scaling)
    hf_cfg = tf.Qwen3_5MoeTextConfig(head_dim=256, max_position_embeddings=1010000,
                                     rope_parameters=rope)
    expect_F, expect_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours = ModelConfig.from_dict(hf_cfg.to_dict())
    assert ours.rope_scaling["rope_type"] == "yarn"
    got_F, got_scale = rope_frequencies(ours)
    torch.testing.assert_close(got_F, expect_F, rtol=1e-6, atol=0)
    assert got_scale == pytest.approx(expect_scale, rel=1e-9) and got_scale != 1.0


def test_yarn_model_matches_transformers_past_the_original_window(tmp_path, tiny_checkpoint):
    ref = hf_yarn_model()
    ref.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    llm = LLM(str(tmp_path), max_num_batched_tokens=64, kv_cache_memory=4 << 20)
    ids = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                             prompt_logprobs=0))[0]
    with torch.no_grad():
        logprobs_TV = torch.log_softmax(ref(torch.tensor([ids]), use_cache=False).logits[0], -1)
        expect = ref.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                              pad_token_id=0)[0, 150:].tolist()
    got = torch.tensor([out.prompt_logprobs[t][ids[t]] for t in range(1, 150)])
    torch.testing.assert_close(got, logprobs_TV[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0],
                               atol=1e-4, rtol=0)
    assert out.outputs[0].token_ids == expect


def test_32k_token_prompt_runs_on_tiny(tiny):
    """Chunked prefill over paged KV: 32K prompt tokens in 8K-token steps, then decoding."""
    tokens, block = 32768, 16
    engine = tiny.engine(num_blocks=tokens // block + 2, max_num_seqs=1, max_num_batched_tokens=8192)
    ids = torch.randint(1000, 240000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("long", ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    steps, most_blocks, final = 0, 0, None
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        most_blocks = max(most_blocks, engine.cache.num_blocks - engine.cache.num_free_blocks)
        final = outs[0] if outs else final
    assert steps == tokens // 8192 + 2              # 4 prefill chunks, 2 decodes
    assert most_blocks == -(-(tokens + 1) // block)
    assert final.finished and len(final.outputs[0].token_ids) == 3
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
