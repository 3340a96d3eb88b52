"""The blocked greedy head against argmax over the full logits."""
import pytest
import torch

from kernels.linear_argmax import linear_argmax, linear_argmax_blocked, linear_argmax_reference


@pytest.mark.parametrize("N", [1, 2, 7, 64])
@pytest.mark.parametrize("V", [1, 4095, 4096, 10001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_matches_full_logits(N, V, dtype):
    g = torch.Generator().manual_seed(N * V)
    h_NH = torch.randn(N, 64, generator=g).to(dtype)
    w_VH = torch.randn(V, 64, generator=g).to(dtype)
    want = linear_argmax_reference(h_NH, w_VH)
    assert torch.equal(linear_argmax_blocked(h_NH, w_VH, block=1000), want)
    assert torch.equal(linear_argmax(h_NH, w_VH), want)


def test_ties_go_to_the_lowest_index_across_blocks():
    # small integers make every dot product exact, so equal rows give exactly equal logits
    g = torch.Generator().manual_seed(0)
    w_VH = torch.randint(-3, 4, (3000, 16), generator=g).float()
    h_NH = torch.randint(-3, 4, (5, 16), generator=g).float()
    winners = linear_argmax_reference(h_NH, w_VH)
    w_VH[2500:2505] = w_VH[winners]                # a copy of each winner in a later block
    w_VH[10:15] = w_VH[winners]                    # and one in an earlier block
    want = linear_argmax_reference(h_NH, w_VH)
    assert (want <= 14).all()
    assert torch.equal(linear_argmax_blocked(h_NH, w_VH, block=256), want)
