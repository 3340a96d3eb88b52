"""The Qwen3.5 vision tower: flattened pixel patches -> vision tokens at the text width.

patch embed (the Conv3d as a linear map on flattened patches) + learned position table
(bilinearly resampled, align_corners, to each image's patch grid) -> depth x pre-LN blocks
(2-D rotary, bidirectional attention inside each image frame only) -> 2x2 patch merger.

Patches arrive in merge-block-major order (model/image_processor.py): every `merge**2`
consecutive rows form one merge window, so the merger is a plain view. Position table, rotary
coordinates and attention segments all use the same order.

Legend: N patches (all images), D vision width, NH heads, K head dim, P flattened patch
(C * temporal * patch * patch), G position grid side, M merged tokens (N / merge**2),
O text width (out_hidden_size), I images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VisionConfig
from model.rotary import rotate_half

ROPE_THETA = 10000.0


def grid_list(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row) for row in grid_thw.tolist()]


def block_major(x_hwX: torch.Tensor, merge: int) -> torch.Tensor:
    """[h, w, ...] raster grid -> [h*w, ...] in merge-block-major order (h/m, w/m, m, m)."""
    h, w = x_hwX.shape[:2]
    rest = x_hwX.shape[2:]
    x = x_hwX.reshape(h // merge, merge, w // merge, merge, *rest)
    return x.transpose(1, 2).reshape(h * w, *rest)


def interpolation_matrix(n: int, side: int) -> torch.Tensor:
    """[n, side] bilinear (align_corners=True) weights from a `side`-long axis to `n` points."""
    src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
    lo = src.floor()
    frac = src - lo
    hi = (lo + 1).clamp(max=side - 1)
    weights = torch.zeros(n, side)
    rows = torch.arange(n)
    weights.index_put_((rows, lo.long()), 1 - frac, accumulate=True)
    weights.index_put_((rows, hi.long()), frac, accumulate=True)
    return weights


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride == one patch is a linear map on the flattened patch; the
    weight keeps the checkpoint's Conv3d shape [D, C, T, p, p]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size,
                 cfg.patch_size, cfg.patch_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(cfg.hidden_size))

    def forward(self, x_NP: torch.Tensor) -> torch.Tensor:
        w_DP = self.weight.reshape(self.weight.shape[0], -1)
        return F.linear(x_NP.to(w_DP.dtype), w_DP, self.bias)


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = PatchEmbed(cfg)

    def forward(self, x_NP: torch.Tensor) -> torch.Tensor:
        return self.proj(x_NP)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_ND, cos_NK, sin_NK, segments: list[int]) -> torch.Tensor:
        N = x_ND.shape[0]
        q_NHK, k_NHK, v_NHK = self.qkv(x_ND).view(N, 3, self.num_heads, -1).unbind(1)
        q_NHK, k_NHK = rotate(q_NHK, cos_NK, sin_NK), rotate(k_NHK, cos_NK, sin_NK)
        outs = []
        for q, k, v in zip(*(t.transpose(0, 1).split(segments, dim=1)
                             for t in (q_NHK, k_NHK, v_NHK))):
            # 4-D inputs: the CPU flash kernel (O(n) memory) instead of the [NH, n, n] math path
            outs.append(F.scaled_dot_product_attention(q[None], k[None], v[None])[0])
        o_ND = torch.cat(outs, dim=1).transpose(0, 1).reshape(N, -1)
        return self.proj(o_ND)


def rotate(x_NHK: torch.Tensor, cos_NK: torch.Tensor, sin_NK: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary over the whole head, in fp32 like the reference."""
    x = x_NHK.float()
    out = x * cos_NK[:, None] + rotate_half(x) * sin_NK[:, None]
    return out.to(x_NHK.dtype)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_ND, cos_NK, sin_NK, segments: list[int]):
        x_ND = x_ND + self.attn(self.norm1(x_ND), cos_NK, sin_NK, segments)
        return x_ND + self.mlp(self.norm2(x_ND))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each merge window's patches side by side -> MLP to text width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.window, self.window)
        self.linear_fc2 = nn.Linear(self.window, cfg.out_hidden_size)

    def forward(self, x_ND):
        x_MW = self.norm(x_ND).view(-1, self.window)
        return self.linear_fc2(F.gelu(self.linear_fc1(x_MW)))     # exact-erf GELU here


class VisionModel(nn.Module):
    """`visual(pixel_values_NP, grid_thw_I3)` -> vision tokens [M, O], images in order."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"vision_config.hidden_act: unsupported value {cfg.hidden_act!r}")
        self.cfg = cfg
        self.side = int(round(cfg.num_position_embeddings ** 0.5))
        if self.side * self.side != cfg.num_position_embeddings:
            raise ValueError("vision_config.num_position_embeddings: must be a perfect square, "
                             f"got {cfg.num_position_embeddings}")
        self.patch_embed = PatchEmbedding(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values_NP: torch.Tensor, grid_thw_I3: torch.Tensor) -> torch.Tensor:
        grids = grid_list(grid_thw_I3)
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values_NP.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values_NP.shape[0]} patch rows but grid_thw "
                             f"{grids} describes {expected}")
        x_ND = self.patch_embed(pixel_values_NP)
        x_ND = x_ND + self.position_embeddings(grids).to(x_ND.dtype)
        cos_NK, sin_NK = self.rotary(grids, x_ND.device)
        segments = [h * w for t, h, w in grids for _ in range(t)]    # one attention block per frame
        for block in self.blocks:
            x_ND = block(x_ND, cos_NK, sin_NK, segments)
        return self.merger(x_ND)

    def position_embeddings(self, grids) -> torch.Tensor:
        """[N, D]: the G x G table resampled to each grid, block-major, repeated per frame."""
        table_GGD = self.pos_embed.weight.float().view(self.side, self.side, -1)
        out = []
        for t, h, w in grids:
            rows_hG = interpolation_matrix(h, self.side).to(table_GGD.device)
            cols_wG = interpolation_matrix(w, self.side).to(table_GGD.device)
            grid_hwD = torch.einsum("hg,gsd,ws->hwd", rows_hG, table_GGD, cols_wG)
            out.append(block_major(grid_hwD, self.cfg.spatial_merge_size).repeat(t, 1))
        return torch.cat(out)

    def rotary(self, grids, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, K] (fp32): axial rotary over (row, col) patch coordinates."""
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        half = head_dim // 2
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, half, 2, dtype=torch.float32,
                                                     device=device) / half)
        coords = []
        for t, h, w in grids:
            rc_hw2 = torch.stack(torch.meshgrid(torch.arange(h, device=device),
                                                torch.arange(w, device=device), indexing="ij"), -1)
            coords.append(block_major(rc_hw2, self.cfg.spatial_merge_size).repeat(t, 1))
        rc_N2 = torch.cat(coords).float()
        freqs = (rc_N2[:, :, None] * inv_freq).reshape(rc_N2.shape[0], -1)   # [N, K/2]: rows|cols
        emb_NK = torch.cat((freqs, freqs), dim=-1)
        return emb_NK.cos(), emb_NK.sin()
