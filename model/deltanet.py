"""Gated DeltaNet: the linear-attention mixer of 3 in every 4 layers.

x -> [q|k|v] projection -> causal depthwise conv + SiLU -> split heads; decay g and write
strength beta from their own projections; the gated delta rule (value head h reads key head
h // (HV/HK)) with l2-normalised q, k; a gated RMSNorm per value head with silu(z); out_proj.
The conv window and the float32 recurrent state live in per-sequence slots of the cache.

Legend: T packed new tokens, N sequences, H hidden, C conv channels (2*HK*K + HV*V),
HK key heads, HV value heads, K key head dim, V value head dim, W conv kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import (causal_conv1d_fn, causal_conv1d_update, chunk_gated_delta_rule,
                     fused_recurrent_gated_delta_rule)
from model.batch import ForwardBatch
from model.norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden: int, num_k_heads: int, num_v_heads: int, k_dim: int, v_dim: int,
                 conv_kernel: int, eps: float):
        super().__init__()
        self.HK, self.HV, self.K, self.V = num_k_heads, num_v_heads, k_dim, v_dim
        conv_dim = 2 * num_k_heads * k_dim + num_v_heads * v_dim
        self.in_proj_qkv = nn.Linear(hidden, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, num_v_heads * v_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, conv_kernel, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(num_v_heads))
        self.norm = GatedRMSNorm(v_dim, eps)
        self.out_proj = nn.Linear(num_v_heads * v_dim, hidden, bias=False)

    def forward(self, x_TH: torch.Tensor, batch: ForwardBatch, conv_pool: torch.Tensor,
                ssm_pool: torch.Tensor) -> torch.Tensor:
        T, HV, V = x_TH.shape[0], self.HV, self.V
        qkv_TC = self.in_proj_qkv(x_TH)
        z_TVd = self.in_proj_z(x_TH).view(T, HV, V)
        beta_TV = torch.sigmoid(self.in_proj_b(x_TH))
        g_TV = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x_TH).float() + self.dt_bias)
        o_THVV = qkv_TC.new_empty(T, HV, V)
        for part, rows in batch.decode_split:     # a mixed step: decodes and prefills apart
            o_THVV[rows] = self.mix(qkv_TC[rows], g_TV[rows], beta_TV[rows], part, conv_pool,
                                    ssm_pool)
        o_THVV = self.norm(o_THVV, z_TVd)
        return self.out_proj(o_THVV.reshape(T, HV * V))

    def mix(self, qkv_TC, g_TV, beta_TV, batch: ForwardBatch, conv_pool, ssm_pool):
        """Conv + gated delta rule for the sequences of `batch` (all decoding, or none)."""
        T, HK, HV, K, V = qkv_TC.shape[0], self.HK, self.HV, self.K, self.V
        q_TX, k_TX, v_TX = self.conv(qkv_TC, batch, conv_pool).split([HK * K, HK * K, HV * V], -1)
        return self.delta_rule(q_TX.reshape(T, HK, K), k_TX.reshape(T, HK, K),
                               v_TX.reshape(T, HV, V), g_TV, beta_TV, batch, ssm_pool)

    def conv(self, qkv_TC, batch: ForwardBatch, conv_pool):
        weight_CW = self.conv1d.weight.squeeze(1)
        if batch.is_decode:
            return causal_conv1d_update(qkv_TC, conv_pool, weight_CW, state_indices=batch.state_slots)
        return causal_conv1d_fn(qkv_TC, weight_CW, cu_seqlens=batch.cu_seqlens, conv_states=conv_pool,
                                state_indices=batch.state_slots,
                                has_initial_state=batch.has_initial_state)

    def delta_rule(self, q_THK, k_THK, v_THV, g_TV, beta_TV, batch: ForwardBatch, ssm_pool):
        """Decode updates the state slots in place; prefill gathers, runs chunked, scatters back."""
        if batch.is_decode:   # one token per sequence: batch rows are sequences
            o, _ = fused_recurrent_gated_delta_rule(
                q_THK[:, None], k_THK[:, None], v_THV[:, None], g_TV[:, None], beta_TV[:, None],
                initial_state=ssm_pool, ssm_state_indices=batch.state_slots,
                use_qk_l2norm_in_kernel=True)
            return o[:, 0]
        slots = batch.state_slots
        init_NHKV = ssm_pool[slots] * batch.has_initial_state[:, None, None, None]
        o, final_NHKV = chunk_gated_delta_rule(
            q_THK[None], k_THK[None], v_THV[None], g_TV[None], beta_TV[None],
            initial_state=init_NHKV, output_final_state=True, cu_seqlens=batch.cu_seqlens,
            use_qk_l2norm_in_kernel=True)
        ssm_pool[slots] = final_NHKV
        return o[0]
