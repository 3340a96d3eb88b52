"""Expert parallelism as a transform: `expert_parallel(model, group)` swaps every SparseMoE of a
model loaded with one rank's experts for an ExpertParallelMoE that exchanges tokens with the
other ranks, so model code never mentions ranks.

Each rank runs attention / Gated DeltaNet on its own sequences (data parallel). In every MoE
layer a token travels to each rank that owns at least one of its top-k experts, together with
its routing (weights and ids); that rank applies the experts it holds (the kernel skips ids it
does not hold) and sends the partial sum back; the source adds the partials. Three
all-to-alls per layer (counts, hidden rows, routing) out and one back. Every rank must call
every MoE layer once per step, in the same order; a rank without tokens sends and receives
zero rows (the engine's empty step).

Legend: T local tokens, H hidden, k experts per token, R ranks, S rows sent, Q rows received.
"""
from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
from torch import nn

from kernels import moe_route
from model.moe import SparseMoE


def expert_range(num_experts: int, ep_size: int, rank: int) -> range:
    """The contiguous global expert ids rank `rank` holds."""
    if num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the model's {num_experts} experts")
    per_rank = num_experts // ep_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(address: str, rank: int, world_size: int, timeout_s: float, backend: str) -> None:
    """Join the replica's process group; every collective after this fails after `timeout_s`
    instead of waiting forever for a dead rank."""
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))


def exchange(rows_SX: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Uneven all-to-all: rows_SX holds rank 0's rows, then rank 1's, ...; returns [Q, X]."""
    out_QX = rows_SX.new_empty((sum(recv_counts), *rows_SX.shape[1:]))
    dist.all_to_all_single(out_QX, rows_SX.contiguous(), recv_counts, send_counts)
    return out_QX


def dispatch_combine(x_TH, weights_Tk, ids_Tk, experts, experts_per_rank: int) -> torch.Tensor:
    """Routed-expert output [T, H] for local tokens, computed by the ranks that own the experts."""
    R = dist.get_world_size()
    owner_Tk = ids_Tk // experts_per_rank
    goes_RT = (owner_Tk[None] == torch.arange(R, device=x_TH.device)[:, None, None]).any(-1)
    send_S = goes_RT.nonzero()[:, 1]                 # token index, grouped by destination rank
    send_counts_R = goes_RT.sum(1)
    recv_counts_R = torch.empty_like(send_counts_R)
    dist.all_to_all_single(recv_counts_R, send_counts_R)
    send, recv = send_counts_R.tolist(), recv_counts_R.tolist()
    # ids travel as float32 beside the weights: exact below 2**24 experts, one message fewer
    route_Sk2 = torch.cat([weights_Tk.float(), ids_Tk.float()], 1)[send_S]
    x_QH = exchange(x_TH[send_S], send, recv)
    route_Qk2 = exchange(route_Sk2, send, recv)
    k = ids_Tk.shape[1]
    partial_QH = experts(x_QH, route_Qk2[:, :k], route_Qk2[:, k:].long())
    partial_SH = exchange(partial_QH, recv, send)
    return torch.zeros_like(x_TH).index_add_(0, send_S, partial_SH)


class ExpertParallelMoE(nn.Module):
    """SparseMoE on one rank: same parameters (router, shared expert replicated; `experts` this
    rank's slice), with the routed part computed across the process group."""

    def __init__(self, moe: SparseMoE):
        super().__init__()
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate, self.experts = moe.gate, moe.experts
        self.shared_expert, self.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        weights_Tk, ids_Tk = moe_route(self.gate(x_TH), self.top_k, self.renormalize)
        E_local = self.experts.gate_up_proj.shape[0]
        routed_TH = dispatch_combine(x_TH, weights_Tk, ids_Tk, self.experts, E_local)
        shared_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)
        return routed_TH + shared_TH


def expert_parallel(model: nn.Module) -> nn.Module:
    """Swap every SparseMoE for an ExpertParallelMoE over the default process group, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SparseMoE):
                setattr(parent, name, ExpertParallelMoE(child))
    return model
