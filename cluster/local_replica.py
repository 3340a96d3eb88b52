"""One model replica in this process: the engine, driven by an AsyncEngine, plus its tokenizer.

The Serve deployment holds exactly one replica object and uses only what is here
(`generate`, `tokenizer`, `max_model_len`, `accepts_images`, `stats`, `check_health`), so the
expert-parallel replica (a group of rank workers, cluster/replica.py) can take its place.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from cluster.engine import LLM, AsyncEngine, RequestError, RequestOutput, SamplingError, SamplingParams
from cluster.serve_config import EngineSettings


class ReplicaDead(RuntimeError):
    """The model failed during a step; the engine state can no longer be trusted."""


@dataclass
class ReplicaStats:
    running: int
    waiting: int
    free_slots: int
    num_slots: int
    free_blocks: int
    num_blocks: int

    @property
    def cache_usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks if self.num_blocks else 0.0


class LocalReplica:
    def __init__(self, model: str, settings: EngineSettings, ep_size: int = 1,
                 gpus_per_rank: float | None = None, image_filesystem=None):
        s = settings
        llm = LLM(model, dtype=s.dtype, device=s.device, seed=s.seed, max_num_seqs=s.max_num_seqs,
                  max_num_batched_tokens=s.max_num_batched_tokens, max_model_len=s.max_model_len,
                  kv_cache_memory=s.kv_cache_memory, block_size=s.block_size, ep_size=ep_size,
                  gpus_per_rank=gpus_per_rank, image_filesystem=image_filesystem)
        self.engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.async_engine = AsyncEngine(llm.engine)
        self.max_model_len = llm.engine.max_model_len
        # a VL checkpoint's engine holds its image processor (the expert-parallel one not yet)
        self.accepts_images = getattr(llm.engine, "processor", None) is not None
        self.error: BaseException | None = None

    async def generate(self, prompt: dict, params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request; leaving early aborts it and frees its slot.

        RequestError / SamplingError mean a bad request (nothing ran); anything else is the
        model failing, which marks the replica dead so health checks replace it.
        """
        if self.error is not None:
            raise ReplicaDead(f"the engine failed earlier: {self.error}")
        try:
            async with aclosing(self.async_engine.generate(prompt, params, request_id)) as outs:
                async for out in outs:       # closed on exit, so an early leave aborts at once
                    yield out
        except (RequestError, SamplingError):
            raise
        except Exception as e:
            self.error = e
            raise ReplicaDead(f"the engine failed: {e}") from e

    def stats(self) -> ReplicaStats:
        e = self.engine
        return ReplicaStats(len(e.scheduler.running),
                            len(e.scheduler.waiting) + len(self.async_engine.pending_adds),
                            e.cache.num_free_slots, e.cache.num_slots,
                            e.cache.num_free_blocks, e.cache.num_blocks)

    def check_health(self) -> None:
        """Raise if the engine cannot serve (a failed step, or a step loop that died)."""
        if self.error is not None:
            raise ReplicaDead(f"the engine failed: {self.error}")
        task = self.async_engine.loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception():
            raise ReplicaDead(f"the engine loop died: {task.exception()}")
