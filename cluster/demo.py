"""`make demo`: a handful of chat completions from the demo checkpoint, with timings.

The weights are random, so the text is noise; what the demo shows is the whole path working:
preset checkpoint written and loaded, the real Qwen3.5 tokenizer and chat template, continuous
batching over the hybrid cache, and the throughput of this machine.
"""
from __future__ import annotations

import time

QUESTIONS = [
    "Summarise the plot of Hamlet in one sentence.",
    "Traduis en anglais : « Le chat dort sur le canapé. »",
    "用一句话解释什么是线性注意力。",
    "Write a haiku about object storage.",
    "ما هي عاصمة المغرب؟",
    "List three prime numbers greater than 100.",
]


def run_demo(model: str = "preset:demo", max_tokens: int = 24) -> None:
    from cluster.engine import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="float32", device="cpu", seed=0)
    t_load = time.perf_counter() - t0
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=0)
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params, enable_thinking=False)
    elapsed = time.perf_counter() - t0
    for q, out in zip(QUESTIONS, outputs):
        completion = out.outputs[0]
        print(f"\n>>> {q}\n<<< {completion.text!r}  [{len(completion.token_ids)} tokens, "
              f"{completion.finish_reason}]")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\nmodel {model}: loaded in {t_load:.1f}s; {len(outputs)} requests, {prompt_tokens} prompt "
          f"+ {generated} generated tokens in {elapsed:.2f}s "
          f"({generated / elapsed:.1f} generated tokens/s, batched)")


def show_output(directory: str, rows: int = 6) -> None:
    """Print the first rows a batch job wrote (Parquet parts), one line each."""
    import glob

    import pyarrow.parquet as pq
    parts = sorted(glob.glob(f"{directory}/part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet files in {directory}")
    table = pq.read_table(parts).slice(0, rows)
    print(f"\nfirst {table.num_rows} rows of {directory} (random weights, so the text is noise):")
    for row in table.to_pylist():
        shown = row["error"] or repr(row["text"])
        print(f"  {row['id']:<28} {row.get('lang') or '':<4} {shown[:90]}")


if __name__ == "__main__":
    import sys
    show_output(sys.argv[1])
