"""Expert-parallel MoE on real processes: four Ray actors, each holding a quarter of the tiny
model's experts, joined in one gloo group, run one forward over their own sequences; the logits
must equal one process holding every expert running the same sequences.

Covered in one group: a rank with zero sequences (it still runs the forward, T = 0), ranks with
different token counts, and skewed routing (a router that sends every token to rank 0's experts).
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

import ray  # noqa: E402  (a declared dependency)

EP = 4
# rank -> sequences (token ids); rank 2 has none
SEQS = {0: [[1, 2, 3, 4, 5, 6, 7], [9, 8]], 1: [[100, 200, 300]], 2: [], 3: [[5] * 12, [42]]}


def forward(model, seqs: list[list[int]]) -> torch.Tensor:
    """Last-position logits [N, V] of every sequence, prefilled together in one packed step."""
    from model.batch import ForwardBatch
    cache = model.new_cache(16, 16, 4)
    n = len(seqs)
    batch = ForwardBatch.build([len(s) for s in seqs], [0] * n, [[i] for i in range(n)],
                               list(range(n)), 16, positions=None if seqs else torch.zeros(3, 0),
                               logits="last" if seqs else "none")
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    with torch.inference_mode():
        return model(ids, batch, cache)


@contextlib.contextmanager
def skewed_routing(hot: range):
    """Every token routed to experts in `hot` only: top-k over those router columns."""
    import cluster.parallel
    import model.moe
    from kernels import moe_route

    def route(logits_TE, top_k, renormalize):
        weights_Tk, ids_Tk = moe_route(logits_TE[:, hot.start:hot.stop], top_k, renormalize)
        return weights_Tk, ids_Tk + hot.start
    cluster.parallel.moe_route = model.moe.moe_route = route
    try:
        yield
    finally:
        cluster.parallel.moe_route = model.moe.moe_route = moe_route


class Rank:
    def run(self, path: str, address: str, rank: int, seqs, skew: bool) -> dict:
        import torch.distributed as dist

        from cluster.parallel import expert_parallel, expert_range, init_group
        from model.checkpoint import load_model
        from model.config import ModelConfig
        cfg = ModelConfig.from_pretrained(path)
        if not dist.is_initialized():         # once per actor: the group and the rank's model
            init_group(address, rank, EP, 60, "gloo")
            self.model = expert_parallel(load_model(path, experts=expert_range(cfg.num_experts,
                                                                               EP, rank)))
        model = self.model
        hot = expert_range(cfg.num_experts, EP, 0)
        with skewed_routing(hot) if skew else contextlib.nullcontext():
            logits = forward(model, seqs)
        return {"logits": logits,
                "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "expert_offsets": {m.experts.expert_offset for m in model.modules()
                                   if hasattr(m, "experts")}}

    def address(self) -> str:
        from cluster.parallel import free_port
        return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def ranks():
    ray.init(address="local", num_cpus=EP, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests
    actors = [ray.remote(num_cpus=1)(Rank).remote() for _ in range(EP)]
    address = ray.get(actors[0].address.remote())
    yield actors, address
    ray.shutdown()


def run_all(ranks, path, skew: bool) -> list[dict]:
    actors, address = ranks
    return ray.get([a.run.remote(str(path), address, r, SEQS[r], skew)
                    for r, a in enumerate(actors)], timeout=120)


@pytest.mark.parametrize("skew", [False, True], ids=["balanced", "all-to-rank-0"])
def test_expert_parallel_logits_equal_one_process(ranks, tiny_checkpoint, skew):
    from model.checkpoint import load_model
    from model.config import ModelConfig
    results = run_all(ranks, tiny_checkpoint, skew)
    full = load_model(tiny_checkpoint)
    hot = range(0, ModelConfig.from_pretrained(tiny_checkpoint).num_experts // EP)
    for rank, result in enumerate(results):
        with skewed_routing(hot) if skew else contextlib.nullcontext():
            expected = forward(full, SEQS[rank])
        assert result["logits"].shape == expected.shape
        torch.testing.assert_close(result["logits"], expected, rtol=1e-5, atol=1e-5)
        assert (result["logits"].argmax(-1) == expected.argmax(-1)).all()


def test_each_rank_holds_only_its_experts(ranks, tiny_checkpoint):
    from model.checkpoint import load_model
    from model.config import ModelConfig
    from model.footprint import parameter_counts
    cfg = ModelConfig.from_pretrained(tiny_checkpoint)
    counts = parameter_counts(cfg)
    total = sum(p.numel() * 4 for p in load_model(tiny_checkpoint).parameters())   # float32
    routed_bytes = counts.routed_experts * 4
    results = run_all(ranks, tiny_checkpoint, False)
    per_expert = cfg.num_experts // EP
    for rank, result in enumerate(results):
        assert result["bytes"] == (total - routed_bytes) + routed_bytes // EP
        assert result["expert_offsets"] == {rank * per_expert}
