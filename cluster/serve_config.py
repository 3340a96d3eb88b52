"""The serve spec: one YAML file (pydantic-validated) for the model, engine, limits and security.

    model: preset:tiny                  # checkpoint dir or preset:NAME
    served_model_name: tiny             # the `model` clients send (default: dir/preset name)
    engine: {max_num_seqs: 16, max_model_len: 512}
    max_ongoing_requests: 32            # per replica, all inside the engine at once
    max_queued_requests: 64             # per replica, waiting for one of those places
    autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}
    api_key_env: DELTARAY_API_KEYS      # comma-separated keys; or api_key_file
    allowed_s3_buckets: [my-images]
    allowed_image_url_prefixes: ["https://images.example.com/"]

`to_serve_config` turns it into a Ray Serve config (what a RayService's serveConfigV2 holds).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMPORT_PATH = "cluster.serve_app:build_app"


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineSettings(Spec):
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    kv_cache_memory: int | None = Field(None, gt=0)
    block_size: int = Field(16, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    seed: int = 0


class Autoscaling(Spec):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(600, ge=0)
    metrics_interval_s: float = Field(10, gt=0)
    look_back_period_s: float = Field(30, gt=0)

    @model_validator(mode="after")
    def ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas={self.min_replicas} is above "
                             f"max_replicas={self.max_replicas}")
        return self


class ServeConfig(Spec):
    model: str = "preset:tiny"
    served_model_name: str | None = None
    name: str = "deltaray"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ep_size: int = Field(1, ge=1)           # ranks per replica (cluster/replica.py)
    engine: EngineSettings = EngineSettings()
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(64, ge=0)
    retry_after_s: int = Field(1, ge=0)
    max_request_bytes: int = Field(16 << 20, ge=1024)
    api_key_env: str | None = "DELTARAY_API_KEYS"
    api_key_file: str | None = None
    allowed_s3_buckets: list[str] = []
    allowed_image_url_prefixes: list[str] = []
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)        # per rank: a replica holds ep_size x num_gpus

    @field_validator("allowed_image_url_prefixes")
    @classmethod
    def http_prefixes(cls, value):
        for prefix in value:
            scheme, _, rest = prefix.partition("://")
            if scheme not in ("http", "https") or "/" not in rest:
                raise ValueError(f"{prefix!r} must be http(s)://HOST/... with a path after the "
                                 "host, so a prefix cannot match another host")
        return value

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model.removeprefix("preset:").rstrip("/").split("/")[-1]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"serve config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"serve config {path}: expected a mapping at the top level")
        return cls.model_validate(data)

    def deployment_options(self) -> dict:
        """Ray Serve deployment options: replicas, concurrency, back-pressure, resources."""
        # The app itself queues max_queued_requests and answers 503 + Retry-After (an OpenAI
        # body) beyond that, so Serve lets that many in, plus a few for /health and /metrics.
        # Serve's own router queue holds a burst while it is being assigned to replicas; it is
        # as large again, so only a real overload meets its (plain-text) 503.
        capacity = self.max_ongoing_requests + self.max_queued_requests + 8
        options = {
            "max_ongoing_requests": capacity,
            "max_queued_requests": capacity,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
            # with ep_size > 1 the GPUs belong to the rank actors, not this coordinator
            "ray_actor_options": {"num_cpus": self.num_cpus,
                                  "num_gpus": self.num_gpus if self.ep_size == 1 else 0},
            "health_check_period_s": 10,
            "health_check_timeout_s": 30,
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        return options

    def to_serve_config(self) -> dict:
        """A Serve config file (`serve deploy` / RayService serveConfigV2) for this spec."""
        options = self.deployment_options()
        return {
            "http_options": {"host": "0.0.0.0", "port": self.port},
            "applications": [{
                "name": self.name, "route_prefix": self.route_prefix,
                "import_path": IMPORT_PATH,
                "args": self.model_dump(mode="json", exclude_defaults=True),
                "deployments": [{"name": "OpenAIServer", **options}],
            }],
        }
