"""Sorted-by-expert CPU MoE vs the per-token loop and HF's experts; routing vs HF's router."""
import pytest
import torch

from kernels import fused_moe, moe_route
from kernels.moe_reference import fused_moe_reference


def make_experts(E, D, I, dtype):
    return torch.randn(E, 2 * I, D, dtype=dtype) * 0.2, torch.randn(E, D, I, dtype=dtype) * 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sorted_moe_matches_per_token_loop(dtype, assert_rms_close):
    N, D, I, E, k = 37, 16, 8, 6, 2
    x = torch.randn(N, D, dtype=dtype)
    w_gu, w_down = make_experts(E, D, I, dtype)
    weights, ids = moe_route(torch.randn(N, E), k)
    y = fused_moe(x, w_gu, w_down, weights, ids)
    assert y.dtype == dtype
    assert_rms_close(y, fused_moe_reference(x, w_gu, w_down, weights, ids), 1e-6 if dtype == torch.float32 else 1e-2)


def test_expert_offset_keeps_only_local_experts(assert_rms_close):
    N, D, I, E, k = 20, 8, 4, 8, 3
    x = torch.randn(N, D)
    w_gu, w_down = make_experts(E, D, I, torch.float32)
    weights, ids = moe_route(torch.randn(N, E), k)
    full = fused_moe(x, w_gu, w_down, weights, ids)
    halves = fused_moe(x, w_gu[:4], w_down[:4], weights, ids, 0) + fused_moe(x, w_gu[4:], w_down[4:], weights, ids, 4)
    assert_rms_close(halves, full, 1e-6, "sum of EP shards")


def test_route_and_experts_match_hf():
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as hf
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    cfg = Qwen3_5MoeTextConfig(hidden_size=16, moe_intermediate_size=8, num_experts=6, num_experts_per_tok=2)
    experts, router = hf.Qwen3_5MoeExperts(cfg), hf.Qwen3_5MoeTopKRouter(cfg)
    with torch.no_grad():
        for p in (experts.gate_up_proj, experts.down_proj, router.weight):
            p.normal_(0, 0.3)
        x = torch.randn(30, 16)
        logits, w_hf, ids_hf = router(x)
        weights, ids = moe_route(logits, 2)
        assert torch.equal(ids, ids_hf) and torch.allclose(weights, w_hf)
        y_hf = experts(x, ids_hf, w_hf)
        y = fused_moe(x, experts.gate_up_proj, experts.down_proj, weights, ids)
    assert torch.allclose(y, y_hf, atol=1e-5, rtol=1e-5)


def test_sorted_moe_matches_hf_experts_at_larger_shape():
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as hf
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    cfg = Qwen3_5MoeTextConfig(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=4)
    experts = hf.Qwen3_5MoeExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in (experts.gate_up_proj, experts.down_proj):
            p.normal_(0, 0.2)
        x = torch.randn(200, 64, dtype=torch.bfloat16)
        weights, ids = moe_route(torch.randn(200, 8), 4)
        y_hf = experts(x, ids, weights.to(torch.bfloat16))
        y = fused_moe(x, experts.gate_up_proj, experts.down_proj, weights, ids)
        y_fp32 = fused_moe_reference(x.float(), experts.gate_up_proj.float(), experts.down_proj.float(), weights, ids)

    def rel(a, b):
        return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())
    # the same per-token order of bf16 additions as HF, but the routing weight scales the hidden
    # before the down projection, so the roundings differ: close to HF, and no farther from the
    # fp32 result than HF's own bf16 path is
    assert rel(y, y_hf) < 1e-2
    assert rel(y, y_fp32) < 1.25 * rel(y_hf, y_fp32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("expert_offset", [0, 3])
def test_each_experts_path_matches_the_reference(dtype, expert_offset, assert_rms_close):
    # the fast path picks one of the three by rows per expert and experts touched; each must hold
    # to the reference, including experts that get no rows and ids held by another
    # expert-parallel rank (offset 3: global ids 0-2 and 9-11 are not held here)
    from kernels.moe_torch import experts_grouped, experts_looped, experts_touched, order_by_expert
    N, D, I, E, k = 29, 16, 8, 12, 3
    x = torch.randn(N, D, dtype=dtype)
    w_gu, w_down = make_experts(6, D, I, dtype)
    logits = torch.randn(N, E)
    logits[:, expert_offset + 2] = -float("inf")          # local expert 2 gets no rows
    weights, ids = moe_route(logits, k)
    order_A, counts_E = order_by_expert(ids, expert_offset, 6)
    counts = counts_E.tolist()
    assert counts[2] == 0 and sum(counts) < N * k      # ids 6-11 (offset 0) are held elsewhere
    flat_A = order_A[:sum(counts)]
    args = (x, w_gu, w_down, flat_A // k, weights.flatten()[flat_A].to(dtype), counts)
    want = fused_moe_reference(x, w_gu, w_down, weights, ids, expert_offset)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for experts in (experts_grouped, experts_looped, experts_touched):
        assert_rms_close(experts(*args), want, tol, experts.__name__)


def test_order_by_expert_holds_local_ids_in_stable_order():
    from kernels.moe_torch import order_by_expert, sort_by_expert
    ids = torch.tensor([[4, 1], [2, 4], [7, 3], [0, 2]])
    order_A, counts_E = order_by_expert(ids, 2, 3)          # local experts: global ids 2, 3, 4
    assert counts_E.tolist() == [2, 1, 2]
    assert order_A[:5].tolist() == [2, 7, 5, 0, 3]
    assert sorted(order_A[5:].tolist()) == [1, 4, 6]       # global 1, 7, 0: held elsewhere
    assert ids.tolist() == [[4, 1], [2, 4], [7, 3], [0, 2]]  # the router's ids are left alone
    flat_A, _, counts_old_E = sort_by_expert(ids, 2, 3)     # the Triton path's: the same order
    assert torch.equal(flat_A, order_A[:5]) and torch.equal(counts_old_E, counts_E)
