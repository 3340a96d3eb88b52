"""Triton RMSNorms: one program per row, the row held in registers (D <= a few thousand).

Shape legend: R rows, D normalised dim, BD >= D.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, D, eps, BD: tl.constexpr, GATED: tl.constexpr,
                    ROUND_PRODUCT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BD)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if GATED:
        # HF order: w * norm(x) rounded to the input dtype (and the product to w's dtype when that
        # is the same low precision), then * silu(z) in fp32; products spelt in fp32 + rounding
        # because the interpreter cannot multiply bf16
        n = w.to(tl.float32) * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        if ROUND_PRODUCT:
            n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
        z = tl.load(z_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        y = n * z * tl.sigmoid(z)
    else:
        y = normed * (1.0 + w.to(tl.float32))
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x, weight, eps, z=None):
    """Triton `kernels.rms_norm` (z None) or `kernels.gated_rms_norm`: x [..., D] -> [..., D]."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    z2 = z.reshape(-1, D).contiguous() if z is not None else None
    y = torch.empty_like(x2)
    if len(x2):
        round_product = weight.dtype == x.dtype != torch.float32
        rms_norm_kernel[(len(x2),)](x2, z2, weight.contiguous(), y, D, eps, triton.next_power_of_2(D),
                                    z is not None, round_product)
    return y.reshape(x.shape)
