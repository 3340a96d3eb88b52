"""Expert parallelism: (1) measured on CPU with gloo at ep_size 2 on the demo preset — bytes
exchanged per token per MoE layer and the all-to-all share of step time, for a prefill and a
decode step; (2) from the plan model (model/plan.py), Qwen3.5-397B-A17B on 8 / 16 / 32 H200s.

    python -m benchmarks.expert_parallel [--model preset:demo] [--tokens 256] [--seqs 16]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EP = 2
ORIGINAL_ALL_TO_ALL = dist.all_to_all_single


def timed_all_to_all(totals: dict):
    """Wrap dist.all_to_all_single to add up its seconds and the bytes this rank sends away."""
    inner = ORIGINAL_ALL_TO_ALL

    def wrapper(out, inp, output_split_sizes=None, input_split_sizes=None, **kw):
        start = time.perf_counter()
        inner(out, inp, output_split_sizes, input_split_sizes, **kw)
        totals["a2a_s"] += time.perf_counter() - start
        rows = input_split_sizes or [inp.shape[0] // EP] * EP
        row_bytes = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
        totals["bytes"] += sum(n for r, n in enumerate(rows) if r != dist.get_rank()) * row_bytes
    dist.all_to_all_single = wrapper


def step_batch(lens: list[int], cached: list[int]):
    from model.batch import ForwardBatch
    tables = [list(range(i * 64, (i + 1) * 64)) for i in range(len(lens))]
    return ForwardBatch.build(lens, cached, tables, list(range(len(lens))), 16, logits="last")


def rank_main(rank: int, path: str, port: int, tokens: int, seqs: int, queue) -> None:
    from cluster.parallel import expert_parallel, expert_range, init_group
    from model.checkpoint import load_model
    from model.config import ModelConfig
    torch.set_num_threads(1)
    init_group(f"127.0.0.1:{port}", rank, EP, 120, "gloo")
    cfg = ModelConfig.from_pretrained(path)
    model = expert_parallel(load_model(path, experts=expert_range(cfg.num_experts, EP, rank)))
    moe_layers = sum(cfg.layer_is_moe(i) for i in range(cfg.num_hidden_layers))
    cache = model.new_cache(seqs * 64, 16, seqs)
    g = torch.Generator().manual_seed(rank)
    report = {}
    for name, lens, cached in (("prefill", [tokens] * seqs, [0] * seqs),
                               ("decode", [1] * seqs, [tokens] * seqs)):
        ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=g)
        totals = {"a2a_s": 0.0, "bytes": 0}
        timed_all_to_all(totals)
        dist.barrier()
        start = time.perf_counter()
        with torch.inference_mode():
            model(ids, step_batch(lens, cached), cache)
        step_s = time.perf_counter() - start
        dist.all_to_all_single = ORIGINAL_ALL_TO_ALL
        report[name] = (step_s, totals["a2a_s"], totals["bytes"] / (sum(lens) * moe_layers))
    queue.put((rank, report))
    dist.destroy_process_group()


def measure(path: str, tokens: int, seqs: int) -> dict:
    from cluster.parallel import free_port
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, path, port, tokens, seqs, queue))
             for r in range(EP)]
    for p in procs:
        p.start()
    reports = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return reports


def plan_table() -> list[str]:
    from model.config import ModelConfig
    from model.plan import parse_bytes, plan
    cfg = ModelConfig.preset("qwen3.5-397b-a17b")
    rows = ["| H200s | dtype | weights/GPU | max seqs @32K | @256K | @1M | decode roofline @32K (tok/s) |",
            "|---|---|---|---|---|---|---|"]
    for gpus in (8, 16, 32):
        for dtype in ("bf16", "fp8"):
            cells = []
            for length in (32768, 262144, 1048576):
                try:
                    cells.append(plan(cfg, gpus, parse_bytes("141GB"), dtype, length))
                except ValueError:
                    cells.append(None)
            first = next((c for c in cells if c), None)
            weights = f"{first.weight_bytes / 2**30:.1f} GiB" if first else "does not fit"
            seqs = [f"{c.max_seqs:,}" if c else "—" for c in cells]
            roof = f"{cells[0].decode_tokens_per_s:,.0f}" if cells[0] else "—"
            rows.append(f"| {gpus} | {dtype} | {weights} | {' | '.join(seqs)} | {roof} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="preset:demo")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seqs", type=int, default=8)
    args = parser.parse_args()
    from cluster.engine.llm import resolve_model_dir
    path = str(resolve_model_dir(args.model))
    reports = measure(path, args.tokens, args.seqs)
    print(f"ep_size {EP}, {args.model}, gloo on CPU, {args.seqs} sequences per rank, "
          f"prefill {args.tokens} tokens each, then one decode token each")
    for name in ("prefill", "decode"):
        for rank, report in sorted(reports.items()):
            step_s, a2a_s, per_token = report[name]
            print(f"  {name:<8} rank {rank}: step {step_s * 1e3:8.1f} ms, all-to-all "
                  f"{a2a_s * 1e3:7.1f} ms ({a2a_s / step_s:5.1%} of the step), "
                  f"{per_token:,.0f} bytes sent per token per MoE layer")
    print("\nQwen3.5-397B-A17B plan (model/plan.py; 141 GB H200, 90% usable, 4.8 TB/s):")
    print("\n".join(plan_table()))


if __name__ == "__main__":
    main()
