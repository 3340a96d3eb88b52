"""Kernel benchmarks, each figure printed beside its baseline measured in the same run.

CPU (always):
  * gated delta rule: fast chunked path vs the per-token reference at T = 1024, 4096, 16384;
  * MoE: sorted-by-expert path vs a per-token loop (on a token subset, scaled) and vs
    transformers' Qwen3_5MoeExperts / Qwen3_5MoeSparseMoeBlock on the same weights.
GPU (only when CUDA is present): Triton vs the PyTorch path, and vs flash-linear-attention's
chunk_gated_delta_rule when `fla` imports, T = 4K..64K, with TFLOP/s and GB/s vs H200 peak.

Run: python -m benchmarks.kernels [--quick] [--threads N] [--only delta|moe|gpu]
"""
import argparse
import pathlib
import sys
import time

# this script is itself named kernels.py: put the repository root, not benchmarks/, first on the path
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from kernels import chunk_gated_delta_rule, fused_moe, moe_route  # noqa: E402
from kernels.delta_rule_chunked import chunked_gated_delta_rule  # noqa: E402
from kernels.delta_rule_reference import naive_gated_delta_rule  # noqa: E402
from kernels.moe_reference import fused_moe_reference  # noqa: E402

H200_PEAK_TFLOPS_TF32 = 494.7  # dense, no sparsity (bf16 989)
H200_PEAK_TBPS = 4.8


def timed(fn, repeats=1, sync=lambda: None):
    """Best wall time of `repeats` calls (after one warm-up when repeats > 1), in seconds."""
    if repeats > 1:
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def delta_inputs(T, H, HV, K, V, device="cpu", dtype=torch.float32):
    q, k = torch.randn(1, T, H, K, device=device, dtype=dtype), torch.randn(1, T, H, K, device=device, dtype=dtype)
    v = torch.randn(1, T, HV, V, device=device, dtype=dtype)
    g = -torch.rand(1, T, HV, device=device) * 0.1
    return q, k, v, g, torch.rand(1, T, HV, device=device, dtype=dtype)


def bench_delta_rule_cpu(lengths, H=4, HV=16, K=128, V=128, rounds=3):
    """Reference and chunked path take turns for `rounds` rounds (one at the longest length, where
    the reference alone takes ~15 s); each side's best time, so a load spike on the shared
    machine does not land on one side only."""
    print(f"\n## CPU gated delta rule (B=1, H={H}, HV={HV}, K={K}, V={V}, fp32, l2norm in kernel; "
          f"best of {rounds} alternating rounds, 1 at T={max(lengths)})")
    print(f"{'T':>6} {'per-token ref s':>16} {'chunked s':>10} {'speedup':>8} {'max|do|':>9}")
    rows = []
    for T in lengths:
        args = delta_inputs(T, H, HV, K, V)
        kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
        chunked_gated_delta_rule(*args, **kw)                               # warm-up
        t_ref = t_fast = float("inf")
        for _ in range(rounds if T < max(lengths) else 1):
            t_ref = min(t_ref, timed(lambda: naive_gated_delta_rule(*args, **kw)))
            t_fast = min(t_fast, timed(lambda: chunked_gated_delta_rule(*args, **kw)))
        diff = (naive_gated_delta_rule(*args, **kw)[0] - chunked_gated_delta_rule(*args, **kw)[0]).abs().max()
        print(f"{T:>6} {t_ref:>16.3f} {t_fast:>10.3f} {t_ref / t_fast:>7.1f}x {float(diff):>9.1e}")
        rows.append((T, t_ref, t_fast))
    return rows


def hf_moe_block(D, I, E, k, dtype):
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock
    cfg = Qwen3_5MoeTextConfig(hidden_size=D, moe_intermediate_size=I, shared_expert_intermediate_size=I,
                               num_experts=E, num_experts_per_tok=k)
    block = Qwen3_5MoeSparseMoeBlock(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, D ** -0.5)
    return block


def our_moe_block(block, x, k):
    """The same block as HF's, with our routing and routed experts."""
    logits = torch.nn.functional.linear(x, block.gate.weight)
    weights, ids = moe_route(logits, k)
    routed = fused_moe(x, block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
    return routed + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


def interleaved(fns, rounds):
    """Wall times of the named calls over `rounds` rounds in which they take turns (after one
    warm-up call each), so a load that drifts on a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def speedup(times_base, times_ours):
    """'best/best Rx, per-round median Rx': the second pairs calls made moments apart."""
    per_round = sorted(b / o for b, o in zip(times_base, times_ours))
    return f"{min(times_base) / min(times_ours):.2f}x best/best, {per_round[len(per_round) // 2]:.2f}x per-round median"


def expert_matmuls_only(x, w_gate_up, w_down, ids):
    """Just the 2 * E matmuls any exact grouped MoE does at these row counts (no gather, activation,
    weighting or scatter): a floor for our time, and HF's time over it a ceiling for our speedup."""
    counts_E = torch.bincount(ids.flatten(), minlength=w_gate_up.shape[0]).tolist()
    rows_AD = x[:1].expand(sum(counts_E), -1).contiguous()
    I, start = w_down.shape[2], 0
    for expert, count in enumerate(counts_E):
        hidden_RI = torch.nn.functional.linear(rows_AD[start:start + count], w_gate_up[expert])[:, :I]
        torch.nn.functional.linear(hidden_RI, w_down[expert])
        start += count


def bench_moe_cpu(N=2048, D=2048, I=512, E=64, k=8, dtype=torch.bfloat16, loop_tokens=128, rounds=7):
    print(f"\n## CPU MoE (N={N} tokens, D={D}, I={I}, E={E}, top-{k}, {dtype}; best of {rounds} interleaved rounds)")
    block = hf_moe_block(D, I, E, k, dtype)
    x = torch.randn(N, D, dtype=dtype)
    with torch.no_grad():
        _, weights_hf, ids = block.gate(x)
        weights, _ = moe_route(torch.nn.functional.linear(x, block.gate.weight), k)
        w_gu, w_down = block.experts.gate_up_proj, block.experts.down_proj
        t = interleaved(dict(ours=lambda: fused_moe(x, w_gu, w_down, weights, ids),
                             hf=lambda: block.experts(x, ids, weights_hf),
                             matmuls=lambda: expert_matmuls_only(x, w_gu, w_down, ids),
                             block_ours=lambda: our_moe_block(block, x, k),
                             block_hf=lambda: block(x[None])), rounds)
        sub = slice(0, loop_tokens)
        t_loop = timed(lambda: fused_moe_reference(x[sub], w_gu, w_down, weights[sub], ids[sub])) * N / loop_tokens
        y, y_hf = our_moe_block(block, x, k), block(x[None])[0]
        rel = float((y.float() - y_hf.float()).pow(2).mean().sqrt() / y_hf.float().pow(2).mean().sqrt())
    best = {name: min(times) for name, times in t.items()}
    print(f"routed experts: ours {best['ours'] * 1e3:8.1f} ms | HF Qwen3_5MoeExperts {best['hf'] * 1e3:8.1f} ms "
          f"({speedup(t['hf'], t['ours'])}) | per-token loop {t_loop * 1e3:8.1f} ms "
          f"({t_loop / best['ours']:.1f}x, timed on {loop_tokens} tokens, scaled)")
    print(f"  the expert matmuls alone {best['matmuls'] * 1e3:8.1f} ms: HF / matmuls {speedup(t['hf'], t['matmuls'])} "
          f"(ceiling for any exact path built on these matmuls)")
    print(f"whole block:    ours {best['block_ours'] * 1e3:8.1f} ms | HF Qwen3_5MoeSparseMoeBlock "
          f"{best['block_hf'] * 1e3:8.1f} ms ({speedup(t['block_hf'], t['block_ours'])}) | rms-rel diff vs HF {rel:.1e}")
    return dict(best, loop=t_loop)


def delta_rule_flops_bytes(T, H, HV, K, V, C=64):
    """Rough useful work of the chunked form: per chunk and head, KK^T, QK^T, w/u, the state
    read/write and the outputs; bytes = q, k, v (bf16) read once, o written once."""
    per_chunk = 2 * C * C * K * 2 + 2 * C * C * (K + V) + 2 * C * K * V * 3 + 2 * C * C * V
    return per_chunk * (T // C) * HV, 2 * T * (2 * H * K + 2 * HV * V)


def bench_delta_rule_gpu(lengths, H=16, HV=32, K=128, V=128):
    sync = torch.cuda.synchronize
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    except ImportError:
        fla_chunk = None
    print(f"\n## GPU gated delta rule (B=1, H={H}, HV={HV}, K={K}, V={V}, bf16; fla: {fla_chunk is not None})")
    for T in lengths:
        args = delta_inputs(T, H, HV, K, V, device="cuda", dtype=torch.bfloat16)
        kw = dict(output_final_state=True, use_qk_l2norm_in_kernel=True)
        t_triton = timed(lambda: chunk_gated_delta_rule(*args, **kw), repeats=5, sync=sync)
        t_torch = timed(lambda: chunked_gated_delta_rule(*args, **kw), repeats=2, sync=sync)
        flops, nbytes = delta_rule_flops_bytes(T, H, HV, K, V)
        line = (f"T={T:>6}: triton {t_triton * 1e3:8.2f} ms ({flops / t_triton / 1e12:6.1f} TFLOP/s = "
                f"{flops / t_triton / 1e12 / H200_PEAK_TFLOPS_TF32:5.1%} of tf32 peak, "
                f"{nbytes / t_triton / 1e12 / H200_PEAK_TBPS:5.1%} of HBM) | torch {t_torch * 1e3:8.2f} ms "
                f"({t_torch / t_triton:.1f}x)")
        if fla_chunk is not None:
            t_fla = timed(lambda: fla_chunk(*args, **kw), repeats=5, sync=sync)
            line += f" | fla {t_fla * 1e3:8.2f} ms (ours/fla time {t_triton / t_fla:.2f})"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short lengths only (smoke run)")
    parser.add_argument("--only", choices=["delta", "moe", "gpu"], help="run one section only")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 gives stable ratios on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if args.only in (None, "delta"):
        bench_delta_rule_cpu([256, 1024] if args.quick else [1024, 4096, 16384])
    if args.only in (None, "moe"):
        bench_moe_cpu(N=256 if args.quick else 2048)
    if args.only in (None, "gpu"):
        if torch.cuda.is_available():
            bench_delta_rule_gpu([4096] if args.quick else [4096, 16384, 65536])
        else:
            print("\n(no CUDA device: GPU sections skipped)")


if __name__ == "__main__":
    main()
