"""Triton short causal conv: packed prefill with a conv-state pool, and single-token decode.

Prefill is two launches so that no program reads a state row another one has already rewritten:
`conv_fwd_kernel` (one program per token block x channel block) computes the outputs from x and
the old states; `conv_state_kernel` (one program per sequence x channel block) then writes each
sequence's last P raw inputs. Accumulation is fp32; bias and SiLU are fused.

Shape legend: T packed tokens, C channels, W taps before the current one (weight [C, W + 1]),
P state columns (P >= W), S slots, N sequences; BT, BC, BP tile sizes.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def conv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, seq_ptr, cu_ptr, state_ptr, slot_ptr, warm_ptr, T, C,
                    W: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_STATE: tl.constexpr):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    tmask, cmask = offs_t < T, offs_c < C
    seq = tl.load(seq_ptr + offs_t, mask=tmask, other=0)
    bos = tl.load(cu_ptr + seq, mask=tmask, other=0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(W + 1):
        pos = offs_t - W + j
        inside = pos >= bos
        mask = (tmask & inside)[:, None] & cmask[None, :]
        val = tl.load(x_ptr + pos[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_STATE:
            slot = tl.load(slot_ptr + seq, mask=tmask, other=0).to(tl.int64)
            warm = tl.load(warm_ptr + seq, mask=tmask, other=0) != 0
            col = P + pos - bos
            hmask = (tmask & ~inside & warm)[:, None] & cmask[None, :]
            val += tl.load(state_ptr + (slot[:, None] * C + offs_c[None, :]) * P + col[:, None],
                           mask=hmask, other=0.0).to(tl.float32)
        acc += val * tl.load(w_ptr + offs_c * (W + 1) + j, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + offs_t[:, None] * C + offs_c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def conv_state_kernel(x_ptr, cu_ptr, state_ptr, slot_ptr, warm_ptr, C,
                      P: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    seq = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    cols = tl.arange(0, BP)
    bos, eos = tl.load(cu_ptr + seq), tl.load(cu_ptr + seq + 1)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    warm = tl.load(warm_ptr + seq + cols * 0) != 0  # as a [BP] vector: scalar masks trip the interpreter
    src = eos - bos - P + cols  # position of column i inside the sequence; < 0 reaches the old state
    cmask, pmask = offs_c < C, cols < P
    from_x = (src >= 0) & pmask
    xv = tl.load(x_ptr + (bos + src)[None, :] * C + offs_c[:, None], mask=cmask[:, None] & from_x[None, :], other=0.0)
    old_mask = cmask[:, None] & (~from_x & pmask & warm)[None, :]
    old = tl.load(state_ptr + (slot * C + offs_c[:, None]) * P + (src + P)[None, :], mask=old_mask, other=0.0)
    new = tl.where(from_x[None, :], xv.to(tl.float32), old.to(tl.float32))
    tl.store(state_ptr + (slot * C + offs_c[:, None]) * P + cols[None, :], new.to(state_ptr.dtype.element_ty),
             mask=cmask[:, None] & pmask[None, :])


@triton.jit
def conv_update_kernel(x_ptr, w_ptr, b_ptr, y_ptr, state_ptr, slot_ptr, C,
                       W: tl.constexpr, P: tl.constexpr, BC: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SILU: tl.constexpr, USE_SLOTS: tl.constexpr):
    n = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = offs_c < C
    slot = n.to(tl.int64)
    if USE_SLOTS:
        slot = tl.load(slot_ptr + n).to(tl.int64)
    row = state_ptr + (slot * C + offs_c) * P
    x = tl.load(x_ptr + n * C + offs_c, mask=cmask, other=0.0).to(tl.float32)
    acc = x * tl.load(w_ptr + offs_c * (W + 1) + W, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    for j in tl.static_range(W):
        acc += tl.load(row + P - W + j, mask=cmask, other=0.0).to(tl.float32) * \
            tl.load(w_ptr + offs_c * (W + 1) + j, mask=cmask, other=0.0).to(tl.float32)
    for i in tl.static_range(P - 1):
        tl.store(row + i, tl.load(row + i + 1, mask=cmask, other=0.0), mask=cmask)
    tl.store(row + P - 1, x.to(state_ptr.dtype.element_ty), mask=cmask)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + n * C + offs_c, acc.to(y_ptr.dtype.element_ty), mask=cmask)


def causal_conv1d_fn_triton(x, weight, bias=None, activation="silu", cu_seqlens=None, conv_states=None,
                            state_indices=None, has_initial_state=None):
    """Triton `kernels.causal_conv1d_fn` (same contract)."""
    assert activation in (None, "silu"), f"unsupported activation {activation!r}"
    x, weight = x.contiguous(), weight.contiguous()
    T, C = x.shape
    W = weight.shape[1] - 1
    cu = (torch.tensor([0, T]) if cu_seqlens is None else cu_seqlens).to(device=x.device, dtype=torch.int32)
    N = len(cu) - 1
    seq_T = torch.repeat_interleave(torch.arange(N, device=x.device, dtype=torch.int32), (cu[1:] - cu[:-1]).long())
    has_state = conv_states is not None
    P = conv_states.shape[-1] if has_state else W
    slots = (torch.arange(N, device=x.device) if state_indices is None else state_indices).to(torch.int32)
    warm = (torch.ones(N, device=x.device, dtype=torch.int32) if has_initial_state is None
            else has_initial_state.to(device=x.device, dtype=torch.int32))
    assert not has_state or conv_states.is_contiguous(), "the conv-state pool must be contiguous"
    y = torch.empty_like(x)
    BT, BC = 16, min(128, triton.next_power_of_2(C))
    conv_fwd_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC))](
        x, weight, bias, y, seq_T, cu, conv_states, slots, warm, T, C, W, P, BT, BC,
        bias is not None, activation == "silu", has_state)
    if has_state:
        conv_state_kernel[(N, triton.cdiv(C, BC))](x, cu, conv_states, slots, warm, C, P,
                                                   triton.next_power_of_2(P), BC)
    return y


def causal_conv1d_update_triton(x, conv_states, weight, bias=None, activation="silu", state_indices=None):
    """Triton `kernels.causal_conv1d_update` (same contract; pool rows updated in place)."""
    assert activation in (None, "silu"), f"unsupported activation {activation!r}"
    assert conv_states.is_contiguous(), "the conv-state pool must be contiguous"
    x, weight = x.contiguous(), weight.contiguous()
    N, C = x.shape
    y = torch.empty_like(x)
    BC = min(256, triton.next_power_of_2(C))
    conv_update_kernel[(N, triton.cdiv(C, BC))](x, weight, bias, y, conv_states, state_indices, C,
                                                weight.shape[1] - 1, conv_states.shape[-1], BC,
                                                bias is not None, activation == "silu", state_indices is not None)
    return y
