"""Greedy next tokens straight from hidden states: argmax over the vocabulary of h @ W^T, without
materialising the [N, V] logits on CPU.

With a 248K vocabulary a decode batch's full logits are tens of MB: writing them, reading them
back for the argmax and copying rows costs more than the lm_head GEMM itself on a CPU. The fast
path walks the vocabulary in column blocks small enough to stay in cache and keeps a running
(max, index) per row. Ties go to the lowest index, as torch.argmax does on the full row.

Legend: N rows, H hidden, V vocabulary, C vocabulary block.
"""
import torch
import torch.nn.functional as F

BLOCK_V = 4096


def linear_argmax_reference(h_NH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
    """argmax_v (h @ W^T)[n, v] -> [N] int64, through the full logits."""
    return F.linear(h_NH, weight_VH).argmax(-1)


@torch.no_grad()
def linear_argmax_blocked(h_NH: torch.Tensor, weight_VH: torch.Tensor, block: int = BLOCK_V) -> torch.Tensor:
    """Same result as the reference, one [N, C] block of logits at a time.

    Each block takes a plain max (a value-only reduction is ~10x cheaper than max-with-index
    on CPU); only rows whose best improves in this block, a few times per row over the whole
    vocabulary, take the argmax of their block row."""
    N, V = h_NH.shape[0], weight_VH.shape[0]
    best_N = torch.full((N,), float("-inf"), dtype=h_NH.dtype, device=h_NH.device)
    best_id_N = torch.zeros(N, dtype=torch.long, device=h_NH.device)
    logits_NC = torch.empty(N, block, dtype=h_NH.dtype, device=h_NH.device)
    for start in range(0, V, block):
        w_CH = weight_VH[start:start + block]
        block_NC = torch.mm(h_NH, w_CH.t(), out=logits_NC[:, :w_CH.shape[0]])
        value_N = block_NC.amax(-1)
        rows_R = (value_N > best_N).nonzero().squeeze(1)    # strict: an equal later value loses
        if len(rows_R):
            best_N[rows_R] = value_N[rows_R]
            best_id_N[rows_R] = block_NC[rows_R].argmax(-1) + start
    return best_id_N


SCREEN_BLOCK = 512
UNIT_ROUNDOFF_BF16 = 2.0 ** -8
UNIT_ROUNDOFF_FP32 = 2.0 ** -24


class ScreenedArgmax:
    """Exact greedy ids for an fp32 lm_head from a bfloat16 screen, for CPUs.

    A bf16 copy of the weight is half the bytes to stream and runs on the CPU's bf16 dot-product
    units, so its [N, V] logits cost a fraction of the fp32 GEMM. They are not the answer: each is
    off from the true logit by at most E_n, a rigorous bound from the rounding of h and W to bf16
    (2u + u^2 of sum |h_i w_i|), the fp32 accumulation over H terms, and the rounding of the
    result to bf16 (u of |logit|), with sum |h_i w_i| <= |h_n| * max_v |w_v| (Cauchy-Schwarz).
    The true winner therefore has a screened logit within 2 E_n of the row's screened maximum;
    those few candidates (found through per-block maxima, so the full [N, V] is only read by one
    amax) get their fp32 logits recomputed, and the best one wins, ties to the lowest index as
    torch.argmax. Rows with non-finite values, or whose screen is all negative, take the blocked
    fp32 path.

    Legend: N rows, H hidden, V vocabulary, Vp V padded to whole blocks, C block, B blocks,
    P candidate blocks, Q candidate tokens.
    """

    @torch.no_grad()
    def __init__(self, weight_VH: torch.Tensor, block: int = SCREEN_BLOCK):
        weight_VH = weight_VH.detach()
        V, H = weight_VH.shape
        self.weight_VH, self.block, self.vocab = weight_VH, block, V
        Vp = -(-V // block) * block
        self.screen_HVp = torch.empty(H, Vp, dtype=torch.bfloat16)
        self.screen_HVp[:, :V] = weight_VH.t()
        self.screen_HVp[:, V:] = weight_VH[0, :, None]  # copies of token 0 never beat the maximum
        u, acc = UNIT_ROUNDOFF_BF16, H * UNIT_ROUNDOFF_FP32 / (1 - H * UNIT_ROUNDOFF_FP32)
        dot = (2 * u + u * u) + acc * (1 + u) ** 2                 # of sum |h_i w_i|
        per_norm = dot + u / (1 - u) * (1 + dot)                   # + rounding of the result
        self.bound_per_norm = per_norm * float(weight_VH.norm(dim=1).max())

    @torch.no_grad()
    def __call__(self, h_NH: torch.Tensor) -> torch.Tensor:
        N, C = h_NH.shape[0], self.block
        if N == 1:          # oneDNN's fp32 GEMV streams the weight faster than its bf16 GEMM
            return linear_argmax_reference(h_NH, self.weight_VH)
        screen_NBC = torch.mm(h_NH.to(torch.bfloat16), self.screen_HVp).view(N, -1, C)
        # Positive bf16 values order like their int16 bit patterns and every negative one sorts
        # below them, so maxima and comparisons against a positive threshold run as int16 ops
        # (several times faster than bf16 ones on CPU).
        bits_NBC = screen_NBC.view(torch.int16)
        block_max_NB = bits_NBC.amax(-1)
        best_N = block_max_NB.amax(-1).view(torch.bfloat16).float()
        threshold_N = best_N - 2 * self.bound_per_norm * h_NH.norm(dim=1)
        floor_N = threshold_N.to(torch.bfloat16)                  # round down to a bf16 value
        floor_bits_N = floor_N.view(torch.int16) - (floor_N.float() > threshold_N).short()
        pairs_P2 = (block_max_NB >= floor_bits_N[:, None]).nonzero()
        row_P, blk_P = pairs_P2.unbind(1)
        hits_Q2 = (bits_NBC[row_P, blk_P] >= floor_bits_N[row_P, None]).nonzero()
        row_Q, token_Q = row_P[hits_Q2[:, 0]], blk_P[hits_Q2[:, 0]] * C + hits_Q2[:, 1]
        real_Q = token_Q < self.vocab
        row_Q, token_Q = row_Q[real_Q], token_Q[real_Q]
        exact_Q = (h_NH[row_Q] * self.weight_VH[token_Q]).sum(-1)
        top_N = torch.full((N,), float("-inf")).scatter_reduce(0, row_Q, exact_Q, "amax")
        won_Q = exact_Q == top_N[row_Q]
        ids_N = torch.full((N,), self.vocab, dtype=torch.long).scatter_reduce(
            0, row_Q[won_Q], token_Q[won_Q], "amin")
        # a row whose screen is all negative, or with NaN/inf anywhere, takes the fp32 path
        bad_N = ~((threshold_N > 0) & torch.isfinite(threshold_N) & torch.isfinite(top_N))
        if bad_N.any():
            ids_N[bad_N] = linear_argmax_blocked(h_NH[bad_N], self.weight_VH)
        return ids_N


def linear_argmax(h_NH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
    """Greedy token ids [N] (int64) for hidden rows h [N, H] and an lm_head weight [V, H].

    On CPU with more than one row the blocked path runs (a single row's logits are small enough
    to take in one GEMM); on GPUs the full logits are cheap, so the plain form runs."""
    if h_NH.is_cuda or h_NH.shape[0] == 1:
        return linear_argmax_reference(h_NH, weight_VH)
    return linear_argmax_blocked(h_NH, weight_VH)
