"""Sampling: filters and penalties against direct computations, seeded reproducibility, greedy
equivalences, stop tokens and stop strings, min_tokens, n, logprobs."""
from __future__ import annotations

import torch

from cluster.engine import SamplingParams
from cluster.engine.sampler import apply_penalties, filter_top_k_top_p_min_p
from cluster.engine.sequence import Sequence
from tests.cluster.engine.conftest import full_forward_logits, run_all

PROMPT = [9707, 11, 1879, 0, 576, 3974, 13876, 38835]


def generate(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params if isinstance(params, SamplingParams) else params[i])
    final = run_all(engine)
    return [final[f"r{i}"] for i in range(len(prompts))]


def test_filters_match_direct_definitions():
    gen = torch.Generator().manual_seed(0)
    logits_V = torch.randn(1000, generator=gen) * 3
    probs_V = torch.softmax(logits_V, -1)
    order = probs_V.argsort(descending=True)
    kept = filter_top_k_top_p_min_p(logits_V, 50, 1.0, 0.0) > float("-inf")
    assert set(kept.nonzero().flatten().tolist()) == set(order[:50].tolist())
    kept = filter_top_k_top_p_min_p(logits_V, 0, 0.7, 0.0) > float("-inf")
    mass_before = probs_V[order].cumsum(0) - probs_V[order]      # smallest prefix reaching 0.7
    expect = set(order[mass_before < 0.7].tolist())
    assert set(kept.nonzero().flatten().tolist()) == expect
    kept = filter_top_k_top_p_min_p(logits_V, 0, 1.0, 0.2) > float("-inf")
    assert set(kept.nonzero().flatten().tolist()) == set((probs_V >= 0.2 * probs_V.max())
                                                         .nonzero().flatten().tolist())
    assert (filter_top_k_top_p_min_p(logits_V, 0, 1e-9, 0.0) > float("-inf")).sum() == 1


def test_penalties_match_vllm_definitions():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    seq = Sequence(0, "r", 0, [1, 2], params, torch.Generator(), detokenizer=None)
    seq.token_ids += [2, 3, 3]                                   # outputs: 2 once, 3 twice
    logits_V = torch.tensor([1.0, 2.0, -2.0, 4.0, 5.0])
    out = apply_penalties(logits_V.clone(), seq)
    expect = torch.tensor([1.0, 1.0, -4.0 - 0.75, 2.0 - 1.0, 5.0])
    torch.testing.assert_close(out, expect)


def test_greedy_equivalents_and_seeded_reproducibility(tiny):
    other = [[5, 6, 7], [100, 200, 300, 400, 500, 600]]
    greedy = generate(tiny.engine(), [PROMPT], SamplingParams(temperature=0, max_tokens=6))[0]
    top1 = generate(tiny.engine(), [PROMPT], SamplingParams(top_k=1, max_tokens=6))[0]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True)
    alone = generate(tiny.engine(), [PROMPT], seeded)[0].outputs[0].token_ids
    crowd = generate(tiny.engine(max_num_batched_tokens=5), other + [PROMPT],
                     [SamplingParams(temperature=1.0, max_tokens=5)] * 2 + [seeded])
    assert crowd[2].outputs[0].token_ids == alone
    reseeded = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=8, ignore_eos=True)
    assert generate(tiny.engine(), [PROMPT], reseeded)[0].outputs[0].token_ids != alone


def test_n_choices_differ_and_logprobs_are_reported(tiny):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, logprobs=2,
                            ignore_eos=True)
    out = generate(tiny.engine(), [PROMPT], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    logits_TV = full_forward_logits(tiny.model, PROMPT + out.outputs[0].token_ids)
    logprobs_TV = torch.log_softmax(logits_TV, -1)
    for j, (tok, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = logprobs_TV[len(PROMPT) - 1 + j]
        assert tok in entry and len(entry) in (2, 3)
        assert abs(entry[tok] - row[tok].item()) < 1e-4
        assert set(row.topk(2).indices.tolist()) <= set(entry)


def test_stop_token_and_min_tokens(tiny):
    base = generate(tiny.engine(), [PROMPT], SamplingParams(temperature=0, max_tokens=8))[0]
    ids = base.outputs[0].token_ids
    stop = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ids[2]])
    out = generate(tiny.engine(), [PROMPT], stop)[0].outputs[0]
    first = ids.index(ids[2])
    assert out.token_ids == ids[:first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == ids[2]
    held = SamplingParams(temperature=0, max_tokens=8, min_tokens=6, stop_token_ids=[ids[0]])
    out = generate(tiny.engine(), [PROMPT], held)[0].outputs[0]
    assert len(out.token_ids) >= 6 and ids[0] not in out.token_ids[:6]


def test_stop_string_across_token_boundary(tiny):
    base = generate(tiny.engine(), [PROMPT], SamplingParams(temperature=0, max_tokens=10))[0]
    ids = base.outputs[0].token_ids
    pieces = [tiny.tokenizer.decode([t]) for t in ids]
    k = next(i for i in range(1, len(pieces) - 1)
             if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2 and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[k][-2:] + pieces[k + 1][:2]          # starts in token k, ends in token k+1
    prefix = "".join(pieces[:k + 1])
    out = generate(tiny.engine(), [PROMPT], SamplingParams(temperature=0, max_tokens=10,
                                                           stop=[stop]))[0].outputs[0]
    expect = base.outputs[0].text[:base.outputs[0].text.index(stop)]
    assert out.text == expect and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.text) <= len(prefix) and out.token_ids == ids[:k + 2]
    kept = generate(tiny.engine(), [PROMPT], SamplingParams(temperature=0, max_tokens=10, stop=[stop],
                                                            include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == expect + stop
