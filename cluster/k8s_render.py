"""`deltaray k8s render`: KubeRay manifests from our own job spec or serve config.

    deltaray k8s render --job JOB.yaml        → a ConfigMap holding the spec + a RayJob
    deltaray k8s render --serve CONFIG.yaml   → a RayService whose serveConfigV2 is the config's

The cluster has the shape of k8s/base: a head with `num-cpus: "0"`, in-tree autoscaling, one
worker group, /dev/shm as a memory emptyDir, and Secrets only by reference. It is sized from the
spec: one worker pod per model replica holding `ep_size × gpus_per_rank` GPUs (a replica wider
than a node takes whole nodes), `replicas` pods at most, and for an `s3://` model a hostPath on
the node's local disk where the weights are cached between pods.
"""
from __future__ import annotations

import importlib.metadata
import math
import re
import sys
from pathlib import Path

import yaml

STORAGE_SECRET = "deltaray-object-storage"      # keys: access-key-id, secret-access-key
API_KEYS_SECRET = "deltaray-api-keys"           # key: api-keys (comma-separated)
CONFIG_DIR = "/etc/deltaray"
MODEL_CACHE_DIR = "/mnt/deltaray-cache"         # where pods see the weights cache
NODE_CACHE_DIR = "/mnt/local-nvme/deltaray-cache"   # on the node's local NVMe: survives pods
CPUS_PER_GPU = 12                               # tokenising and Ray Data tasks beside each rank
MEMORY_GIB_PER_GPU = 200                        # an 8×H200 node has ~2 TiB of host memory
MEMORY_GIB_PER_CPU = 4
DATA_CPUS = 1                                   # Ray Data read/write tasks beside a CPU replica
NAME_MAX = 40                                   # KubeRay appends suffixes to the cluster name


def pinned_versions() -> tuple[str, str]:
    """(deltaray version, the exact Ray version deltaray pins), from the installed metadata."""
    for requirement in importlib.metadata.requires("deltaray") or []:
        found = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", requirement.split(";")[0].strip())
        if found:
            return importlib.metadata.version("deltaray"), found.group(2)
    raise RuntimeError("deltaray's metadata pins no exact ray version")


def default_image() -> str:
    project, ray = pinned_versions()
    return f"deltaray:{project}-ray{ray}"


def k8s_name(value, field: str) -> str:
    """A DNS-1123 name from a spec's name: lowercase, other characters become '-'."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}: must be a non-empty string (got {value!r})")
    name = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")
    if not name or len(name) > NAME_MAX:
        raise ValueError(f"{field}: {value!r} does not make a Kubernetes name of 1..{NAME_MAX} "
                         "lowercase letters, digits and '-'")
    return name


def _number(section: dict, key: str, where: str, default, minimum, integer: bool):
    value = section.get(key, default)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ValueError(f"{where}.{key}: must be {what} >= {minimum} (got {value!r})")
    return value


def _mapping(spec: dict, key: str, where: str) -> dict:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {key}: must be a mapping (got {value!r})")
    return value


def read_job(raw) -> dict:
    """The fields of a batch job spec the manifest needs, checked; the rest is the job's business."""
    if not isinstance(raw, dict):
        raise ValueError(f"job spec: must be a mapping of keys, got {type(raw).__name__}")
    res = _mapping(raw, "resources", "job spec")
    where = "job spec: resources"
    storage = _mapping(raw, "storage", "job spec")
    if not isinstance(storage.get("anonymous", False), bool):
        raise ValueError(f"job spec: storage.anonymous: must be true or false "
                         f"(got {storage['anonymous']!r})")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"job spec: model: must be a checkpoint dir, s3:// URI or preset:NAME "
                         f"(got {model!r})")
    return {"name": k8s_name(raw.get("name"), "job spec: name"), "model": model,
            "replicas": _number(res, "replicas", where, 1, 1, True),
            "ep_size": _number(res, "ep_size", where, 1, 1, True),
            "gpus_per_rank": _number(res, "gpus_per_rank", where, 0, 0, False),
            "cpus": _number(res, "cpus_per_replica", where, 1, 0.001, False),
            "credentials": not storage.get("anonymous", False),
            "where": where, "gpus_field": "gpus_per_rank"}


def read_serve(raw) -> tuple[dict, dict]:
    """(the fields the manifest needs, the Serve config for serveConfigV2) from a serve config."""
    from pydantic import ValidationError
    from cluster.serve_config import ServeConfig
    if not isinstance(raw, dict):
        raise ValueError(f"serve config: must be a mapping of keys, got {type(raw).__name__}")
    try:
        config = ServeConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ValueError(f"serve config: {where}: {first['msg'].removeprefix('Value error, ')}")
    scaling = config.autoscaling
    fields = {"name": k8s_name(config.name, "serve config: name"), "model": config.model,
              "replicas": scaling.max_replicas if scaling else config.num_replicas,
              "min_replicas": scaling.min_replicas if scaling else config.num_replicas,
              "ep_size": config.ep_size, "gpus_per_rank": config.num_gpus,
              "cpus": config.num_cpus or DATA_CPUS, "credentials": True,
              "api_key_env": config.api_key_env, "where": "serve config",
              "gpus_field": "num_gpus"}
    return fields, config.to_serve_config()


def pod_shape(job: dict, gpus_per_node: int) -> dict:
    """GPUs, CPUs and memory of one worker pod, and how many pods the replicas need."""
    gpus = job["ep_size"] * job["gpus_per_rank"]
    if gpus != int(gpus):
        raise ValueError(f"{job['where']}.{job['gpus_field']}: ep_size × {job['gpus_field']} = "
                         f"{gpus:g} is not a whole number of GPUs per replica")
    gpus = int(gpus)
    if gpus == 0:
        cpus = math.ceil(job["cpus"]) + DATA_CPUS
        return {"gpus": 0, "cpus": cpus, "memory_gib": MEMORY_GIB_PER_CPU * cpus, "pods": 1}
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise ValueError(f"{job['where']}: a replica of ep_size × {job['gpus_field']} = {gpus} "
                         f"GPUs must fill whole nodes of {gpus_per_node} GPUs")
    per_pod = min(gpus, gpus_per_node)
    return {"gpus": per_pod, "cpus": CPUS_PER_GPU * per_pod,
            "memory_gib": MEMORY_GIB_PER_GPU * per_pod, "pods": gpus // per_pod}


def storage_env(job: dict) -> list[dict]:
    if not job["credentials"]:
        return []
    keys = (("AWS_ACCESS_KEY_ID", "access-key-id"), ("AWS_SECRET_ACCESS_KEY", "secret-access-key"))
    # optional: workload identity (IRSA, GKE) or public buckets need no Secret
    return [{"name": var, "valueFrom": {"secretKeyRef": {
        "name": STORAGE_SECRET, "key": key, "optional": True}}} for var, key in keys]


def api_key_env(job: dict) -> list[dict]:
    if not job.get("api_key_env"):
        return []
    return [{"name": job["api_key_env"], "valueFrom": {"secretKeyRef": {
        "name": API_KEYS_SECRET, "key": "api-keys"}}}]


def container(name: str, image: str, cpus, memory_gib: int, gpus: int, env: list) -> dict:
    amounts = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    limits = {**amounts, "nvidia.com/gpu": str(gpus)} if gpus else dict(amounts)
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": dict(limits), "limits": limits}, "env": env,
            "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]}


def config_volume(config_map: str | None) -> list[dict]:
    return [{"name": "config", "configMap": {"name": config_map}}] if config_map else []


def head_group(image: str, env: list, config_map: str | None) -> dict:
    head = container("ray-head", image, 4, 16, 0, env)
    head["ports"] = [{"containerPort": p, "name": n} for p, n in
                     ((6379, "gcs-server"), (8265, "dashboard"), (10001, "client"), (8000, "serve"))]
    if not config_map:
        head.pop("volumeMounts")
    return {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [head], "volumes": config_volume(config_map)}}}


def worker_pod(job: dict, shape: dict, image: str, env: list, config_map: str | None,
               gpu_product: str) -> dict:
    worker = container("ray-worker", image, shape["cpus"], shape["memory_gib"], shape["gpus"], env)
    mounts = worker["volumeMounts"] if config_map else []
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    # Ray's object store lives in /dev/shm (30% of memory by default); Docker gives it 64 MiB
    shm_gib = math.ceil(shape["memory_gib"] * 0.3)
    volumes = config_volume(config_map) + [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}}]
    if job["model"].startswith("s3://"):
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_DIR})
        worker["env"] = env + [{"name": "DELTARAY_CACHE_DIR", "value": MODEL_CACHE_DIR}]
        volumes.append({"name": "model-cache", "hostPath": {
            "path": NODE_CACHE_DIR, "type": "DirectoryOrCreate"}})
    worker["volumeMounts"] = mounts
    spec = {"containers": [worker], "volumes": volumes}
    if shape["gpus"]:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]
        spec["nodeSelector"] = {"nvidia.com/gpu.product": gpu_product}
    return {"spec": spec}


def cluster_spec(job: dict, image: str, config_map: str | None, gpu_product: str,
                 gpus_per_node: int, serve_probe: bool = False) -> dict:
    shape = pod_shape(job, gpus_per_node)
    env = storage_env(job) + api_key_env(job)
    template = worker_pod(job, shape, image, env, config_map, gpu_product)
    if serve_probe:     # the endpoint is ready when the node's Serve proxy answers
        template["spec"]["containers"][0]["readinessProbe"] = {
            "httpGet": {"path": "/-/healthz", "port": 8000}, "periodSeconds": 5,
            "failureThreshold": 3}
    max_pods = job["replicas"] * shape["pods"]
    min_pods = job.get("min_replicas", 1) * shape["pods"]
    group = {"groupName": "gpu" if shape["gpus"] else "cpu", "replicas": min_pods,
             "minReplicas": min_pods, "maxReplicas": max_pods, "rayStartParams": {},
             "template": template}
    return {"rayVersion": pinned_versions()[1], "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
            "headGroupSpec": head_group(image, env, config_map), "workerGroupSpecs": [group]}


def render_job(text: str, image: str, gpu_product: str, gpus_per_node: int) -> list[dict]:
    """A ConfigMap holding the job spec as written and the RayJob that runs it."""
    job = read_job(yaml.safe_load(text))
    config_map = f"{job['name']}-job"
    labels = {"app.kubernetes.io/part-of": "deltaray"}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": config_map, "labels": labels}, "data": {"job.yaml": text}},
        {"apiVersion": "ray.io/v1", "kind": "RayJob",
         "metadata": {"name": job["name"], "labels": labels},
         "spec": {"entrypoint": f"deltaray batch run {CONFIG_DIR}/job.yaml",
                  "submissionMode": "K8sJobMode", "shutdownAfterJobFinishes": True,
                  # reruns resume from committed shards, so retries never duplicate rows
                  "ttlSecondsAfterFinished": 600, "backoffLimit": 2,
                  "rayClusterSpec": cluster_spec(job, image, config_map, gpu_product,
                                                 gpus_per_node)}}]


def render_serve(text: str, image: str, gpu_product: str, gpus_per_node: int) -> list[dict]:
    """A RayService running cluster.serve_app:build_app with the config as its args."""
    job, serve_config = read_serve(yaml.safe_load(text))
    return [{"apiVersion": "ray.io/v1", "kind": "RayService",
             "metadata": {"name": job["name"], "labels": {"app.kubernetes.io/part-of": "deltaray"}},
             "spec": {"upgradeStrategy": {"type": "NewCluster"},
                      "serviceUnhealthySecondThreshold": 900,
                      "deploymentUnhealthySecondThreshold": 900,
                      "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
                      "rayClusterConfig": cluster_spec(job, image, None, gpu_product,
                                                       gpus_per_node, serve_probe=True)}}]


def read_text(path: str) -> str:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist")
    text = Path(path).read_text()
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return text


class ManifestDumper(yaml.SafeDumper):
    """Plain YAML for kubectl: no anchors for shared dicts, multi-line strings as `|` blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


ManifestDumper.add_representer(str, _string)


def manifest_yaml(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=ManifestDumper, sort_keys=False)


def cmd_k8s_render(args) -> None:
    render = render_job if args.job else render_serve
    objects = render(read_text(args.job or args.serve), args.image or default_image(),
                     args.gpu_product, args.gpus_per_node)
    sys.stdout.write(manifest_yaml(objects))


def add_k8s_commands(sub) -> None:
    """`deltaray k8s render`, on the CLI's subparsers object."""
    k8s = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    render = k8s_sub.add_parser("render", help="print a RayJob or RayService manifest")
    source = render.add_mutually_exclusive_group(required=True)
    source.add_argument("--job", help="batch job spec (YAML) → ConfigMap + RayJob")
    source.add_argument("--serve", help="serve config (YAML) → RayService")
    render.add_argument("--image", help="container image (default: deltaray:VERSION-rayRAY)")
    render.add_argument("--gpu-product", default="NVIDIA-H200",
                        help="nvidia.com/gpu.product node label for GPU workers")
    render.add_argument("--gpus-per-node", type=int, default=8)
    render.set_defaults(func=cmd_k8s_render)
