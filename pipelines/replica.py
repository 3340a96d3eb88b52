"""The infer stage: a thin callable class for `map_batches` that wraps one model replica (`LLM`).

Each call adds every good row of the batch to the engine at once, so continuous batching runs
over the whole batch; rows the engine refuses (prompt too long, empty) become error rows, and a
crash inside the engine is retried row by row so that one poisoned row cannot fail the batch.
When expert parallelism lands, the `LLM` here becomes the multi-rank replica; the contract
(records in, result rows out) stays.
"""
from __future__ import annotations

import json
import math

from pipelines.spec import JobSpec

RESULT_COLUMNS = ("id", "_shard", "_rel", "_row", "keep", "kind", "text", "finish_reason",
                  "prompt_tokens", "completion_tokens", "logprob_sum", "perplexity", "error")


def image_support(llm) -> str:
    """"" when image rows can run (the engine holds a VL checkpoint's image processor), else the
    reason they cannot (the error row's message)."""
    if getattr(llm.engine, "processor", None) is None:
        return "has no vision tower; image rows need a vision-language checkpoint"
    return ""


def result(record: dict, kind: str, error: str = "") -> dict:
    return {"id": record["id"], "_shard": record["_shard"], "_rel": record["_rel"],
            "_row": int(record["_row"]),
            "keep": record["keep"], "kind": kind, "text": "", "finish_reason": "",
            "prompt_tokens": 0, "completion_tokens": 0, "logprob_sum": math.nan,
            "perplexity": math.nan, "error": error}


def score_fields(out) -> dict:
    """Prompt log-probability sum over tokens 1..n-1 (token 0 has no prediction)."""
    ids = out.prompt_token_ids
    total = sum(out.prompt_logprobs[j][ids[j]] for j in range(1, len(ids)))
    ppl = math.exp(-total / (len(ids) - 1)) if len(ids) > 1 else math.nan
    return {"logprob_sum": total, "perplexity": ppl}


class ModelReplica:
    def __init__(self, spec_json: str):
        from cluster.engine import LLM
        from pipelines.model_fetch import local_model
        self.spec = JobSpec.model_validate_json(spec_json)
        r = self.spec.resources
        self.llm = LLM(model=local_model(self.spec.model, self.spec.storage), dtype=r.dtype,
                       device="cuda" if r.gpus_per_rank > 0 else "cpu",
                       seed=self.spec.sampling.seed or 0, max_num_seqs=r.max_num_seqs,
                       max_model_len=r.max_model_len, ep_size=r.ep_size,
                       gpus_per_rank=r.gpus_per_rank or None)
        self.no_images = image_support(self.llm)

    # ---- one row -> one engine request -------------------------------------------------
    def sampling(self, body: dict | None = None, score: bool = False):
        from cluster.engine import SamplingParams
        if score:
            return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        s = self.spec.sampling.model_dump()
        for key in ("max_tokens", "temperature", "top_p", "seed", "stop"):
            if body and body.get(key) is not None:
                s[key] = body[key]
        if body and body.get("max_completion_tokens") is not None:
            s["max_tokens"] = body["max_completion_tokens"]
        return SamplingParams(**s)

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.llm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=self.spec.task.enable_thinking)

    def user_message(self, record: dict, text: str) -> list[dict]:
        messages = [{"role": "system", "content": record["system"]}] if record["system"] else []
        if not record["image"]:
            return messages + [{"role": "user", "content": text}]
        if self.no_images:
            raise ValueError(f"model {self.spec.model!r} {self.no_images}")
        content = [{"type": "image", "image": bytes(record["image"])},
                   {"type": "text", "text": text}]
        return messages + [{"role": "user", "content": content}]

    def fit(self, record: dict, render) -> str:
        """`render(text)` within task.max_prompt_tokens: an error, or the text cut to fit."""
        prompt, limit = render(record["prompt"]), self.spec.task.max_prompt_tokens
        n = len(self.llm.tokenizer.encode(prompt))
        if limit is None or n <= limit:
            return prompt
        if not self.spec.task.truncate:
            raise ValueError(f"prompt has {n} tokens, over task.max_prompt_tokens={limit}")
        text_ids = self.llm.tokenizer.encode(record["prompt"])
        keep = max(0, len(text_ids) - (n - limit))
        return render(self.llm.tokenizer.decode(text_ids[:keep]))

    def request(self, record: dict):
        """(kind, engine Request) for one record; raises ValueError for a row that cannot run."""
        if record["body"]:
            return self.openai_request(json.loads(record["body"]))
        kind = self.spec.task.kind
        if kind == "chat":
            prompt = self.fit(record, lambda t: self.chat_prompt(self.user_message(record, t)))
        else:
            prompt = self.fit(record, lambda t: t)
        return kind, self.new_request(prompt, self.sampling(score=kind == "score"), record)

    def openai_request(self, body: dict):
        if body.pop("_url") == "/v1/chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("OpenAI batch body needs a non-empty 'messages' list")
            return "chat", self.new_request(self.chat_prompt(messages), self.sampling(body), None)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("OpenAI batch /v1/completions body needs a string 'prompt'")
        return "completion", self.new_request(prompt, self.sampling(body), None)

    def new_request(self, prompt: str, params, record: dict | None):
        payload = {"prompt": prompt}
        if record is not None and record["image"]:
            payload["images"] = [bytes(record["image"])]
        return self.llm.engine.new_request(self.llm.next_id(), payload, params)

    # ---- a batch -----------------------------------------------------------------------
    def __call__(self, batch: dict) -> dict:
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        results, pending = [None] * len(records), {}
        for i, record in enumerate(records):
            if record["error"]:
                results[i] = result(record, self.spec.task.kind, record["error"])
                continue
            try:
                pending[i] = self.request(record)
            except (ValueError, TypeError) as e:
                results[i] = result(record, self.spec.task.kind, str(e).splitlines()[0])
        self.run(records, pending, results)
        return {c: [r[c] for r in results] for c in RESULT_COLUMNS}

    def run(self, records: list[dict], pending: dict, results: list) -> None:
        try:
            outs = self.drive([req for _, req in pending.values()])
        except Exception:                            # isolate the row that breaks the engine
            for i, item in pending.items():
                self.run_alone(records[i], item[0], results, i)
            return
        for (i, (kind, _)), out in zip(pending.items(), outs):
            results[i] = self.fill(result(records[i], kind), kind, out)

    def run_alone(self, record: dict, kind: str, results: list, i: int) -> None:
        try:
            kind, req = self.request(record)          # a fresh request: the failed one was aborted
            results[i] = self.fill(result(record, kind), kind, self.drive([req])[0])
        except Exception as e:
            results[i] = result(record, kind, f"engine failed on this row: {type(e).__name__}: {e}")

    def drive(self, requests: list) -> list:
        engine = self.llm.engine
        try:
            for req in requests:
                engine.add(req)
            return self.llm.run_to_completion([r.request_id for r in requests])
        except Exception:
            for req in requests:
                engine.abort(req.request_id)
            raise

    @staticmethod
    def fill(row: dict, kind: str, out) -> dict:
        row["prompt_tokens"] = len(out.prompt_token_ids)
        if kind == "score":
            return {**row, **score_fields(out)}
        completion = out.outputs[0]
        row.update(text=completion.text, finish_reason=completion.finish_reason or "",
                   completion_tokens=len(completion.token_ids))
        return row
