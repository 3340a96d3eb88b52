"""The greedy heads (blocked fp32, bf16-screened) against argmax over the full logits."""
import pytest
import torch

import torch.nn.functional as F

from kernels.linear_argmax import ScreenedArgmax, linear_argmax, linear_argmax_blocked, linear_argmax_reference


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


@pytest.mark.parametrize("N", [1, 2, 7, 64, 130])
@pytest.mark.parametrize("V", [1, 511, 512, 513, 10001])
@pytest.mark.parametrize("column_major", [False, True])
def test_screened_matches_full_logits(N, V, column_major):
    g = torch.Generator().manual_seed(N * V + column_major)
    h_NH = torch.randn(N, 64, generator=g) * 3
    w_VH = torch.randn(V, 64, generator=g) * 0.05
    screen = ScreenedArgmax(w_VH.t().contiguous().t() if column_major else w_VH, block=128)
    assert torch.equal(screen(h_NH), linear_argmax_reference(h_NH, w_VH))


def bf16_logits(h_NH, w_VH):
    return F.linear(h_NH.bfloat16(), w_VH.bfloat16()).float()


def test_screened_resolves_what_bfloat16_gets_wrong():
    # each row's winner gets a rival at a lower index, just below it in fp32 but not below it in
    # bf16: an argmax of the screen alone picks the rival; only the fp32 recompute is right
    g = torch.Generator().manual_seed(1)
    h_NH = torch.randn(8, 64, generator=g)
    w_VH = torch.randn(4000, 64, generator=g) * 0.01
    winners = linear_argmax_reference(h_NH, w_VH)
    assert (winners >= 8).all()
    for n, win in enumerate(winners.tolist()):
        for _ in range(1000):
            pair_2H = torch.stack([w_VH[win], w_VH[win] + 1e-4 * torch.randn(64, generator=g)])
            exact, screened = F.linear(h_NH[n], pair_2H), bf16_logits(h_NH[n:n + 1], pair_2H)[0]
            if exact[1] < exact[0] and screened[1] >= screened[0]:
                break
        else:
            raise AssertionError("no rival found")
        w_VH[n] = pair_2H[1]
    want = linear_argmax_reference(h_NH, w_VH)
    assert torch.equal(want, winners)
    assert not torch.equal(bf16_logits(h_NH, w_VH).argmax(-1), want)
    assert torch.equal(ScreenedArgmax(w_VH, block=256)(h_NH), want)


def test_screened_ties_go_to_the_lowest_index():
    g = torch.Generator().manual_seed(2)
    w_VH = torch.randint(-3, 4, (3000, 16), generator=g).float()
    h_NH = torch.randint(-3, 4, (6, 16), generator=g).float()
    winners = linear_argmax_reference(h_NH, w_VH)
    w_VH[2500:2506] = w_VH[winners]                # exact ties in later and earlier blocks
    w_VH[10:16] = w_VH[winners]
    want = linear_argmax_reference(h_NH, w_VH)
    assert (want <= 15).all()
    assert torch.equal(ScreenedArgmax(w_VH, block=256)(h_NH), want)


def test_screened_rows_that_take_the_fp32_path():
    g = torch.Generator().manual_seed(3)
    w_VH = torch.rand(3000, 16, generator=g) + 0.1
    h_NH = torch.randn(5, 16, generator=g)
    h_NH[1] = -torch.rand(16, generator=g) - 0.1   # every logit negative: nothing to screen
    h_NH[3, 0] = float("inf")                      # a non-finite row must not spoil the others
    assert (F.linear(h_NH[1], w_VH) < 0).all()
    got = ScreenedArgmax(w_VH, block=256)(h_NH)
    keep = [0, 1, 2, 4]
    assert torch.equal(got[keep], linear_argmax_reference(h_NH[keep], w_VH))
