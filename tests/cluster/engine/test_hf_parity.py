"""Engine output == `transformers` on tiny Qwen3.5-MoE, Qwen3.5 dense and Qwen3-Next checkpoints
written by `save_pretrained`: greedy tokens equal `generate`, prompt logprobs equal the
log-softmax of the reference logits. Prompts go through a batch with chunked prefill."""
from __future__ import annotations

import shutil

import pytest
import torch

from cluster.engine import LLM, SamplingParams
from tests.model.hf_reference import hf_model

KINDS = ["moe", "dense", "next"]
PROMPTS = [[7, 300, 12, 45, 99, 500, 3, 18, 260, 77, 1, 2, 3, 4, 5, 6, 7, 8, 9],
           [400], [11, 22, 33, 44, 55, 66, 77]]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory, tiny_checkpoint):
    ref = hf_model(request.param, seed=10 + KINDS.index(request.param))
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    out = tmp_path_factory.mktemp(f"engine-hf-{request.param}")
    ref.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):     # ids < 512 decode the same
        shutil.copy(tiny_checkpoint / name, out / name)
    llm = LLM(str(out), max_num_seqs=4, max_num_batched_tokens=8, kv_cache_memory=4 << 20)
    return ref, llm


def test_greedy_matches_generate_and_prompt_logprobs_match(pair):
    ref, llm = pair
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(PROMPTS, params)
    for ids, out in zip(PROMPTS, outs):
        with torch.no_grad():
            expect = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            logprobs_TV = torch.log_softmax(ref(torch.tensor([ids]), use_cache=False).logits[0], -1)
        assert out.outputs[0].token_ids == expect
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        for t in range(1, len(ids)):
            entry = out.prompt_logprobs[t]
            assert abs(entry[ids[t]] - logprobs_TV[t - 1, ids[t]].item()) < 1e-4
            assert int(logprobs_TV[t - 1].argmax()) in entry
