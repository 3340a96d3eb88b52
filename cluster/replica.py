"""One model replica across `ep_size` Ray actors (cluster/worker.py), each holding a slice of the
routed experts, driven in lock-step by a coordinator in the caller's process.

`ExpertParallelEngine` has the Engine's surface (new_request / add / abort / step /
has_unfinished / max_model_len / scheduler and cache counts), so everything built on an engine
runs unchanged on a multi-rank replica: `LLM(..., ep_size=N)` (cluster/engine/llm.py) installs
it, the batch job's ModelReplica and the server's LocalReplica both build an `LLM`.

Each request lives on one rank (the least loaded when it is added); every `step` steps all
ranks at once. If a rank dies or a step outlasts `timeout_s`, the whole replica is torn down,
in-flight requests are dropped and the step raises `ReplicaUnavailable` (retryable); the next
request rebuilds the replica as a unit.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

from cluster.engine.config import EngineConfig
from cluster.engine.output import RequestOutput
from cluster.worker import RankWorker

STEP_TIMEOUT_S = 120.0        # one step on every rank, and each collective inside it
START_TIMEOUT_S = 600.0       # placement + loading the weights


class ReplicaUnavailable(RuntimeError):
    """A rank died or timed out; the replica is being rebuilt. Retry the request."""
    retryable = True


class ExpertParallelEngine:
    def __init__(self, model_dir: str, ep_size: int, config: EngineConfig, dtype: str = "float32",
                 device: str = "cpu", gpus_per_rank: float = 0, cpus_per_rank: float = 1,
                 timeout_s: float = STEP_TIMEOUT_S):
        self.model_dir, self.ep_size, self.config = str(model_dir), ep_size, config
        self.dtype, self.device, self.timeout_s = dtype, device, timeout_s
        self.bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        self.workers: list = []
        self.owner: dict[str, int] = {}          # request id -> rank running it
        self.rank_stats: list[dict] = []
        self.failure: str | None = None
        self.restarts = 0
        self.start()

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        if not ray.is_initialized():   # RAY_ADDRESS inside a Ray job, else a fresh local Ray
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
        self.pg = placement_group([dict(self.bundle)] * self.ep_size, strategy="PACK")
        ray.get(self.pg.ready(), timeout=START_TIMEOUT_S)
        actor = ray.remote(RankWorker)
        self.workers = [actor.options(
            num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0), max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
        ).remote(self.model_dir, r, self.ep_size, self.config, self.dtype, self.device)
            for r in range(self.ep_size)]
        address = ray.get(self.workers[0].address.remote(), timeout=START_TIMEOUT_S)
        lens = ray.get([w.join.remote(address, self.timeout_s) for w in self.workers],
                       timeout=START_TIMEOUT_S)
        self.max_model_len = lens[0]
        self.rank_stats = ray.get([w.stats.remote() for w in self.workers])
        self.failure = None

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def fail(self, reason: str) -> ReplicaUnavailable:
        """Tear the whole replica down (a rank stuck in a collective is killed too)."""
        self.failure = reason
        self.owner.clear()
        self.shutdown()
        return ReplicaUnavailable(f"expert-parallel replica failed ({reason}); it is being "
                                  f"rebuilt: retry the request")

    def ensure_running(self) -> None:
        if self.failure is not None:
            self.restarts += 1
            self.start()

    @property
    def healthy(self) -> bool:
        return self.failure is None

    # ---- requests (Engine surface) -------------------------------------------------------
    def new_request(self, request_id: str, prompt, params, priority: int = 0):
        """Validated and tokenized on rank 0 (every rank has the same config); raises the
        engine's RequestError / SamplingError for a bad request."""
        self.ensure_running()
        if request_id in self.owner:
            from cluster.engine.engine import RequestError
            raise RequestError(f"request_id {request_id!r} is already running")
        return self.call(self.workers[0].new_request.remote(request_id, prompt, params, priority))

    def add(self, request) -> None:
        self.ensure_running()
        load = [0] * self.ep_size
        for rank in self.owner.values():
            load[rank] += 1
        rank = min(range(self.ep_size), key=lambda r: (load[r], r))
        self.call(self.workers[rank].add.remote(request))
        self.owner[request.request_id] = rank

    def abort(self, request_id: str) -> RequestOutput | None:
        rank = self.owner.pop(request_id, None)
        if rank is None or self.failure is not None:
            return None
        return self.call(self.workers[rank].abort.remote(request_id))

    def has_unfinished(self) -> bool:
        return bool(self.owner)

    def call(self, ref):
        """One rank call; a dead rank or a timeout fails the replica, a request error passes."""
        import ray
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):          # RequestError, SamplingError: a bad request
                raise e.cause from None
            raise self.fail(f"a rank raised {type(e.cause).__name__}: {e.cause}") from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            raise self.fail(f"{type(e).__name__}: {str(e).splitlines()[0]}") from None

    # ---- the lock-step --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.failure is not None:
            raise ReplicaUnavailable(f"expert-parallel replica failed ({self.failure}); retry")
        results = self.gather([w.step.remote() for w in self.workers])
        outs: list[RequestOutput] = []
        for rank_outs, stats in results:
            outs.extend(rank_outs)
        self.rank_stats = [stats for _, stats in results]
        for out in outs:
            if out.finished:
                self.owner.pop(out.request_id, None)
        return outs

    def gather(self, refs: list) -> list:
        """All ranks' results; the first failure (not the slowest rank) ends the wait."""
        import ray
        deadline, pending = time.monotonic() + self.timeout_s, list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise self.fail(f"a step took longer than {self.timeout_s:g}s")
            self.call(ready[0])
        return [self.call(ref) for ref in refs]

    # ---- load, for metrics and admission (the last step's counts) --------------------------
    def total(self, key: str) -> int:
        return sum(s[key] for s in self.rank_stats)

    @property
    def scheduler(self) -> SimpleNamespace:
        return SimpleNamespace(running=range(self.total("running")),
                               waiting=range(self.total("waiting")))

    @property
    def cache(self) -> SimpleNamespace:
        return SimpleNamespace(num_free_slots=self.total("free_slots"),
                               num_slots=self.total("num_slots"),
                               num_free_blocks=self.total("free_blocks"),
                               num_blocks=self.total("num_blocks"))

    def parameter_bytes(self) -> list[dict]:
        return [self.call(w.parameter_bytes.remote()) for w in self.workers]


def attach(llm, model_dir, ep_size: int, config: EngineConfig, dtype: str, device: str,
           gpus_per_rank: float | None = None) -> None:
    """Make `llm` (an LLM) drive an expert-parallel replica instead of an in-process model.
    `llm.model` becomes a weightless (meta-device) copy of the model, for its config and modules."""
    import torch

    from model.config import ModelConfig
    from model.hybrid import HybridForCausalLM
    from model.processor import Tokenizer
    cfg = ModelConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        llm.model = HybridForCausalLM(cfg)
    gpus = gpus_per_rank if gpus_per_rank is not None else (1 if device.startswith("cuda") else 0)
    llm.model_dir, llm.tokenizer, llm.request_counter = model_dir, Tokenizer.from_pretrained(model_dir), 0
    llm.engine = ExpertParallelEngine(str(model_dir), ep_size, config, str(dtype), device, gpus)
