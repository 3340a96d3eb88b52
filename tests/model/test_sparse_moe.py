"""The whole sparse-MoE block on CPU (router, routed experts, sigmoid-gated shared expert) vs
HF's Qwen3_5MoeSparseMoeBlock, its in-place weight re-layout, and an expert-parallel slice."""
import pytest
import torch

from kernels import moe_route
from kernels.moe_reference import fused_moe_reference
from model.moe import SparseMoE


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def hf_block_and_ours(D, I, E, k, dtype):
    """HF's Qwen3_5MoeSparseMoeBlock with random weights, and our SparseMoE loaded from its state_dict."""
    import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as hf
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    cfg = Qwen3_5MoeTextConfig(hidden_size=D, moe_intermediate_size=I, shared_expert_intermediate_size=I + 8,
                               num_experts=E, num_experts_per_tok=k)
    hf_block = hf.Qwen3_5MoeSparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0, D ** -0.5)
    ours = SparseMoE(D, E, k, I, I + 8, renormalize=True).to(dtype)
    ours.load_state_dict(hf_block.state_dict())
    return hf_block, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 40, 700])   # experts touched <= half / grouped GEMMs / per-expert loop
def test_sparse_moe_block_matches_hf(dtype, N, assert_rms_close):
    # the whole CPU block (router, routed experts, shared expert packed into one GEMM and added
    # into the routed output, gate logit folded into the hidden) on each of the experts paths
    hf_block, ours = hf_block_and_ours(32, 16, 8, 2, dtype)
    x = torch.randn(1, N, 32, dtype=dtype)
    with torch.no_grad():
        want, got = hf_block(x)[0], ours(x[0])
    assert got.dtype == dtype
    assert_rms_close(got, want, 1e-6 if dtype == torch.float32 else 1e-2)


def test_sparse_moe_relayout_keeps_names_values_and_sees_later_loads(assert_rms_close):
    # the first CPU forward re-lays the weights out in place; the state_dict must not change, and
    # weights loaded afterwards (copied in, like the checkpoint loader, or swapped in by .data,
    # like load_state_dict(assign=True)) must be what the next forward computes with
    hf_block, ours = hf_block_and_ours(32, 16, 8, 2, torch.float32)
    before = {name: t.clone() for name, t in ours.state_dict().items()}
    x = torch.randn(1, 24, 32)
    with torch.no_grad():
        ours(x[0])
    after = ours.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], t) for name, t in before.items())
    assert ours.experts.gate_up_proj.transpose(1, 2).is_contiguous()
    assert ours.shared_expert.gate_proj.weight.data_ptr() == ours.shared_packed.data_ptr()
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0, 0.2)
        ours.load_state_dict(hf_block.state_dict())                      # copy_ into the views
        assert_rms_close(ours(x[0]), hf_block(x)[0], 1e-6, "copied in")
        ours.shared_expert.up_proj.weight.data = torch.randn(24, 32)     # no longer a view
        hf_block.shared_expert.up_proj.weight.data = ours.shared_expert.up_proj.weight.data.clone()
        assert_rms_close(ours(x[0]), hf_block(x)[0], 1e-6, "swapped in")
    packed = ours.shared_packed                                         # packed again, with it
    assert ours.shared_expert.up_proj.weight.data_ptr() == packed.data_ptr() + 24 * packed.element_size()


def test_sparse_moe_on_an_expert_parallel_slice(assert_rms_close):
    # a rank holding experts 2..5 of 8: its shared expert plus only its own experts' part
    hf_block, full = hf_block_and_ours(32, 16, 8, 3, torch.float32)
    part = SparseMoE(32, 8, 3, 16, 24, renormalize=True, experts=range(2, 6))
    state = hf_block.state_dict()
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        state[name] = state[name][2:6]
    part.load_state_dict(state)
    x = torch.randn(50, 32)
    with torch.no_grad():
        weights, ids = moe_route(full.gate(x), 3)
        routed = fused_moe_reference(x, part.experts.gate_up_proj, part.experts.down_proj, weights, ids, 2)
        want = routed + torch.sigmoid(full.shared_expert_gate(x)) * full.shared_expert(x)
        assert_rms_close(part(x), want, 1e-6)
