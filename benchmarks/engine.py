"""Engine benchmark on the `demo` preset (CPU, float32), every figure beside its baseline.

(a) mixed workload: N prompts of 32..max-prompt tokens, max_tokens 16..max-new (seeded, greedy,
    EOS ignored on both sides): useful output tokens/s of `LLM.generate` vs `transformers`
    `generate` on the same weights, batched with left padding (prompts sorted by length, the
    best of the tried batch sizes; a sequence's tokens past its own max_tokens are not useful).
    Ours runs three times, spread over the minutes transformers takes (before it, after its first
    batch size, after its last); the ratio uses the median of the three, so one run slowed by
    another job on the machine does not decide it (each transformers run lasts 3-4x longer and
    averages such stalls out by itself).
(b) decode tokens/s at batch 1, 8, 32, 64 (prefill excluded).
(c) prefill time and peak extra memory (RSS sampled during the step) at 1K, 8K, 32K tokens,
    with the GDN state bytes per sequence (constant) beside the KV bytes (growing).

Writes the tables into the "Engine (CPU)" section of benchmarks/RESULTS.md.
Run: python -m benchmarks.engine [--threads N] [--prompts 64 --max-prompt 1024 --max-new 256] [--quick]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import random
import sys
import threading
import time

sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from cluster.engine import LLM, SamplingParams  # noqa: E402
from model.batch import HybridCache  # noqa: E402

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
SECTION = "## Engine (CPU)"
PAGE = 4096


def workload(n: int, max_prompt: int, max_new: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 240000) for _ in range(rng.randint(32, max_prompt))]
               for _ in range(n)]
    return prompts, [rng.randint(16, max_new) for _ in range(n)]


def ours_mixed(llm: LLM, prompts, limits) -> tuple[float, int]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in limits]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def hf_model(model_dir: pathlib.Path):
    import transformers as tf
    kind = json.loads((model_dir / "config.json").read_text())["model_type"]
    cls = tf.AutoModelForImageTextToText if kind in ("qwen3_5_moe", "qwen3_5") else tf.AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_mixed(model, prompts, limits, batch_size: int, pad_id: int) -> tuple[float, int]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    start, useful = time.perf_counter(), 0
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=max(limits[i] for i in idx), pad_token_id=pad_id)
        useful += sum(limits[i] for i in idx)
    return time.perf_counter() - start, useful


def decode_rate(llm: LLM, batch: int, new_tokens: int) -> float:
    """Tokens/s over steps after every sequence has its first token (prefill excluded)."""
    engine, rng = llm.engine, random.Random(batch)
    for i in range(batch):
        engine.add_request(f"decode-{batch}-{i}", [rng.randrange(1000, 240000) for _ in range(32)],
                           SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += sum(1 for _ in engine.step())
    return tokens / (time.perf_counter() - start)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_during(fn) -> tuple[float, int]:
    """(seconds, peak RSS above the starting RSS) while fn runs, sampled every 5 ms.

    Free heap memory is handed back to the OS first, so new activations show up as RSS growth."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)
    t = threading.Thread(target=sample)
    t.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    return seconds, max(peak[0], rss_bytes()) - base


def prefill_row(model_dir: pathlib.Path, tokens: int, chunk: int) -> dict:
    llm = LLM(str(model_dir), max_num_seqs=1, max_num_batched_tokens=chunk,
              kv_cache_memory=kv_bytes_for(model_dir, tokens + 64))
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1))          # warm-up
    ids = [random.Random(tokens).randrange(1000, 240000) for _ in range(tokens)]
    seconds, extra = peak_rss_during(
        lambda: llm.generate([ids], SamplingParams(temperature=0, max_tokens=1)))
    plan = llm.engine.plan
    kv = -(-tokens // plan.block_size) * plan.bytes_per_block
    return dict(tokens=tokens, seconds=seconds, peak_extra=extra, gdn=plan.bytes_per_slot, kv=kv)


def kv_bytes_for(model_dir: pathlib.Path, tokens: int, block_size: int = 16) -> int:
    from model.config import ModelConfig
    cfg = ModelConfig.from_pretrained(model_dir)
    blocks = -(-tokens // block_size) + 1
    return (blocks * HybridCache.bytes_per_block(cfg, block_size, torch.float32)
            + HybridCache.bytes_per_slot(cfg, torch.float32))


def write_section(text: str) -> None:
    """Replace (or append) only the Engine (CPU) section of RESULTS.md."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("" if end < 0 else old[end:])
    RESULTS.write_text(new.rstrip("\n") + "\n")


def mib(x: int) -> str:
    return f"{x / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--hf-batch-sizes", default="32,64")
    ap.add_argument("--decode-batches", default="1,8,32,64")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--prefill", default="1024,8192,32768")
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens for (c)")
    ap.add_argument("--batched-tokens", type=int, default=8192,
                    help="max_num_batched_tokens for (a) and (b)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_prompt, args.max_new, args.hf_batch_sizes = 4, 64, 24, "4"
        args.decode_batches, args.decode_tokens, args.prefill = "1,4", 4, "1024"
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [SECTION, "", f"`{' '.join(['python -m benchmarks.engine'] + sys.argv[1:])}` — demo preset, "
             f"float32, {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores, load "
             f"average {os.getloadavg()[0]:.1f} at the start (other jobs share the CPU; each "
             "ratio is measured in the same run).", ""]
    if (args.prompts, args.max_prompt, args.max_new) != (64, 1024, 256):
        lines += ["The mixed workload is scaled down from the issue's 64 prompts / 1024 / 256 "
                  "(transformers `generate` at full size takes too long here); both systems run "
                  "the same scaled workload.", ""]
    llm = LLM("preset:demo", max_num_seqs=64, max_num_batched_tokens=args.batched_tokens,
              kv_cache_memory=1 << 30)
    lines += mixed_section(llm, args)
    lines += decode_section(llm, args)
    lines += prefill_section(llm.model_dir, args)
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(text)


def mixed_section(llm: LLM, args) -> list[str]:
    """Ours runs before transformers, after its first batch size and after its last, and counts
    at the median of the three: the machine's speed drifts over the minutes transformers takes."""
    prompts, limits = workload(args.prompts, args.max_prompt, args.max_new)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))                 # warm-up
    ours_runs = []

    def run_ours(when: str) -> int:
        seconds, tokens = ours_mixed(llm, prompts, limits)
        ours_runs.append(seconds)
        print(f"(a) ours ({when}): {tokens} tokens in {seconds:.1f}s", flush=True)
        return tokens

    ours_tokens = run_ours("before transformers")
    hf = hf_model(llm.model_dir)
    pad = 248044
    rows = []
    for bs in [int(b) for b in args.hf_batch_sizes.split(",")]:
        s, useful = hf_mixed(hf, prompts, limits, bs, pad)
        rows.append((bs, s, useful))
        print(f"(a) transformers batch {bs}: {useful} useful tokens in {s:.1f}s", flush=True)
        if len(rows) == 1:
            run_ours("after the first transformers batch size")
    del hf
    run_ours("after transformers")
    ours_s = sorted(ours_runs)[1]
    best = min(rows, key=lambda r: r[1] / r[2])
    ours_rate = ours_tokens / ours_s
    runs = ", ".join(f"{s:.1f}" for s in ours_runs)
    out = [f"### (a) mixed workload: {args.prompts} prompts of 32–{args.max_prompt} tokens, "
           f"max_tokens 16–{args.max_new} (seed 0, greedy, EOS ignored)", "",
           "| system | useful output tokens | seconds | tokens/s |", "|---|---|---|---|",
           f"| `LLM.generate` (max_num_seqs 64, max_num_batched_tokens {args.batched_tokens}; "
           f"median of {runs} s: before, between and after transformers) | "
           f"{ours_tokens} | {ours_s:.1f} | {ours_rate:.2f} |"]
    out += [f"| transformers `generate`, batch {bs}, left padding | {u} | {s:.1f} | {u / s:.2f} |"
            for bs, s, u in rows]
    out += ["", f"**Speed-up vs the best transformers batch size ({best[0]}): "
            f"{ours_rate / (best[2] / best[1]):.2f}x** (target ≥ 3x)", ""]
    return out


def decode_section(llm: LLM, args) -> list[str]:
    out = [f"### (b) decode tokens/s (32-token prompts, {args.decode_tokens} new tokens each, "
           "prefill excluded)", "", "| batch | tokens/s |", "|---|---|"]
    for b in [int(x) for x in args.decode_batches.split(",")]:
        rate = decode_rate(llm, b, args.decode_tokens)
        print(f"(b) batch {b}: {rate:.2f} tokens/s", flush=True)
        out.append(f"| {b} | {rate:.2f} |")
    return out + [""]


def prefill_section(model_dir: pathlib.Path, args) -> list[str]:
    out = [f"### (c) prefill of one prompt (chunks of {args.chunk} tokens)", "",
           "| prompt tokens | seconds | peak extra RSS | GDN state / sequence | KV cache / sequence |",
           "|---|---|---|---|---|"]
    for n in [int(x) for x in args.prefill.split(",")]:
        r = prefill_row(model_dir, n, args.chunk)
        print(f"(c) {n} tokens: {r['seconds']:.1f}s, peak +{mib(r['peak_extra'])}, "
              f"GDN {mib(r['gdn'])}, KV {mib(r['kv'])}", flush=True)
        out.append(f"| {n} | {r['seconds']:.1f} | {mib(r['peak_extra'])} | {mib(r['gdn'])} | "
                   f"{mib(r['kv'])} |")
    return out + ["", "GDN state is one fixed slot per sequence (conv window + fp32 recurrent "
                  "state over the linear-attention layers); KV grows with the prompt (full-attention "
                  "layers only).", ""]


if __name__ == "__main__":
    main()
