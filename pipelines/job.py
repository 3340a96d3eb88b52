"""A batch job end to end: plan shards, skip committed ones, stream the rest through Ray Data.

    shards (driver) → read + preprocess (CPU tasks, one per shard) → infer (actor pool of
    ModelReplica) → driver: group results by shard, commit each complete shard atomically

The driver counts the rows of each shard it has received (by row key, so a task that Ray
retried after a replica died cannot double a row) and commits the shard the moment all its rows
are in. A killed job loses only uncommitted shards; the rerun skips every `part-*` file it finds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from pipelines.plan import Shard, plan_shards
from pipelines.progress import Progress
from pipelines.prompts import prepare
from pipelines.readers import read_shard
from pipelines.replica import ModelReplica
from pipelines.spec import JobSpec, spec_json
from pipelines.storage import commit, list_names, locate
from pipelines.writer import committed_keys, write_shard


def read_and_prepare(item: dict, spec_text: str) -> list[dict]:
    """flat_map stage: one shard descriptor in, its fixed-schema records out."""
    spec = JobSpec.model_validate_json(spec_text)
    shard = Shard(**{k: tuple(v) if isinstance(v, list) else v
                     for k, v in json.loads(item["shard"]).items()})
    loc = locate(spec.input.uri, spec.storage)
    root = loc.uri(os.path.dirname(shard.files[0]))
    return [prepare(shard, raw, spec, root) for raw in read_shard(loc, shard)]


READ_CPUS = 0.25             # per read + preprocess task; I/O and templating, mostly waiting
RANK_CPUS = 1                # per rank actor of an ep_size > 1 replica (cluster/replica.py default)


def check_cpus(spec: JobSpec, cluster_cpus: float) -> None:
    """Replicas that take every CPU would starve the read tasks feeding them, and a replica whose
    rank placement group cannot be placed beside its coordinator would wait forever: refuse up
    front. With ep_size > 1 a replica is the coordinator (cpus_per_replica) plus ep_size ranks."""
    r = spec.resources
    ranks = f" + ep_size {r.ep_size} x {RANK_CPUS} per rank" if r.ep_size > 1 else ""
    need = r.replicas * (r.cpus_per_replica + (r.ep_size * RANK_CPUS if ranks else 0)) + READ_CPUS
    if need > cluster_cpus:
        each = f"(cpus_per_replica {r.cpus_per_replica}{ranks})" if ranks else \
            f"cpus_per_replica {r.cpus_per_replica}"
        raise ValueError(f"resources: {r.replicas} replicas x {each} + {READ_CPUS} for reading "
                         f"needs {need:g} CPUs; the Ray cluster has {cluster_cpus:g}")


def build_dataset(spec: JobSpec, shards: list[Shard]):
    import ray.data
    r, text = spec.resources, spec_json(spec)
    items = [{"shard": json.dumps(dataclasses.asdict(s))} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(read_and_prepare, fn_kwargs={"spec_text": text}, num_cpus=READ_CPUS)
    pool = ray.data.ActorPoolStrategy(size=r.replicas)
    # with ep_size > 1 this actor is only the coordinator: the GPUs belong to its rank actors
    return ds.map_batches(ModelReplica, fn_constructor_args=(text,), compute=pool,
                          batch_size=r.batch_size, num_cpus=r.cpus_per_replica,
                          num_gpus=(r.gpus_per_rank if r.ep_size == 1 else 0) or None)


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set inside a Ray job), else start a local one.

    Never the "latest cluster" that a bare `ray.init()` would look up in /tmp/ray: that file
    outlives its cluster, and joining a dead address hangs.
    """
    import ray
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local",
                 log_to_driver=os.environ.get("DELTARAY_RAY_LOGS", "0") == "1")


class ShardCollector:
    """Results arrive in any order, possibly twice; a shard is written once, when complete."""

    def __init__(self, spec: JobSpec, shards: list[Shard], progress: Progress):
        self.spec, self.progress = spec, progress
        self.out = locate(spec.output.uri, spec.storage)
        self.expected = {s.key: s.count for s in shards}
        self.rows: dict[str, dict] = {s.key: {} for s in shards}

    def add(self, result: dict) -> None:
        key = result["_shard"]
        if key not in self.rows:                 # already committed (a late duplicate)
            return
        self.rows[key][(result["_rel"], int(result["_row"]))] = result
        if len(self.rows[key]) == self.expected[key]:
            results = list(self.rows.pop(key).values())
            write_shard(self.out, key, results, self.spec)
            self.progress.add(results)

    @property
    def missing(self) -> list[str]:
        return sorted(self.rows)


def write_summary(spec: JobSpec, progress: Progress) -> None:
    out = locate(spec.output.uri, spec.storage)
    record = {"name": spec.name, "spec": spec.model_dump(mode="json"), **progress.counts(),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    commit(out.fs, f"{out.path}/_job.json", json.dumps(record, indent=2).encode())
    commit(out.fs, f"{out.path}/_SUCCESS", b"")


ATTEMPTS = 3       # a Ray-level failure (lost actor, lost node) resumes from committed shards


class JobFailed(RuntimeError):
    """The job could not finish; what was committed stays, and a rerun resumes from it."""


def run_job(spec: JobSpec, quiet: bool = False, stop_after_shards: int | None = None) -> Progress:
    """Run (or resume) `spec`; returns the counters. `stop_after_shards` ends the run early
    without a summary, as a killed job would (tests and benchmarks use it)."""
    shards = plan_shards(spec)
    out = locate(spec.output.uri, spec.storage)
    done = committed_keys(list_names(out.fs, out.path), spec.output.format)
    progress = Progress(sum(s.count for s in shards),
                        skipped_rows=sum(s.count for s in shards if s.key in done))
    for attempt in range(1, ATTEMPTS + 1):
        todo = [s for s in shards if s.key not in done]
        if not todo:
            break
        try:
            if run_pass(spec, todo, progress, quiet, stop_after_shards):
                return progress
            break
        except ValueError:          # the spec does not fit (e.g. the cluster's CPUs): a user error
            raise
        except Exception as e:
            if not is_ray_failure(e) or attempt == ATTEMPTS:
                raise JobFailed(f"job {spec.name!r} failed (attempt {attempt} of {ATTEMPTS}): "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                                f"committed shards are kept and a rerun resumes") from e
            print(f"[batch] attempt {attempt} lost its workers ({type(e).__name__}); resuming "
                  f"from committed shards", flush=True)
            done = committed_keys(list_names(out.fs, out.path), spec.output.format)
    write_summary(spec, progress)
    print(f"[batch] job {spec.name!r} done -> {spec.output.uri}\n{progress.table()}", flush=True)
    return progress


def is_ray_failure(e: Exception) -> bool:
    """A failure of Ray's machinery (actors, nodes, objects), not of the job's own code."""
    import ray.exceptions
    return isinstance(e, ray.exceptions.RayError) and not isinstance(e, ray.exceptions.RayTaskError)


def run_pass(spec: JobSpec, todo: list, progress: Progress, quiet: bool,
             stop_after_shards: int | None) -> bool:
    """One pass over the shards still to do; True when stopped early on purpose."""
    ensure_ray()
    import ray
    check_cpus(spec, ray.cluster_resources().get("CPU", 0))
    collector = ShardCollector(spec, todo, progress)
    for row in build_dataset(spec, todo).iter_rows():
        collector.add(row)
        if not quiet:
            progress.maybe_print()
        if stop_after_shards is not None and progress.shards_written >= stop_after_shards:
            return True
    if collector.missing:
        raise RuntimeError(f"{len(collector.missing)} shards incomplete: {collector.missing[:3]}")
    return False
