"""The kustomize base and overlays under k8s/: rendered with `kubectl kustomize`, every object
validated (KubeRay CRDs, core schemas), and the cross-checks between them and the project."""
from __future__ import annotations

import copy
import importlib
import re

import pytest
import yaml

from tests.k8s.schemas import (K8S, REPO, by_kind, cluster_spec, containers, gpus, kustomize,
                               pinned, validate)

OVERLAYS = ["base", "overlays/cpu-dev", "overlays/h200x8"]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> dict[str, dict]:
    return by_kind(kustomize(K8S / request.param))


def serve_app_config(service: dict) -> dict:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return app


def job_spec(objects: dict) -> dict:
    return yaml.safe_load(objects["ConfigMap"]["data"]["job.yaml"])


def test_every_object_validates(rendered):
    assert set(rendered) == {"ConfigMap", "RayCluster", "RayService", "RayJob"}
    for obj in rendered.values():
        validate(obj)


def test_validator_rejects_a_misspelt_field_and_a_wrong_type(rendered):
    typo = copy.deepcopy(rendered["RayCluster"])
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(AssertionError, match="maxReplica"):
        validate(typo)
    wrong = copy.deepcopy(rendered["RayJob"])
    wrong["spec"]["backoffLimit"] = "two"
    with pytest.raises(AssertionError, match="backoffLimit"):
        validate(wrong)
    core = copy.deepcopy(rendered["ConfigMap"])
    core["datas"] = {}
    with pytest.raises(Exception, match="datas"):
        validate(core)


def test_ray_version_and_image_tag_equal_the_pins(rendered):
    project, ray = pinned()
    for kind in ("RayCluster", "RayService", "RayJob"):
        assert cluster_spec(rendered[kind])["rayVersion"] == ray
        for container in containers(rendered[kind]):
            assert container["image"].rsplit(":", 1)[1] == f"{project}-ray{ray}", container["name"]


def test_service_and_job_embed_the_cluster_spec(rendered):
    """One cluster spec: the RayService adds only the Serve readiness probe and its API keys."""
    cluster = cluster_spec(rendered["RayCluster"])
    assert cluster_spec(rendered["RayJob"]) == cluster
    served = copy.deepcopy(cluster_spec(rendered["RayService"]))
    for container in containers({"kind": "RayCluster", "spec": served}):
        container.pop("readinessProbe", None)
        container["env"] = [e for e in container["env"] if e["name"] != "DELTARAY_API_KEYS"]
    assert served == cluster


def test_head_runs_no_work_and_workers_autoscale(rendered):
    for kind in ("RayCluster", "RayService", "RayJob"):
        spec = cluster_spec(rendered[kind])
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["enableInTreeAutoscaling"] is True
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            (worker,) = group["template"]["spec"]["containers"]
            shm = [m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert len(shm) == 1 and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"


def test_endpoint_readiness_is_the_serve_proxy_health_route(rendered):
    for group in cluster_spec(rendered["RayService"])["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}


def test_serve_config_imports_and_its_args_validate(rendered):
    from ray.serve.schema import ServeDeploySchema
    from cluster.serve_config import IMPORT_PATH, ServeConfig
    ServeDeploySchema.model_validate(yaml.safe_load(rendered["RayService"]["spec"]["serveConfigV2"]))
    app = serve_app_config(rendered["RayService"])
    assert app["import_path"] == IMPORT_PATH == "cluster.serve_app:build_app"
    module = importlib.import_module("cluster.serve_app")
    assert callable(getattr(module, "build_app"))
    args = dict(app["args"])
    expected = ServeConfig.model_validate(args).to_serve_config()["applications"][0]
    assert app == expected      # the Serve options (autoscaling included) are the config's own


def test_job_entrypoint_spec_and_lifecycle(rendered):
    from pipelines.spec import parse_spec
    job = rendered["RayJob"]["spec"]
    assert job["entrypoint"] == "deltaray batch run /etc/deltaray/job.yaml"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["backoffLimit"] >= 1
    head = cluster_spec(rendered["RayJob"])["headGroupSpec"]["template"]["spec"]
    config = [v["name"] for v in head["volumes"]
              if v.get("configMap", {}).get("name") == rendered["ConfigMap"]["metadata"]["name"]]
    assert any(m["name"] in config and m["mountPath"] == "/etc/deltaray"
               for m in head["containers"][0]["volumeMounts"])   # the driver runs on the head
    parse_spec(job_spec(rendered))


def worker_groups(obj: dict) -> list[dict]:
    return cluster_spec(obj)["workerGroupSpecs"]


def test_gpus_per_replica_equal_ep_size_times_gpus_per_rank(rendered):
    res = {"replicas": 1, "ep_size": 1, "gpus_per_rank": 0, **job_spec(rendered)["resources"]}
    (group,) = worker_groups(rendered["RayJob"])
    pod_gpus = gpus(group["template"]["spec"]["containers"][0])
    assert pod_gpus == res["ep_size"] * res["gpus_per_rank"]     # one replica per pod
    assert group["maxReplicas"] >= res["replicas"]

    args = serve_app_config(rendered["RayService"])["args"]
    (group,) = worker_groups(rendered["RayService"])
    pod_gpus = gpus(group["template"]["spec"]["containers"][0])
    assert pod_gpus == args.get("ep_size", 1) * args.get("num_gpus", 0)
    assert group["maxReplicas"] >= args.get("autoscaling", {}).get("max_replicas", 1)


def test_gpu_workers_tolerate_and_select_gpu_nodes(rendered):
    for kind in ("RayCluster", "RayService", "RayJob"):
        for group in worker_groups(rendered[kind]):
            pod = group["template"]["spec"]
            if gpus(pod["containers"][0]) == 0:
                assert "tolerations" not in pod
                continue
            assert {"key": "nvidia.com/gpu", "operator": "Exists",
                    "effect": "NoSchedule"} in pod["tolerations"]
            assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H200"


SECRET_LIKE = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)
SECRET_VALUES = [re.compile(p) for p in (
    r"AKIA[0-9A-Z]{16}", r"\bsk-[A-Za-z0-9_-]{16,}", r"-----BEGIN [A-Z ]*PRIVATE KEY",
    r"(?i)aws_secret_access_key\s*[:=]\s*\S", r"(?i)\b(stringData|binaryData)\s*:")]


def test_secrets_only_by_reference(rendered):
    assert "Secret" not in rendered
    for kind in ("RayCluster", "RayService", "RayJob"):
        for container in containers(rendered[kind]):
            for env in container.get("env", []):
                if SECRET_LIKE.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_no_secret_values_anywhere_in_the_tree():
    files = [p for p in K8S.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        for pattern in SECRET_VALUES:
            assert not pattern.search(text), f"{path.relative_to(REPO)} matches {pattern.pattern}"
        if path.suffix == ".yaml":
            for doc in yaml.safe_load_all(text):
                assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path


def test_resource_files_validate():
    """Without kustomize: the base's own files, each object on its own."""
    for path in sorted((K8S / "base").glob("ray*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            validate(obj)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "deltaray-config"},
                  "data": {"job.yaml": (K8S / "base" / "job.yaml").read_text()}}
    validate(config_map)


def test_dockerfile_pins_ray_and_bakes_no_weights():
    _, ray = pinned()
    text = (K8S / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray)}$", text, re.M)
    assert re.search(r"^FROM \S+:\$\{RAY_VERSION\}", text, re.M)
    assert "ray.__version__" in text                      # the build fails on a Ray mismatch
    copied = " ".join(re.findall(r"^COPY (.*)$", text, re.M))
    assert not re.search(r"safetensors|\.bin\b|\.pt\b|checkpoint|\bmodels/|weights", copied)
    ignore = (K8S / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**/*.safetensors" in ignore and "!.venv/" not in ignore
    assert "model init" not in text and "huggingface" not in text.lower()
    assert re.search(r"^USER (?!root)\S+", text, re.M)
