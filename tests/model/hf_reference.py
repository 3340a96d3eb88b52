"""Tiny Hugging Face reference models (transformers is a test-only dependency) and a runner that
drives our model over a single prompt, for parity tests."""
from __future__ import annotations

import math

import torch

from model.batch import ForwardBatch
from model.random_checkpoint import random_value

TEXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
            rms_norm_eps=1e-6, max_position_embeddings=4096)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)
MROPE = dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
             mrope_section=[2, 1, 1], mrope_interleaved=True)


def hf_model(kind: str, seed: int = 0, tie: bool = False, **overrides):
    """A randomised fp32 eager `transformers` causal LM: kind in {moe, dense, next}."""
    import transformers as tf
    if kind == "moe":
        cfg = tf.Qwen3_5MoeTextConfig(**TEXT, **MOE, rope_parameters=dict(MROPE),
                                      tie_word_embeddings=tie, **overrides)
        cls = tf.Qwen3_5MoeForCausalLM
    elif kind == "dense":
        cfg = tf.Qwen3_5TextConfig(**TEXT, intermediate_size=96, rope_parameters=dict(MROPE),
                                   tie_word_embeddings=tie, **overrides)
        cls = tf.Qwen3_5ForCausalLM
    else:
        cfg = tf.Qwen3NextConfig(**TEXT, **MOE, intermediate_size=96, norm_topk_prob=True,
                                 rope_parameters=dict(rope_type="default", rope_theta=1e7,
                                                      partial_rotary_factor=0.25),
                                 tie_word_embeddings=tie, **overrides)
        cls = tf.Qwen3NextForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    if hasattr(model.config, "_experts_implementation"):
        model.config._experts_implementation = "eager"
    randomize_hf_(model, seed)
    return model


def randomize_hf_(model, seed: int) -> None:
    """Every parameter random, norms / A_log / dt_bias included (so (1+w) vs w bugs show)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_value(name, p, gen, scale))


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0]


def full_forward(model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Our model over one prompt in one step: logits for every position [T, V]."""
    n_blocks = (len(ids) + block_size - 1) // block_size
    cache = model.new_cache(num_blocks=n_blocks + 1, block_size=block_size, num_slots=2)
    batch = ForwardBatch.build([len(ids)], [0], [list(range(1, n_blocks + 1))], [1], block_size,
                               logits="all")
    with torch.no_grad():
        return model(torch.tensor(ids), batch, cache)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the logit scale (max |b|)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
