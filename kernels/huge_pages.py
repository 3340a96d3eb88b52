"""Fresh CPU buffers backed by transparent huge pages where Linux allows it.

The first write to a fresh multi-MiB CPU tensor takes one page fault per 4 KiB page: about 11 ms
for the 32 MiB output of one 4096-token gated-delta-rule prefill (a tenth of the whole op). Advising
MADV_HUGEPAGE before the first write lets the kernel map 2 MiB pages instead, 512x fewer faults.
It is only a hint: off Linux, with THP disabled, for small or non-CPU buffers, or if the call fails,
the result is exactly `torch.empty`. (Process-wide, PyTorch's THP_MEM_ALLOC_ENABLE=1 does the same
for every allocation of 2 MiB and up.)
"""
import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
_madvise = getattr(ctypes.CDLL(None), "madvise", None) if sys.platform == "linux" else None
if _madvise is not None:
    _madvise.argtypes, _madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int


def empty_on_huge_pages(shape, dtype=torch.float32, device="cpu"):
    """torch.empty(shape), with its whole 2 MiB-aligned pages advised to be huge (CPU, Linux)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _madvise is None or out.device.type != "cpu":
        return out
    begin = out.data_ptr()
    start = (begin + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (begin + out.numel() * out.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        _madvise(start, end - start, MADV_HUGEPAGE)  # a refusal (EINVAL, THP off) leaves plain pages
    return out
