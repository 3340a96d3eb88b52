"""Public gated delta rule ops: chunked (prefill, any length) and recurrent (decode, slot pools).

Contracts follow flash-linear-attention's so results compare directly. Semantics: qwen35 §4.3
step 7 / §4.4 (decay before the read; the output reads the updated state).

Shape legend: B batch rows, T tokens (packed when cu_seqlens is given, then B = 1), H key heads,
HV value heads (multiple of H; v head h reads key head h // (HV/H)), K key dim, V value dim,
N sequences, S slots of a state pool.
"""
from kernels.delta_rule_chunked import chunked_gated_delta_rule
from kernels.delta_rule_recurrent import recurrent_gated_delta_rule
from kernels.delta_rule_triton import chunk_gated_delta_rule_triton, fused_recurrent_gated_delta_rule_triton


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """Gated delta rule over whole sequences (prefill), chunk size 64.

    q, k [B, T, H, K]; v [B, T, HV, V]; g (log decay, fp32) and beta [B, T, HV];
    scale defaults to K ** -0.5; initial_state [N, HV, K, V] fp32 or None (zeros);
    cu_seqlens [N + 1] int (B must be 1) packs N sequences along T.
    use_qk_l2norm_in_kernel: q, k <- x * rsqrt(sum(x^2) + 1e-6) in fp32 before scaling.
    Returns (o [B, T, HV, V] in v's dtype, final_state [N, HV, K, V] fp32 or None).
    """
    if q.is_cuda:
        return chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, output_final_state,
                                             cu_seqlens, use_qk_l2norm_in_kernel)
    return chunked_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                    cu_seqlens, use_qk_l2norm_in_kernel)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     cu_seqlens=None, ssm_state_indices=None, use_qk_l2norm_in_kernel=False):
    """Gated delta rule token by token (decode; several tokens per sequence allowed).

    Shapes as `chunk_gated_delta_rule`. With ssm_state_indices [N] int64, initial_state is a pool
    [S, HV, K, V] fp32 whose rows ssm_state_indices[i] are read and updated in place (other rows
    untouched); final_state is then the pool itself (or None unless output_final_state).
    Returns (o [B, T, HV, V] in v's dtype, final_state or None).
    """
    if q.is_cuda:
        return fused_recurrent_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                       cu_seqlens, ssm_state_indices, use_qk_l2norm_in_kernel)
    return recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                      cu_seqlens, ssm_state_indices, use_qk_l2norm_in_kernel)
