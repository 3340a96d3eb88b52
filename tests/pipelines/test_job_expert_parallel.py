"""A batch job whose replica is expert-parallel (`resources.ep_size: 2`) on a real local Ray
cluster, against the one-process `LLM.chat` on the same prompts (greedy).

One Ray start for the file, with 3 logical CPUs: the replica is a coordinator actor
(cpus_per_replica 0.5) plus a placement group of 2 rank actors (1 CPU each), and the read tasks
need 0.25 more, 2.75 in all; the same spec with cpus_per_replica 1 (3.25) is refused up front
instead of waiting forever for its placement group. ep_size 4 is left to tests/cluster (four
rank processes loading torch on 2 cores would make this file several times slower).
"""
from __future__ import annotations

import json

import pytest

from cluster.engine import SamplingParams
from pipelines.job import build_dataset, check_cpus, run_job
from pipelines.spec import parse_spec
from tests.pipelines.conftest import jsonl, news_rows

import ray  # noqa: E402  (a declared dependency)

SAMPLING = {"max_tokens": 4, "temperature": 0.0, "seed": 0}
TEMPLATE = "Translate into English:\n\n{text}"


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def job(model, tmp_path, **resources):
    return parse_spec({
        "name": "ep", "model": str(model), "sampling": SAMPLING,
        "input": {"uri": str(tmp_path / "in.jsonl"), "id_column": "id"},
        "task": {"template": TEMPLATE},
        "output": {"uri": str(tmp_path / "out"), "format": "jsonl", "rows_per_shard": 2},
        "resources": {"batch_size": 4, **resources}})


def rank_groups() -> list[dict]:
    """Placement groups ever made on this cluster that look like a 2-rank replica's."""
    return [g for g in ray.util.placement_group_table().values()
            if [b for b in g["bundles"].values()] == [{"CPU": 1.0}] * 2 and g["strategy"] == "PACK"]


def test_ep_size_2_job_rows_equal_llm_chat(ray_cluster, tmp_path, tiny_checkpoint):
    from cluster.engine import LLM
    rows = news_rows(5)
    (tmp_path / "in.jsonl").write_bytes(jsonl(rows))
    assert rank_groups() == []
    progress = run_job(job(tiny_checkpoint, tmp_path, ep_size=2, cpus_per_replica=0.5), quiet=True)
    assert rank_groups(), "the job did not build an expert-parallel replica"
    got = {r["id"]: r for f in sorted((tmp_path / "out").glob("part-*"))
           for r in map(json.loads, f.read_text().splitlines())}
    assert sorted(got) == [r["id"] for r in rows] and progress.rows_failed == 0
    want = LLM(str(tiny_checkpoint), seed=0).chat(
        [[{"role": "user", "content": TEMPLATE.format(text=r["text"])}] for r in rows],
        SamplingParams(**SAMPLING))
    for row, out in zip(rows, want):
        g = got[row["id"]]
        assert (g["text"], g["error"]) == (out.outputs[0].text, None), row["id"]
        assert g["finish_reason"] == out.outputs[0].finish_reason
        assert g["prompt_tokens"] == len(out.prompt_token_ids)
        assert g["completion_tokens"] == len(out.outputs[0].token_ids) > 0


def test_replica_that_cannot_be_placed_is_refused_not_waited_on(ray_cluster, tmp_path,
                                                                tiny_checkpoint):
    (tmp_path / "in.jsonl").write_bytes(jsonl(news_rows(2)))
    spec = job(tiny_checkpoint, tmp_path, ep_size=2, cpus_per_replica=1)
    with pytest.raises(ValueError, match=r"^resources: 1 replicas x \(cpus_per_replica 1\.0 \+ "
                                         r"ep_size 2 x 1 per rank\) \+ 0\.25 for reading needs "
                                         r"3\.25 CPUs; the Ray cluster has 3$"):
        run_job(spec, quiet=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("part-*"))


def test_cpu_budget_counts_every_replica_s_ranks(tmp_path, tiny_checkpoint):
    spec = job(tiny_checkpoint, tmp_path, replicas=2, ep_size=4, cpus_per_replica=0.5)
    check_cpus(spec, 9.25)                          # 2 x (0.5 + 4) + 0.25
    with pytest.raises(ValueError, match=r"needs 9\.25 CPUs; the Ray cluster has 9$"):
        check_cpus(spec, 9)


class RecordingDataset:
    """Stands in for a Ray Dataset: keeps the options each stage was given."""

    def __init__(self, *args, **kwargs):
        self.stages = []

    def flat_map(self, fn, **options):
        self.stages.append(("flat_map", options))
        return self

    def map_batches(self, fn, **options):
        self.stages.append(("map_batches", options))
        return self


@pytest.mark.parametrize("ep_size, coordinator_gpus", [(1, 1.0), (2, None)])
def test_coordinator_takes_gpus_only_when_it_is_the_whole_replica(
        monkeypatch, tmp_path, tiny_checkpoint, ep_size, coordinator_gpus):
    import ray.data
    monkeypatch.setattr(ray.data, "from_items", RecordingDataset)
    spec = job(tiny_checkpoint, tmp_path, ep_size=ep_size, gpus_per_rank=1)
    stages = dict(build_dataset(spec, []).stages)
    assert stages["map_batches"]["num_gpus"] == coordinator_gpus
    assert stages["map_batches"]["num_cpus"] == spec.resources.cpus_per_replica
