"""RMSNorms of the model: zero-centred RMSNorm and the gated RMSNorm after the delta rule.

Both normalise over the last dim in fp32 (HF Qwen3_5MoeRMSNorm / Qwen3_5MoeRMSNormGated).
Shape legend: R rows (anything in front of the last dim), D normalised dim.
"""
import torch
import torch.nn.functional as F

from kernels.norm_triton import rms_norm_triton


def rms_norm_reference(x, weight, eps):
    """Zero-centred RMSNorm: x [..., D], weight [D] -> (x * rsqrt(mean(x^2) + eps)) * (1 + w), x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm_reference(x, z, weight, eps):
    """Gated RMSNorm, norm before gate: x, z [..., D], weight [D] (plain weight, not 1 + w) ->
    w * norm(x).to(x.dtype) * silu(z) in fp32, cast to x's dtype."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return ((weight * normed) * F.silu(z.float())).to(x.dtype)


def rms_norm_fp32(x, weight, eps):
    """The reference's ops in its order for fp32 x and weight, the scale steps in place:
    bit-identical, ~1.2x faster on CPU."""
    r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return (x * r).mul_(1.0 + weight)


def gated_rms_norm_fp32(x, z, weight, eps):
    """The reference's ops in its order for fp32 x, z and weight, two fewer fresh [R, D] buffers
    (the weight and gate multiplies in place): bit-identical, ~1.5x faster on CPU, where every
    fresh multi-MB buffer is page-faulted in again."""
    r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return (x * r).mul_(weight).mul_(F.silu(z))


def rms_norm(x, weight, eps):
    """Zero-centred RMSNorm over the last dim: x [..., D], weight [D] -> [..., D] in x's dtype."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32:
        return rms_norm_fp32(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def gated_rms_norm(x, z, weight, eps):
    """Gated RMSNorm over the last dim: x, z [..., D], weight [D] -> [..., D] in x's dtype."""
    if x.is_cuda:
        return rms_norm_triton(x, weight, eps, z)
    if x.dtype == z.dtype == weight.dtype == torch.float32:
        return gated_rms_norm_fp32(x, z, weight, eps)
    return gated_rms_norm_reference(x, z, weight, eps)
