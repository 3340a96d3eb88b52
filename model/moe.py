"""Feed-forward blocks: the sparse MoE (routed experts + sigmoid-gated shared expert) and the
dense SwiGLU MLP.

Routed experts are held fused: gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I].
An expert-parallel rank holds a contiguous slice of the experts; `expert_offset` is the global
id of its first one, and tokens routed elsewhere contribute nothing here.

Legend: T tokens, H hidden, E experts held, I expert width, k experts per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fused_moe, moe_route


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

    def forward(self, x_TH, weights_Tk, ids_Tk) -> torch.Tensor:
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

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        weights_Tk, ids_Tk = moe_route(self.gate(x_TH), self.top_k, self.renormalize)
        routed_TH = self.experts(x_TH, weights_Tk, ids_Tk)
        shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)
        return routed_TH + shared_TH
