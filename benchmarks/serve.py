"""Online serving vs offline generation on the same prompts (loopback, local Ray Serve).

    python -m benchmarks.serve [--model preset:tiny] [--requests 32] [--max-tokens 32]
                               [--threads 1] [--batched-tokens 8192]

Prints, per concurrency (1, 8, 32): output tokens/s, TTFT p50/p99 and inter-token latency
p50/p99 over streaming completions, and the ratio to offline `LLM.generate` throughput measured
in the same run on the same prompts.

Both sides get the same engine settings (one EngineSettings) and the same torch thread count:
the replica's Ray actor has num_cpus=threads, and Ray sets OMP_NUM_THREADS from it, so the
driver's offline run uses torch.set_num_threads(threads). (Before, offline ran with torch's
default of one thread per core and LLM's 8192 batched tokens, the replica with one thread and
the serve config's 2048: on a shared 2-core machine the 2-thread offline run was slower than
one HTTP request at a time.) Both sides are warmed with one untimed full pass, and offline is
measured again right before each concurrency level (the ratio is to that adjacent run), as the
shared machine's speed drifts by more than the effect being measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time

import httpx

ENGINE = {"max_model_len": 512, "max_num_seqs": 32, "kv_cache_memory": 128 << 20}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def one(client, prompt: str, max_tokens: int) -> tuple[int, float, list[float]]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, stamps, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return tokens, stamps[0] - start, gaps


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int):
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def bounded(p):
            async with gate:
                return await one(client, p, max_tokens)
        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        return results, time.perf_counter() - start


def offline(llm, prompts: list[str], max_tokens: int) -> float:
    """Output tokens/s of one LLM.generate over all prompts."""
    from cluster.engine import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def report(concurrency: int, results, wall: float, baseline: float) -> None:
    tokens = sum(r[0] for r in results)
    ttft = [r[1] for r in results]
    itl = [g for r in results for g in r[2]]
    print(f"concurrency {concurrency:>2}: {tokens / wall:8.1f} tok/s "
          f"({tokens / wall / baseline:.2f}x offline)  TTFT p50 {pct(ttft, .5) * 1e3:7.1f} ms "
          f"p99 {pct(ttft, .99) * 1e3:7.1f} ms  ITL p50 {pct(itl, .5) * 1e3:6.1f} ms "
          f"p99 {pct(itl, .99) * 1e3:6.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="preset:tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batched-tokens", type=int, default=8192)
    args = parser.parse_args()
    import ray
    import torch
    from ray import serve

    from cluster.engine import LLM
    from cluster.serve_app import build_app
    from cluster.serve_config import EngineSettings, ServeConfig
    settings = EngineSettings(**ENGINE, max_num_batched_tokens=args.batched_tokens)
    prompts = [f"Request {i}: write about the number {i * 7}." for i in range(args.requests)]
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, **settings.model_dump())
    offline(llm, prompts, args.max_tokens)          # warm-up: the same full pass
    baseline = offline(llm, prompts, args.max_tokens)
    print(f"offline LLM.generate: {baseline:.1f} output tokens/s ({len(prompts)} prompts, "
          f"{args.threads} thread(s), max_num_batched_tokens {args.batched_tokens})", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=max(2, args.threads + 1), include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeConfig(model=args.model, engine=settings, api_key_env=None,
                                    max_ongoing_requests=64, num_cpus=args.threads)),
              name="bench")
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(load(url, prompts, 32, args.max_tokens))     # warm-up: the same full pass
        for concurrency in (1, 8, 32):
            baseline = offline(llm, prompts, args.max_tokens)
            results, wall = asyncio.run(load(url, prompts, concurrency, args.max_tokens))
            print(f"offline LLM.generate {baseline:8.1f} tok/s, then", end=" ")
            report(concurrency, results, wall, baseline)
    finally:
        serve.shutdown()
        ray.shutdown()

if __name__ == "__main__":
    main()
