"""Online serving vs offline generation on the same prompts (loopback, local Ray Serve).

    python -m benchmarks.serve [--model preset:tiny] [--requests 32] [--max-tokens 32]

Prints, per concurrency (1, 8, 32): output tokens/s, TTFT p50/p99 and inter-token latency
p50/p99 over streaming chat completions, and the ratio to offline `LLM.generate` throughput
measured in the same run on the same prompts.
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
            "stream": True}
    start, stamps, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                tokens += 1 if json.loads(line[6:])["choices"][0]["text"] else 0
                stamps.append(time.perf_counter())
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="preset:tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    import ray
    from ray import serve

    from cluster.engine import LLM, SamplingParams
    from cluster.serve_app import build_app
    from cluster.serve_config import ServeConfig
    prompts = [f"Request {i}: write about the number {i * 7}." for i in range(args.requests)]
    llm = LLM(args.model, **{k: v for k, v in ENGINE.items()})
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], params)           # warm-up, as the server is warm after its first
    start = time.perf_counter()
    llm.generate(prompts, params)
    offline = len(prompts) * args.max_tokens / (time.perf_counter() - start)
    del llm
    print(f"offline LLM.generate: {offline:.1f} output tokens/s ({len(prompts)} prompts)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeConfig(model=args.model, engine=ENGINE, api_key_env=None,
                                    max_ongoing_requests=64)), name="bench")
    url = f"http://127.0.0.1:{port}"
    try:
        for concurrency in (1, 8, 32):
            results, wall = asyncio.run(load(url, prompts, concurrency, args.max_tokens))
            tokens = sum(r[0] for r in results)
            ttft = [r[1] for r in results]
            itl = [g for r in results for g in r[2]]
            print(f"concurrency {concurrency:>2}: {tokens / wall:8.1f} tok/s "
                  f"({tokens / wall / offline:.2f}x offline)  TTFT p50 {pct(ttft, .5) * 1e3:7.1f} ms "
                  f"p99 {pct(ttft, .99) * 1e3:7.1f} ms  ITL p50 {pct(itl, .5) * 1e3:6.1f} ms "
                  f"p99 {pct(itl, .99) * 1e3:6.1f} ms")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
