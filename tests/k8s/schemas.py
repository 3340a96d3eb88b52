"""Offline validation of Kubernetes objects: KubeRay CRDs (their served version's
openAPIV3Schema, with jsonschema) and core objects (`kubernetes-validate`).

Both are strict about unknown fields, as `kubectl apply` is by default (--validate=strict):
a misspelt key must fail here, not be pruned silently by the API server.
"""
from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
KUBERNETES_VERSION = "1.32.0"


def pinned() -> tuple[str, str]:
    """(deltaray version, Ray version) as pyproject.toml pins them, read independently."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray = [d for d in project["dependencies"] if d.startswith("ray[") or d.startswith("ray=")]
    assert len(ray) == 1 and "==" in ray[0], f"pyproject must pin ray exactly, has {ray}"
    return project["version"], ray[0].split("==")[1].strip()


def _strict(schema):
    """A copy of an OpenAPI schema that rejects unknown fields where the CRD lists the fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str, version: str) -> jsonschema.Draft7Validator:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (shared/ is laid beside the repo)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{kind} {version} is not a served version ({sorted(served)})"
    schema = _strict(copy.deepcopy(served[version]["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def validate(obj: dict) -> None:
    """Raise if `obj` is not a valid object of its kind (CRD or core)."""
    group, _, version = obj["apiVersion"].rpartition("/")
    if group == "ray.io":
        errors = sorted(crd_validator(obj["kind"], version).iter_errors(obj), key=str)
        assert not errors, (f"{obj['kind']}/{obj['metadata']['name']}: "
                            f"{errors[0].json_path}: {errors[0].message}")
        return
    import kubernetes_validate
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR` as a list of objects; skips the test if kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the resource files "
                    "are still validated one by one in test_resource_files_validate")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def containers(obj: dict) -> list[dict]:
    """Every container of every pod template in a RayCluster/RayService/RayJob."""
    spec = cluster_spec(obj)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def cluster_spec(obj: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayService": lambda s: s["rayClusterConfig"],
            "RayJob": lambda s: s["rayClusterSpec"]}[obj["kind"]](obj["spec"])


def by_kind(objects: list[dict]) -> dict[str, dict]:
    kinds = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']} objects"
        kinds[obj["kind"]] = obj
    return kinds


def gpus(container: dict) -> int:
    limits = container["resources"].get("limits", {})
    requests = container["resources"].get("requests", {})
    assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu"))
    return int(limits.get("nvidia.com/gpu", 0))
