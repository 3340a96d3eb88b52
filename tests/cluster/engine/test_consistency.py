"""Continuous batching must not change greedy results: a crowded batch with a tiny token budget
and few KV blocks (chunked prefill + preemption) equals each prompt alone, and both equal the
argmax of a full forward over the generated text (teacher forcing from an empty cache)."""
from __future__ import annotations

import random

from cluster.engine import SamplingParams
from tests.cluster.engine.conftest import full_forward_logits, run_all


def prompts_and_limits(count: int = 20, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 200000) for _ in range(rng.randint(1, 40))] for _ in range(count)]
    limits = [rng.randint(1, 8) for _ in range(count)]
    return prompts, limits


def test_crowded_batch_equals_alone_and_full_forward(tiny):
    prompts, limits = prompts_and_limits()
    crowded = tiny.engine(num_blocks=14, block_size=4, max_num_seqs=6, max_num_batched_tokens=12)
    for i, (p, m) in enumerate(zip(prompts, limits)):
        crowded.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    together = run_all(crowded)
    preemptions = crowded.scheduler.num_preemptions
    assert preemptions > 0, "the settings should force preemption"
    assert crowded.cache.num_free_blocks == crowded.cache.num_blocks

    roomy = tiny.engine(max_num_seqs=4, max_num_batched_tokens=64, kv_cache_memory=1 << 22)
    for i, (p, m) in enumerate(zip(prompts, limits)):
        roomy.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        alone = run_all(roomy)[str(i)].outputs[0].token_ids
        got = together[str(i)].outputs[0].token_ids
        assert got == alone, f"prompt {i}: batched {got} != alone {alone}"
        assert len(got) == m
        logits_TV = full_forward_logits(tiny.model, p + got)
        reference = logits_TV[len(p) - 1:-1].argmax(-1).tolist()
        assert got == reference, f"prompt {i}: engine {got} != full-forward argmax {reference}"
