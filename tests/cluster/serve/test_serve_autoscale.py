"""Autoscaling on a real local Ray Serve app with the tiny model: sustained load takes the
deployment from 1 replica to 2, idleness brings it back to 1.

The delays are short (seconds) and replicas take half a CPU each, so two fit the 2-CPU Ray
cluster. Every wait polls serve.status() against a deadline, so the test fails rather than hangs.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from cluster.serve_config import Autoscaling, ServeConfig
from tests.ports import free_port

ENGINE = {"max_model_len": 128, "max_num_seqs": 8, "kv_cache_memory": 16 << 20}
SCALING = Autoscaling(min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                      upscale_delay_s=1, downscale_delay_s=3, metrics_interval_s=0.5,
                      look_back_period_s=2)
CLIENTS = 4             # ongoing requests kept up: 4 / target 1 asks for more than max (2)
DEADLINE_S = 180


def running_replicas(serve, app: str) -> int:
    deployment = serve.status().applications[app].deployments["OpenAIServer"]
    return {str(k): v for k, v in deployment.replica_states.items()}.get("RUNNING", 0)


def wait_for_replicas(serve, app: str, count: int, deadline: float) -> list[int]:
    """Poll until exactly `count` replicas run (and no others exist); the counts seen."""
    seen = []
    while time.monotonic() < deadline:
        deployment = serve.status().applications[app].deployments["OpenAIServer"]
        seen.append(running_replicas(serve, app))
        if seen[-1] == count and sum(deployment.replica_states.values()) == count:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"no {count} replicas before the deadline; running counts seen: "
                         f"{sorted(set(seen))}")


class Load:
    """`CLIENTS` threads each sending streaming completions back to back until stopped."""

    def __init__(self, url: str):
        self.url, self.stop, self.statuses = url, threading.Event(), []
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def client(self):
        body = {"prompt": "Count slowly:", "max_tokens": 96, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                with client.stream("POST", "/v1/completions", json=body) as response:
                    text = "".join(response.iter_text())
                self.statuses.append((response.status_code, text.endswith("data: [DONE]\n\n")))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_load_scales_up_and_idleness_scales_down(tiny_checkpoint):
    import ray
    from ray import serve

    from cluster.serve_app import build_app
    config = ServeConfig(model=str(tiny_checkpoint), served_model_name="tiny", engine=ENGINE,
                         api_key_env=None, autoscaling=SCALING, num_cpus=0.5, name="scaled")
    assert build_app(config) is not None and "autoscaling_config" in config.deployment_options()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="scaled", route_prefix="/")
        deadline = time.monotonic() + DEADLINE_S
        assert wait_for_replicas(serve, "scaled", 1, deadline)[-1] == 1
        with Load(f"http://127.0.0.1:{port}") as load:
            wait_for_replicas(serve, "scaled", 2, deadline)
        assert load.statuses and all(s == (200, True) for s in load.statuses), load.statuses
        wait_for_replicas(serve, "scaled", 1, deadline)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            after = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4
    finally:
        serve.shutdown()
        ray.shutdown()
