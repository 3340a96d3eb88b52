"""Feed-forward blocks: the sparse MoE (routed experts + sigmoid-gated shared expert) and the
dense SwiGLU MLP.

Routed experts are held fused: gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I].
An expert-parallel rank holds a contiguous slice of the experts; `expert_offset` is the global
id of its first one, and tokens routed elsewhere contribute nothing here.

On CPU the weights are re-laid-out in place at the first forward (names, shapes and values stay
what the checkpoint loader and state_dict see; only strides and storage change, no extra memory
once done; the copy of one layer's weights exists for a moment): the routed experts' and the
shared down_proj in transposed storage, and the shared expert's gate_proj, up_proj and
shared_expert_gate as transposed column views of one [H, 2S + 1] tensor, so one GEMM computes
all three. Weights copied in later (the checkpoint loader, load_state_dict) land in that storage;
weights swapped in (`.data =`, a cast or a move) are laid out again at the next forward.

Legend: T tokens, H hidden, E experts held, I expert width, k experts per token, S shared expert width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fused_moe, moe_route

SHARED_ROWS = 1024  # tokens per shared-expert step on CPU: its [rows, 2S + 1] fp32 projection ~2 MiB


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_TH)) * self.up_proj(x_TH))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, expert_offset: int = 0):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.expert_offset = expert_offset

    def store_by_column(self) -> None:
        """Keep gate_up_proj [E, 2I, H] and down_proj [E, H, I] as transposed views of contiguous
        [E, H, 2I] and [E, I, H]: the CPU GEMMs read each expert's weight as a plain row-major
        right operand, 5-15% faster in torch's grouped_mm (benchmarks/moe_block.py)."""
        for w in (self.gate_up_proj, self.down_proj):
            if not is_column_major(w):
                with torch.inference_mode(False):        # a plain tensor, even if called in inference
                    w.data = w.data.transpose(1, 2).contiguous().transpose(1, 2)

    def forward(self, x_TH, weights_Tk, ids_Tk) -> torch.Tensor:
        if not x_TH.is_cuda:
            self.store_by_column()
        return fused_moe(x_TH, self.gate_up_proj, self.down_proj, weights_Tk, ids_Tk,
                         expert_offset=self.expert_offset)


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int,
                 shared_intermediate: int, renormalize: bool, experts: range | None = None):
        super().__init__()
        held = experts if experts is not None else range(num_experts)
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(len(held), hidden, intermediate, expert_offset=held.start)
        self.shared_expert = MLP(hidden, shared_intermediate)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

        self.shared_packed: torch.Tensor | None = None   # see `pack_shared_expert`
        self.shared_addresses: tuple[int, ...] = ()

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        weights_Tk, ids_Tk = moe_route(F.linear(x_TH, self.gate.weight), self.top_k, self.renormalize)
        routed_TH = self.experts(x_TH, weights_Tk, ids_Tk)
        if x_TH.is_cuda:
            shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)
            return routed_TH + shared_TH
        return self.add_shared_expert_(routed_TH, x_TH)

    def add_shared_expert_(self, y_TH: torch.Tensor, x_TH: torch.Tensor) -> torch.Tensor:
        """y += sigmoid(gate x) * shared_expert(x), in place, SHARED_ROWS tokens at a time (their
        [rows, 2S + 1] projections stay in cache): one GEMM for the shared expert's gate, up and
        gate logit, the sigmoid gate scaling the [rows, S] hidden (like the routing weights), and
        the down projection accumulating into y."""
        proj_H2S1, down_SH = self.pack_shared_expert(), self.shared_expert.down_proj.weight.T
        S = down_SH.shape[0]
        with torch.no_grad():
            for start in range(0, len(x_TH), SHARED_ROWS):
                proj_R2S1 = x_TH[start:start + SHARED_ROWS] @ proj_H2S1
                hidden_RS = F.silu(proj_R2S1[:, :S], inplace=True).mul_(proj_R2S1[:, S:2 * S])
                hidden_RS.mul_(torch.sigmoid_(proj_R2S1[:, 2 * S:]))
                y_TH[start:start + SHARED_ROWS].addmm_(hidden_RS, down_SH)
        return y_TH

    def pack_shared_expert(self) -> torch.Tensor:
        """[H, 2S + 1]: the columns of shared_expert.gate_proj, shared_expert.up_proj and
        shared_expert_gate (weights [out, H]), which are kept as transposed views of it, and
        shared_expert.down_proj [H, S] kept as a transposed view of a contiguous [S, H]: the CPU
        GEMMs then read plain row-major right operands. Packed again whenever a parameter no
        longer is such a view (replaced storage, moved or cast model): while `shared_packed`
        holds its storage, no other tensor can start at the addresses of its columns."""
        parts = (self.shared_expert.gate_proj.weight, self.shared_expert.up_proj.weight,
                 self.shared_expert_gate.weight)
        if self.shared_packed is None or tuple(p.data_ptr() for p in parts) != self.shared_addresses:
            self.shared_packed, self.shared_addresses = pack_columns(parts)
            down = self.shared_expert.down_proj.weight
            if not is_column_major(down):
                with torch.inference_mode(False):
                    down.data = down.data.T.contiguous().T
        return self.shared_packed


def is_column_major(w: torch.Tensor) -> bool:
    """Whether the last two dims of `w` are a transposed view of contiguous storage."""
    return w.stride()[-2:] == (1, w.shape[-2])


def pack_columns(parts) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Weights [out_i, H] -> ([H, sum out_i] holding them, in order, as column blocks; their new
    addresses), each weight's data replaced in place by the transposed view of its block."""
    with torch.inference_mode(False):                    # plain tensors, even if called in inference
        packed_HC = torch.cat([p.data for p in parts]).T.contiguous()
        start = 0
        for p in parts:
            p.data, start = packed_HC[:, start:start + len(p)].T, start + len(p)
    return packed_HC, tuple(p.data_ptr() for p in parts)
