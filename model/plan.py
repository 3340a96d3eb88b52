"""Capacity planning for `deltaray model plan`: how a model splits over GPUs and how many
sequences fit.

A replica is `ep` ranks (one GPU each); every rank holds the non-expert weights (replicated) and
1/ep of the routed experts, and owns its own sequences: their paged K/V (full-attention layers
only) and one Gated DeltaNet state (fp32 recurrent + conv window) each. fp8 stores the weights
in one byte per parameter; the cache stays bf16 (the recurrent state fp32) either way.

Decode roofline: one decode step on a rank reads its weights once plus every running
sequence's K/V and state, at the GPU's memory bandwidth; tokens/s = sequences / step time,
summed over the replica's ranks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from model.config import ModelConfig
from model.footprint import parameter_counts

WEIGHT_BYTES = {"bf16": 2, "fp8": 1}
CACHE_BYTES = 2                         # K/V and conv window in bf16
H200_BANDWIDTH = 4.8e12                 # bytes/s, HBM3e
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'141GB' (decimal) or '131GiB' (binary) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"--gpu-memory: cannot read {text!r}; write e.g. 141GB or 131GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """K and V of one token over every full-attention layer."""
    return cfg.num_full_attention_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * CACHE_BYTES


def recurrent_bytes_per_seq(cfg: ModelConfig) -> int:
    """fp32 delta-rule state [HV, K, V] of one sequence over every Gated DeltaNet layer."""
    return (cfg.num_linear_attention_layers * cfg.linear_num_value_heads
            * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4)


def conv_bytes_per_seq(cfg: ModelConfig) -> int:
    return cfg.num_linear_attention_layers * cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * CACHE_BYTES


@dataclass
class Plan:
    gpus: int
    ep: int
    replicas: int
    weight_bytes: int               # per GPU
    kv_per_token: int
    state_per_seq: int              # recurrent + conv
    recurrent_per_seq: int
    cache_bytes: int                # per GPU, after weights
    max_model_len: int
    seqs_per_gpu: int
    bandwidth: float

    @property
    def bytes_per_seq(self) -> int:
        return self.max_model_len * self.kv_per_token + self.state_per_seq

    @property
    def max_seqs(self) -> int:
        """Concurrent sequences at max_model_len over all GPUs."""
        return self.seqs_per_gpu * self.gpus

    @property
    def decode_tokens_per_s(self) -> float:
        """Roofline over all GPUs with every slot full at max_model_len."""
        step_s = (self.weight_bytes + self.seqs_per_gpu * self.bytes_per_seq) / self.bandwidth
        return self.gpus * self.seqs_per_gpu / step_s


def plan(cfg: ModelConfig, gpus: int, gpu_memory: int, dtype: str, max_model_len: int,
         ep: int | None = None, utilization: float = 0.9,
         bandwidth: float = H200_BANDWIDTH) -> Plan:
    """Raises ValueError (one line) when the model does not fit."""
    ep = ep or gpus
    if dtype not in WEIGHT_BYTES:
        raise ValueError(f"--dtype: choose one of {sorted(WEIGHT_BYTES)}, not {dtype!r}")
    if gpus % ep or (cfg.is_moe and cfg.num_experts % ep):
        raise ValueError(f"--ep {ep} must divide --gpus {gpus} and the {cfg.num_experts} experts")
    counts = parameter_counts(cfg)
    routed = counts.routed_experts if cfg.is_moe else 0
    weights = ((counts.total - routed) + routed // ep) * WEIGHT_BYTES[dtype]
    cache = int(gpu_memory * utilization) - weights
    if cache <= 0:
        raise ValueError(f"does not fit: {weights / 2**30:,.1f} GiB of weights per GPU exceed "
                         f"{utilization:.0%} of {gpu_memory / 2**30:,.1f} GiB; use more GPUs, "
                         f"a larger --ep or fp8")
    kv, rec = kv_bytes_per_token(cfg), recurrent_bytes_per_seq(cfg)
    state = rec + conv_bytes_per_seq(cfg)
    seqs = cache // (max_model_len * kv + state)
    if seqs == 0:
        raise ValueError(f"does not fit: one sequence of {max_model_len} tokens needs "
                         f"{(max_model_len * kv + state) / 2**30:,.2f} GiB, only "
                         f"{cache / 2**30:,.2f} GiB per GPU is left after the weights")
    return Plan(gpus, ep, gpus // ep, weights, kv, state, rec, cache, max_model_len, seqs, bandwidth)


def describe(p: Plan) -> list[str]:
    gib = 2**30
    return [
        f"layout            {p.replicas} replica(s) x ep {p.ep} ranks (one GPU each)",
        f"weights per GPU   {p.weight_bytes / gib:,.2f} GiB",
        f"KV per token      {p.kv_per_token / 1024:,.2f} KiB (full-attention layers only)",
        f"GDN state per seq {p.state_per_seq / 2**20:,.2f} MiB "
        f"({p.recurrent_per_seq / 2**20:,.2f} MiB recurrent fp32 + conv window)",
        f"cache per GPU     {p.cache_bytes / gib:,.2f} GiB after weights",
        f"max sequences     {p.max_seqs:,} at {p.max_model_len:,} tokens "
        f"({p.seqs_per_gpu:,} per GPU)",
        f"decode roofline   {p.decode_tokens_per_s:,.0f} tokens/s "
        f"(all slots full, {p.bandwidth / 1e12:g} TB/s per GPU)",
    ]


def cmd_model_plan(args) -> None:
    """`deltaray model plan` (registered in cluster/cli.py)."""
    from pathlib import Path
    target = Path(args.model)
    cfg = ModelConfig.from_pretrained(target) if target.exists() else ModelConfig.preset(args.model)
    result = plan(cfg, args.gpus, parse_bytes(args.gpu_memory), args.dtype, args.max_model_len,
                  args.ep)
    print("\n".join(describe(result)))


def add_plan_parser(model_sub) -> None:
    p = model_sub.add_parser("plan", help="per-GPU weights, cache and max sequences")
    p.add_argument("--model", required=True, help="checkpoint directory or preset name")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", default="141GB")
    p.add_argument("--dtype", default="bf16", choices=sorted(WEIGHT_BYTES))
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--ep", type=int, default=None, help="ranks per replica (default: --gpus)")
    p.set_defaults(func=cmd_model_plan)
