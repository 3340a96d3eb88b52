"""Kernels of the hybrid model: gated delta rule, short causal conv, sparse MoE, RMSNorms, and the
greedy lm_head (argmax without materialising logits).

Each public function picks Triton when its tensors are on CUDA and a fast PyTorch path otherwise;
a plain reference lives beside each one (the test oracle).
"""
from kernels.conv import causal_conv1d_fn, causal_conv1d_update
from kernels.delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from kernels.linear_argmax import linear_argmax
from kernels.moe import fused_moe, moe_route
from kernels.norm import gated_rms_norm, rms_norm

__all__ = [
    "causal_conv1d_fn", "causal_conv1d_update", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule",
    "fused_moe", "moe_route", "linear_argmax", "gated_rms_norm", "rms_norm",
]
