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


def linear_argmax(h_NH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
    """Greedy token ids [N] (int64) for hidden rows h [N, H] and an lm_head weight [V, H].

    On CPU with more than one row the blocked path runs (a single row's logits are small enough
    to take in one GEMM); on GPUs the full logits are cheap, so the plain form runs."""
    if h_NH.is_cuda or h_NH.shape[0] == 1:
        return linear_argmax_reference(h_NH, weight_VH)
    return linear_argmax_blocked(h_NH, weight_VH)
