"""Writes a complete, random-weight Hugging Face checkpoint directory for a preset.

Every parameter is random (norm weights, A_log and dt_bias included, so tests catch `1 + w` vs
`w` mistakes), scaled so activations stay finite through the whole depth in float32 and
bfloat16: projections ~ N(0, 1/fan_in), residual outputs further scaled by 1/sqrt(2 * layers).
The tokenizer is the real Qwen3.5 vocabulary, so demos and tests go through the same loading code
as a real checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from model.checkpoint import resolve_dtype, save_checkpoint
from model.config import ModelConfig
from model.hybrid import HybridForCausalLM
from model.image_processor import ImageProcessorConfig
from model.vocabulary import write_tokenizer_files

EOS_TOKEN_IDS = [248046, 248044]          # <|im_end|>, <|endoftext|>
PAD_TOKEN_ID = 248044
RESIDUAL_OUTPUTS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "down_proj")


def randomize_(model: HybridForCausalLM, seed: int) -> None:
    """Fill every parameter in place with the scaled random init described above."""
    gen = torch.Generator().manual_seed(seed)
    vision_gen = torch.Generator().manual_seed(seed + 1)   # text weights as without a vision tower
    depth_scale = 1.0 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = vision_gen if name.startswith("model.visual.") else gen
            p.copy_(random_value(name, p, g, depth_scale))


def random_value(name: str, p: torch.Tensor, gen: torch.Generator, depth_scale: float):
    if name.startswith("model.visual."):
        return random_vision_value(name, p, gen, depth_scale)

    def normal(std: float, mean: float = 0.0):
        return torch.randn(p.shape, generator=gen) * std + mean

    def uniform(lo: float, hi: float):
        return torch.rand(p.shape, generator=gen) * (hi - lo) + lo

    if name.endswith("linear_attn.norm.weight"):          # gated norm: plain weight around 1
        return normal(0.1, 1.0)
    if name.endswith("norm.weight"):                       # zero-centred norms: 1 + w
        return normal(0.1)
    if name.endswith("A_log"):                             # decay rates A in [1, 16]
        return uniform(0.0, math.log(16.0))
    if name.endswith("dt_bias"):                           # softplus(dt_bias) in [1e-3, 1e-1]
        dt = uniform(math.log(1e-3), math.log(1e-1)).exp()
        return dt + torch.log(-torch.expm1(-dt))
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    fan_in = p.shape[-1]
    scale = depth_scale if name.endswith(RESIDUAL_OUTPUTS) else 1.0
    return normal(scale / math.sqrt(fan_in))


def random_vision_value(name: str, p: torch.Tensor, gen: torch.Generator, depth_scale: float):
    """Vision tower: LayerNorms are plain (weight around 1), biases small, the patch embedding's
    fan-in is its whole flattened patch (C * T * p * p)."""
    def normal(std: float, mean: float = 0.0):
        return torch.randn(p.shape, generator=gen) * std + mean

    if ".norm" in name and name.endswith(".weight"):
        return normal(0.1, 1.0)
    if name.endswith(".bias"):
        return normal(0.02)
    if name.endswith("pos_embed.weight"):
        return normal(0.5)
    fan_in = p[0].numel() if p.dim() > 2 else p.shape[-1]
    scale = depth_scale if name.endswith(("attn.proj.weight", "mlp.linear_fc2.weight")) else 1.0
    return normal(scale / math.sqrt(fan_in))


def write_random_checkpoint(preset: str | ModelConfig, out_dir: str | Path, seed: int = 0,
                            dtype: str = "float32", max_shard_bytes: int = 512 << 20) -> Path:
    cfg = ModelConfig.preset(preset) if isinstance(preset, str) else preset
    out = Path(out_dir)
    model = HybridForCausalLM.empty(cfg, torch.float32)
    randomize_(model, seed)
    model.to(resolve_dtype(dtype))
    save_checkpoint(model, out, max_shard_bytes=max_shard_bytes)
    write_tokenizer_files(out)
    generation = {"eos_token_id": EOS_TOKEN_IDS, "pad_token_id": PAD_TOKEN_ID,
                  "bos_token_id": None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if cfg.vision is not None:
        processor = ImageProcessorConfig(patch_size=cfg.vision.patch_size,
                                         temporal_patch_size=cfg.vision.temporal_patch_size,
                                         merge_size=cfg.vision.spatial_merge_size)
        (out / "preprocessor_config.json").write_text(
            json.dumps(processor.to_hf_dict(), indent=2) + "\n")
    return out
