"""The two RMSNorms of the text model.

`RMSNorm` is zero-centred (weight stored as w, applied as 1 + w, Gemma style); `GatedRMSNorm`
normalises each GDN value head with a plain weight and then gates it with silu(z).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps)
