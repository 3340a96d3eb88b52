"""Parameter counts and weight bytes of a configuration, measured on the `meta` device (no memory).

"Active per token" counts every non-expert parameter (both embedding matrices included, as the
usual A17B-style figures do) plus the routed experts a token actually uses (top-k of E).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.hybrid import HybridForCausalLM


@dataclass
class ParameterCounts:
    total: int
    routed_experts: int
    active_per_token: int
    embedding: int

    def bytes(self, dtype: torch.dtype) -> int:
        return self.total * torch.empty((), dtype=dtype).element_size()


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    with torch.device("meta"):
        model = HybridForCausalLM(cfg)
    total = routed = embedding = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".mlp.experts." in name:
            routed += p.numel()
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            embedding += p.numel()
    active = total - routed
    if cfg.is_moe:
        active += routed * cfg.num_experts_per_tok // cfg.num_experts
    return ParameterCounts(total, routed, active, embedding)


def layer_pattern(cfg: ModelConfig) -> str:
    """One letter per layer: L = Gated DeltaNet (linear attention), F = full attention."""
    return "".join("F" if t == "full_attention" else "L" for t in cfg.layer_types)
