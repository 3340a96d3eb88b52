"""Logit parity with `transformers` (the reference implementation) on tiny random checkpoints
written by `save_pretrained` and read by our loader."""
from __future__ import annotations

import copy

import pytest
import torch

from model.batch import ForwardBatch
from model.checkpoint import load_model, save_checkpoint
from tests.model.hf_reference import full_forward, hf_logits, hf_model, rel_err

TOL = 1e-4        # max |diff| relative to the logit scale, fp32
KINDS = ["moe", "dense", "next"]


def make_pair(kind, tmp_path_factory):
    """(reference HF model, our model loaded from its save_pretrained directory, that dir)."""
    ref = hf_model(kind, seed=KINDS.index(kind))
    out = tmp_path_factory.mktemp(f"hf-{kind}")
    ref.save_pretrained(out)
    return ref, load_model(out, dtype=torch.float32), out


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["moe", "next"])
def moe_pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory)


def prompt(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n", [1, 63, 64, 65, 150])
def test_prefill_logits_match_transformers(pair, n):
    ref, ours, _ = pair
    ids = prompt(n, seed=n)
    assert rel_err(full_forward(ours, ids), hf_logits(ref, ids)) < TOL


def test_decode_steps_match_full_forward(pair):
    """Prefill 40 tokens, then 16 single-token steps with the cached state."""
    ref, ours, _ = pair
    ids = prompt(56, seed=7)
    expected = hf_logits(ref, ids)
    P, cache = 16, ours.new_cache(num_blocks=8, block_size=16, num_slots=3)
    table, slot = [5, 2, 7, 0], 2          # scattered blocks, a non-zero slot
    got = [step(ours, ids[:40], 0, table, slot, P, cache)]
    for t in range(40, 56):
        got.append(step(ours, ids[t:t + 1], t, table, slot, P, cache))
    got = torch.cat(got)
    assert rel_err(got[-17:], expected[39:]) < TOL


def step(model, new_ids, cached, table, slot, block_size, cache):
    batch = ForwardBatch.build([len(new_ids)], [cached], [table], [slot], block_size, logits="last")
    with torch.no_grad():
        return model(torch.tensor(new_ids), batch, cache)


def test_packed_batch_matches_each_sequence_alone(pair):
    """Several sequences of different lengths in one step, one of them continuing from a cache."""
    ref, ours, _ = pair
    seqs = [prompt(n, seed=100 + n) for n in (1, 70, 5, 33)]
    cache = ours.new_cache(num_blocks=32, block_size=8, num_slots=6)
    tables = [[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
    slots = [4, 0, 5, 1]
    # sequence 3 gets its first 20 tokens in an earlier step (chunked prefill)
    step(ours, seqs[3][:20], 0, tables[3], slots[3], 8, cache)
    news = [seqs[0], seqs[1], seqs[2], seqs[3][20:]]
    batch = ForwardBatch.build([len(s) for s in news], [0, 0, 0, 20], tables, slots, 8, logits="all")
    with torch.no_grad():
        logits = ours(torch.tensor(sum(news, [])), batch, cache)
    rows = batch.cu_seqlens.tolist()
    for i, ids in enumerate(seqs):
        expected = hf_logits(ref, ids)[-len(news[i]):]
        assert rel_err(logits[rows[i]:rows[i + 1]], expected) < TOL, f"sequence {i}"


def test_batched_decode_matches_single(pair):
    """A decode step over 3 sequences equals each sequence's own decode step."""
    _, ours, _ = pair
    seqs = [prompt(n, seed=200 + n) for n in (9, 30, 17)]
    cache = ours.new_cache(num_blocks=16, block_size=8, num_slots=3)
    tables = [[0, 1], [2, 3, 4, 5], [6, 7, 8]]
    for i, s in enumerate(seqs):
        step(ours, s[:-1], 0, tables[i], i, 8, cache)
    batch = ForwardBatch.build([1, 1, 1], [len(s) - 1 for s in seqs], tables, [0, 1, 2], 8)
    with torch.no_grad():
        together = ours(torch.tensor([s[-1] for s in seqs]), batch, cache)
    for i, s in enumerate(seqs):
        alone = full_forward(ours, s)[-1]
        assert rel_err(together[i], alone) < TOL


def test_fused_expert_layout_loads_to_identical_logits(moe_pair, tmp_path):
    _, ours, src = moe_pair
    save_checkpoint(ours, tmp_path, max_shard_bytes=200_000, fused_experts=True)
    names = (tmp_path / "model.safetensors.index.json").read_text()
    assert "experts.gate_up_proj" in names and "experts.0.gate_proj" not in names
    fused = load_model(tmp_path, dtype=torch.float32)
    ids = prompt(70, seed=3)
    assert torch.equal(full_forward(fused, ids), full_forward(ours, ids))


def test_expert_subset_loads_only_its_experts(moe_pair):
    _, ours, src = moe_pair
    part = load_model(src, dtype=torch.float32, experts=range(2, 6))
    layer = next(l for l in part.model.layers if hasattr(l.mlp, "experts"))
    full_layer = ours.model.layers[layer.index]
    assert layer.mlp.experts.gate_up_proj.shape[0] == 4
    assert torch.equal(layer.mlp.experts.gate_up_proj, full_layer.mlp.experts.gate_up_proj[2:6])
    assert torch.equal(layer.mlp.experts.down_proj, full_layer.mlp.experts.down_proj[2:6])


def test_bfloat16_load_tracks_the_reference_in_bfloat16(pair):
    """bf16 rounding can flip a top-k expert choice, so the bound is loose; the fp32 tests are
    the exact ones. This checks the dtype conversion path end to end."""
    ref, _, src = pair
    ours = load_model(src, dtype="bfloat16")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = prompt(65, seed=11)
    logits = full_forward(ours, ids)
    expected = hf_logits(copy.deepcopy(ref).to(torch.bfloat16), ids)
    assert torch.isfinite(logits).all()
    assert rel_err(logits, expected) < 0.1


def test_tied_embeddings_match_transformers(tmp_path):
    """Small dense Qwen3.5 sizes tie lm_head to embed_tokens; the file then has no lm_head."""
    ref = hf_model("dense", seed=5, tie=True)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = prompt(65, seed=5)
    assert rel_err(full_forward(ours, ids), hf_logits(ref, ids)) < TOL


def test_mixed_step_of_decodes_and_prefills_matches_transformers(pair):
    """One step where two sequences decode a token, one continues its prefill and one starts:
    the recurrent layers split it into a token-by-token part and a chunked part."""
    ref, ours, _ = pair
    seqs = [prompt(n, seed=300 + n) for n in (12, 40, 30, 21)]
    cache = ours.new_cache(num_blocks=24, block_size=8, num_slots=4)
    tables = [[0, 1], [2, 3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13]]
    done = [11, 39, 25, 0]                     # cached before the mixed step
    for i in range(3):
        step(ours, seqs[i][:done[i]], 0, tables[i], i, 8, cache)
    news = [s[c:] for s, c in zip(seqs, done)]
    order = [1, 2, 0, 3]                       # decodes not first: rows interleave
    batch = ForwardBatch.build([len(news[i]) for i in order], [done[i] for i in order],
                               [tables[i] for i in order], order, 8, logits="all")
    assert [len(p[0].query_lens) for p in batch.decode_split] == [2, 2]
    with torch.no_grad():
        logits = ours(torch.tensor(sum((news[i] for i in order), [])), batch, cache)
    rows = batch.cu_seqlens.tolist()
    for j, i in enumerate(order):
        expected = hf_logits(ref, seqs[i])[-len(news[i]):]
        assert rel_err(logits[rows[j]:rows[j + 1]], expected) < TOL, f"sequence {i}"


def mixed_step(ours, logits: str):
    """The mixed step above on fresh caches, with `logits` rows: (sequences, their new tokens,
    batch, cache)."""
    seqs = [prompt(n, seed=300 + n) for n in (12, 40, 30, 21)]
    cache = ours.new_cache(num_blocks=24, block_size=8, num_slots=4)
    tables = [[0, 1], [2, 3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13]]
    done = [11, 39, 25, 0]
    for i in range(3):
        step(ours, seqs[i][:done[i]], 0, tables[i], i, 8, cache)
    news = [s[c:] for s, c in zip(seqs, done)]
    batch = ForwardBatch.build([len(s) for s in news], done, tables, [0, 1, 2, 3], 8, logits=logits)
    return seqs, news, batch, cache


@pytest.mark.parametrize("rows", ["newest", "any"])
def test_rows_asked_for_match_transformers(pair, rows):
    """The last layer works only on the rows that give logits: each sequence's newest token
    (queries and attention for those rows alone), or any rows (attention for all, then picked)."""
    ref, ours, _ = pair
    seqs, news, batch, cache = mixed_step(ours, "last")
    cu = batch.cu_seqlens.tolist()
    picks = ([(i, len(news[i]) - 1) for i in (2, 0, 3, 1)] if rows == "newest"
             else [(3, 0), (1, 0), (2, 3), (3, 20)])
    batch.logits_indices = torch.tensor([cu[i] + r for i, r in picks])
    if rows == "newest":
        assert batch.newest_token_seqs(batch.logits_indices) == [2, 0, 3, 1]
    else:
        assert batch.newest_token_seqs(batch.logits_indices) is None
    with torch.no_grad():
        logits = ours(torch.tensor(sum(news, [])), batch, cache)
    assert logits.shape[0] == len(picks)
    for got, (i, r) in zip(logits, picks):
        expected = hf_logits(ref, seqs[i])[len(seqs[i]) - len(news[i]) + r]
        assert rel_err(got, expected) < TOL, f"sequence {i} row {r}"


def test_step_without_logits_still_fills_the_caches(pair):
    """A step that asks for no logits skips the last layer's queries and feed-forward; the K/V
    and recurrent state it writes are still what the next steps read."""
    ref, ours, _ = pair
    seqs, news, batch, cache = mixed_step(ours, "none")
    with torch.no_grad():
        assert ours(torch.tensor(sum(news, [])), batch, cache).shape[0] == 0
    extra = [prompt(2, seed=400 + i) for i in range(4)]
    tables = [[0, 1], [2, 3, 4, 5, 6, 14], [7, 8, 9, 10], [11, 12, 13]]
    nxt = ForwardBatch.build([2] * 4, [len(s) for s in seqs], tables, [0, 1, 2, 3], 8, logits="all")
    with torch.no_grad():
        logits = ours(torch.tensor(sum(extra, [])), nxt, cache)
    for i, (s, e) in enumerate(zip(seqs, extra)):
        assert rel_err(logits[2 * i:2 * i + 2], hf_logits(ref, s + e)[-2:]) < TOL, f"sequence {i}"
