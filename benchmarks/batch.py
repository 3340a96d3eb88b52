"""Batch pipeline overhead and replica scaling, in one run.

    python benchmarks/batch.py [--model preset:tiny] [--rows 64] [--max-tokens 16]

Prints rows/s and output tokens/s of (a) `LLM.generate`-style `LLM.chat` on the prompts, model
load included, (b) the Ray Data pipeline with 1 replica, and (c) with 2 replicas, all on the
same prompts; then the ratios pipeline(1) / LLM (target >= 0.85) and pipeline(2) / pipeline(1).
Each pipeline run includes its replicas' model load, like (a); Ray is started before timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LANGS = ["The bridge is closed.", "Le pont est fermé.", "Die Brücke ist gesperrt.",
         "El puente está cerrado.", "桥已关闭。", "橋は閉鎖されている。", "Мост закрыт.",
         "الجسر مغلق."]


def corpus(folder: Path, rows: int) -> list[str]:
    texts = [f"{LANGS[i % len(LANGS)]} ({i})" for i in range(rows)]
    with open(folder / "in.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"r{i}", "text": t}, ensure_ascii=False) + "\n")
    return texts


def baseline(model: str, texts: list[str], max_tokens: int) -> tuple[float, int]:
    from cluster.engine import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=model, seed=0)
    outs = llm.chat([[{"role": "user", "content": t}] for t in texts],
                    SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0))
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def pipeline(model: str, folder: Path, replicas: int, max_tokens: int, rows: int):
    from pipelines.job import run_job
    from pipelines.spec import parse_spec
    spec = parse_spec({"name": f"bench-{replicas}", "model": model,
                       "input": {"uri": str(folder / "in.jsonl"), "id_column": "id"},
                       "sampling": {"max_tokens": max_tokens},
                       "output": {"uri": str(folder / f"out-{replicas}"),
                                  "rows_per_shard": max(1, rows // (4 * replicas))},
                       "resources": {"replicas": replicas, "batch_size": max(1, rows // (2 * replicas)),
                                     "cpus_per_replica": 1.75 / replicas}})
    t0 = time.perf_counter()
    progress = run_job(spec, quiet=True)
    return time.perf_counter() - t0, progress.completion_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="preset:tiny")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    folder = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    texts = corpus(folder, args.rows)
    results = {"LLM.chat (load + generate)": baseline(args.model, texts, args.max_tokens)}
    for n in (1, 2):
        results[f"pipeline, {n} replica(s)"] = pipeline(args.model, folder, n, args.max_tokens,
                                                        args.rows)
    print(f"model {args.model}, {args.rows} rows, max_tokens {args.max_tokens}, "
          f"2-core CPU; every run includes one model load per replica")
    print(f"{'run':<30} {'wall s':>8} {'rows/s':>8} {'out tok/s':>10}")
    for name, (wall, tokens) in results.items():
        print(f"{name:<30} {wall:>8.2f} {args.rows / wall:>8.2f} {tokens / wall:>10.2f}")
    base, one, two = (results[k][0] for k in results)
    print(f"pipeline(1 replica) / LLM throughput: {base / one:.2f}  (target >= 0.85)")
    print(f"pipeline(2 replicas) / pipeline(1 replica) throughput: {one / two:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
