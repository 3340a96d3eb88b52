"""`deltaray k8s render`: its output passes the same validation as the overlays, is sized from
the spec, and bad specs give one line naming the field."""
from __future__ import annotations

import pytest
import yaml

from cluster.cli import main
from tests.k8s.schemas import K8S, by_kind, cluster_spec, containers, gpus, pinned, validate

H200_JOB = K8S / "overlays" / "h200x8" / "job.yaml"
DEV_JOB = K8S / "overlays" / "cpu-dev" / "job.yaml"


def render(capsys, *argv) -> dict[str, dict]:
    assert main(["k8s", "render", *argv]) == 0
    return by_kind([o for o in yaml.safe_load_all(capsys.readouterr().out) if o])


def render_error(capsys, *argv) -> str:
    assert main(["k8s", "render", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def write(tmp_path, text: str, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_rendered_job_validates_and_carries_the_spec(capsys):
    objects = render(capsys, "--job", str(DEV_JOB))
    assert set(objects) == {"ConfigMap", "RayJob"}
    for obj in objects.values():
        validate(obj)
    assert objects["ConfigMap"]["data"]["job.yaml"] == DEV_JOB.read_text()   # as written
    job = objects["RayJob"]
    assert job["metadata"]["name"] == "demo"
    assert job["spec"]["entrypoint"] == "deltaray batch run /etc/deltaray/job.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    spec = cluster_spec(job)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    assert gpus(group["template"]["spec"]["containers"][0]) == 0
    assert float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) >= 1


def test_rendered_versions_equal_the_pins(capsys, tmp_path):
    project, ray = pinned()
    serve = write(tmp_path, "model: preset:demo\n")
    for obj in (render(capsys, "--job", str(H200_JOB))["RayJob"],
                render(capsys, "--serve", serve)["RayService"]):
        assert cluster_spec(obj)["rayVersion"] == ray
        assert {c["image"] for c in containers(obj)} == {f"deltaray:{project}-ray{ray}"}


def test_rendered_h200_job_gives_each_replica_ep_size_gpus(capsys):
    raw = yaml.safe_load(H200_JOB.read_text())
    res = raw["resources"]
    job = render(capsys, "--job", str(H200_JOB))["RayJob"]
    validate(job)
    (group,) = cluster_spec(job)["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert gpus(pod["containers"][0]) == res["ep_size"] * res["gpus_per_rank"] == 8
    assert group["maxReplicas"] == res["replicas"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    cache = [v for v in pod["volumes"] if "hostPath" in v]      # s3:// weights cached per node
    assert len(cache) == 1 and any(m["name"] == cache[0]["name"]
                                   for m in pod["containers"][0]["volumeMounts"])


def test_a_replica_wider_than_a_node_takes_whole_nodes(capsys, tmp_path):
    text = H200_JOB.read_text().replace("ep_size: 8", "ep_size: 16")
    job = render(capsys, "--job", write(tmp_path, text))["RayJob"]
    validate(job)
    (group,) = cluster_spec(job)["workerGroupSpecs"]
    assert gpus(group["template"]["spec"]["containers"][0]) == 8
    assert group["minReplicas"] == 2 and group["maxReplicas"] == 4 * 2


def test_rendered_service_validates_and_serves_the_config(capsys, tmp_path):
    from cluster.serve_config import ServeConfig
    raw = {"model": "preset:demo", "num_cpus": 2,
           "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}}
    service = render(capsys, "--serve", write(tmp_path, yaml.safe_dump(raw)))["RayService"]
    validate(service)
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == \
        ServeConfig.model_validate(raw).to_serve_config()
    (group,) = cluster_spec(service)["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 3)
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
    keys = [e for e in worker["env"] if e["name"] == "DELTARAY_API_KEYS"]
    assert keys == [{"name": "DELTARAY_API_KEYS", "valueFrom": {"secretKeyRef": {
        "name": "deltaray-api-keys", "key": "api-keys"}}}]


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.replace("ep_size: 8", "ep_size: eight"), "resources.ep_size"),
    (lambda s: s.replace("replicas: 4", "replicas: 0"), "resources.replicas"),
    (lambda s: s.replace("gpus_per_rank: 1", "gpus_per_rank: 0.3"), "resources.gpus_per_rank"),
    (lambda s: s.replace("ep_size: 8", "ep_size: 12"), "resources"),
    (lambda s: s.replace("name: qwen35-397b-batch", "name: '***'"), "name"),
    (lambda s: s.replace("model: s3://models/Qwen3.5-397B-A17B/", "model: 7"), "model"),
    (lambda s: s.replace("anonymous: false", "anonymous: maybe"), "storage.anonymous"),
])
def test_bad_job_specs_name_the_field(capsys, tmp_path, edit, field):
    text = edit(H200_JOB.read_text())
    assert text != H200_JOB.read_text()
    assert f"job spec: {field}:" in render_error(capsys, "--job", write(tmp_path, text))


def test_bad_serve_config_and_missing_file(capsys, tmp_path):
    err = render_error(capsys, "--serve", write(tmp_path, "model: preset:demo\nnum_replica: 2\n"))
    assert "serve config: num_replica:" in err
    assert "does not exist" in render_error(capsys, "--job", str(tmp_path / "nope.yaml"))
    assert "not valid YAML" in render_error(capsys, "--job", write(tmp_path, "a: [1,"))
