"""`LLM(..., ep_size=2)`: a two-rank replica on a local Ray cluster (CPU actors, gloo) against the
one-process `LLM` on the same checkpoint, then a rank killed mid-run.
"""
from __future__ import annotations

import time

import pytest

import ray  # noqa: E402  (a declared dependency)

from cluster.engine import LLM, SamplingParams  # noqa: E402

# different lengths and max_tokens: sequences finish at different steps and ranks run empty
PROMPTS = [[1, 2, 3, 4, 5], [10, 20, 30], [7] * 11, [100, 200], [3, 1, 4, 1, 5, 9, 2, 6]]
MAX_TOKENS = [6, 2, 5, 1, 4]
ENGINE = dict(max_num_seqs=8, kv_cache_memory=1 << 24, max_model_len=64)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # logical: two 2-rank replicas
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(cluster, tiny_checkpoint):
    ep = LLM(str(tiny_checkpoint), ep_size=2, **ENGINE)
    yield LLM(str(tiny_checkpoint), **ENGINE), ep
    ep.engine.shutdown()


def params(n: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, temperature=0.0, logprobs=3, prompt_logprobs=3)
            for m in MAX_TOKENS[:n]]


def test_greedy_outputs_and_logprobs_equal_one_process(pair):
    single, ep = pair
    expected, got = single.generate(PROMPTS, params(5)), ep.generate(PROMPTS, params(5))
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert len(g.outputs[0].token_ids) == len(e.outputs[0].token_ids) > 0
        for e_top, g_top in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            assert e_top.keys() == g_top.keys()
            assert all(abs(e_top[t] - g_top[t]) < 1e-5 for t in e_top)
        for e_top, g_top in zip(e.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            assert all(abs(e_top[t] - g_top[t]) < 1e-5 for t in e_top)
    load = ep.engine.rank_stats
    assert len(load) == 2 and ep.engine.owner == {}


def test_one_request_leaves_the_other_rank_empty(pair):
    single, ep = pair
    one = SamplingParams(max_tokens=5, temperature=0.0)
    assert ep.generate([PROMPTS[2]], one)[0].outputs[0].token_ids == \
        single.generate([PROMPTS[2]], one)[0].outputs[0].token_ids


def test_ranks_hold_only_their_experts(pair):
    single, ep = pair
    routed = replicated = 0
    for name, p in single.model.named_parameters():
        if ".mlp.experts." in name:
            routed += p.numel() * p.element_size()
        else:
            replicated += p.numel() * p.element_size()
    assert ep.engine.parameter_bytes() == [{"routed": routed // 2, "replicated": replicated}] * 2


def test_bad_request_is_a_request_error_and_the_replica_stays_up(pair):
    from cluster.engine import RequestError
    _, ep = pair
    with pytest.raises(RequestError, match="max_model_len"):
        ep.generate([[1] * 100], SamplingParams(max_tokens=2))
    assert ep.engine.healthy


def test_killed_rank_fails_requests_retryably_then_the_replica_is_rebuilt(pair):
    from cluster.replica import ReplicaUnavailable
    single, ep = pair
    engine = ep.engine
    reqs = [engine.new_request(f"kill-{i}", p, SamplingParams(max_tokens=30, temperature=0.0,
                                                              ignore_eos=True))
            for i, p in enumerate(PROMPTS[:2])]
    for req in reqs:
        engine.add(req)
    engine.step()
    ray.kill(engine.workers[1])
    started = time.monotonic()
    with pytest.raises(ReplicaUnavailable, match="retry") as err:
        for _ in range(30):
            engine.step()
    assert err.value.retryable and not engine.healthy and not engine.has_unfinished()
    assert time.monotonic() - started < engine.timeout_s
    one = SamplingParams(max_tokens=3, temperature=0.0)        # the next request rebuilds it
    assert ep.generate([PROMPTS[0]], one)[0].outputs[0].token_ids == \
        single.generate([PROMPTS[0]], one)[0].outputs[0].token_ids
    assert engine.healthy and engine.restarts == 1


def test_serve_replica_with_ep_size_2_streams_the_same_tokens(pair, tiny_checkpoint):
    import asyncio

    from cluster.local_replica import LocalReplica
    from cluster.serve_config import EngineSettings
    single, _ = pair
    replica = LocalReplica(str(tiny_checkpoint), EngineSettings(max_num_seqs=8, max_model_len=64,
                                                                kv_cache_memory=1 << 24), ep_size=2)
    one = SamplingParams(max_tokens=4, temperature=0.0)

    async def run(i: int):
        outs = [o async for o in replica.generate({"prompt_token_ids": PROMPTS[i]}, one, f"s{i}")]
        return outs[-1].outputs[0].token_ids

    async def both():
        return await asyncio.gather(run(0), run(1))
    try:
        got = asyncio.run(both())
        assert got == [single.generate([PROMPTS[i]], one)[0].outputs[0].token_ids for i in (0, 1)]
        assert replica.stats().num_slots > 0
        replica.check_health()
    finally:
        replica.engine.shutdown()
