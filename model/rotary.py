"""Partial rotary position embedding with interleaved M-RoPE (three position streams).

Only the first `rotary_dim` dims of each head rotate (rotate-half within them). With M-RoPE each
frequency slot j takes its angle from stream H if j % 3 == 1 and j < 3*sec[1], from stream W if
j % 3 == 2 and j < 3*sec[2], else from stream T. Plain text has three equal streams, which is
ordinary 1-D RoPE; Qwen3-Next (no mrope_section) always uses stream T.

Legend: T tokens, R rotary dim, F = R/2 frequencies, NH heads, D head dim.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ModelConfig


def yarn_frequencies(inv_freq_F: torch.Tensor, dim: int, base: float, scaling: dict,
                     max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv:2309.00071): high-frequency slots keep their rate (extrapolate), low-frequency
    slots are divided by `factor` (interpolate), with a linear ramp between the slots that turn
    beta_fast and beta_slow times over the original context; cos/sin grow by the attention factor.
    Same defaults as transformers (truncate=True, beta 32 / 1, original length = max positions)."""
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if factor is None:
        factor = max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = yarn_mscale(factor, scaling.get("mscale"), scaling.get("mscale_all_dim"))

    def slot_of(rotations: float) -> float:       # frequency slot that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = slot_of(scaling.get("beta_fast") or 32), slot_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp_F = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_F = 1 - ramp_F                              # 1 = extrapolate (original frequency)
    return inv_freq_F / factor * (1 - keep_F) + inv_freq_F * keep_F, float(attention)


def yarn_mscale(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    def m(scale: float, k: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0
    if mscale and mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [F] and the cos/sin scale (1.0 unless the rope type rescales)."""
    dim = cfg.rotary_dim
    inv_freq_F = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "yarn":
        return yarn_frequencies(inv_freq_F, dim, cfg.rope_theta, cfg.rope_scaling,
                                cfg.max_position_embeddings)
    return inv_freq_F, 1.0


def mrope_stream_of_slot(num_freqs: int, section: list[int] | None) -> torch.Tensor:
    """[F] int: which position stream (0=T, 1=H, 2=W) drives each frequency slot."""
    stream_F = torch.zeros(num_freqs, dtype=torch.long)
    if section is None:
        return stream_F
    for stream in (1, 2):
        stream_F[stream:3 * section[stream]:3] = stream
    return stream_F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq_F, self.scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq_F", inv_freq_F, persistent=False)
        stream_F = mrope_stream_of_slot(len(inv_freq_F), cfg.mrope_section)
        self.register_buffer("stream_F", stream_F, persistent=False)
        self.rotary_dim = cfg.rotary_dim

    def cos_sin(self, positions_3T: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, R] in `dtype` (computed in fp32, like the reference)."""
        pos_FT = positions_3T.float()[self.stream_F]                   # [F, T] per-slot stream
        freqs_TF = pos_FT.t() * self.inv_freq_F
        emb_TR = torch.cat((freqs_TF, freqs_TF), dim=-1)
        return (emb_TR.cos() * self.scale).to(dtype), (emb_TR.sin() * self.scale).to(dtype)

    @staticmethod
    def apply(x_TND: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        r = cos_TR.shape[-1]
        rot, rest = x_TND[..., :r], x_TND[..., r:]
        cos, sin = cos_TR[:, None, :], sin_TR[:, None, :]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)
