"""Against a real Ray head (`ray start --head` on loopback): kill a job's driver with SIGKILL,
then finish it through the Ray Jobs API (`deltaray batch submit/status/logs/list`)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.cli import main
from tests.pipelines.conftest import CREDENTIALS, jsonl, news_rows
from tests.ports import free_port

VENV_BIN = Path(sys.executable).parent


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """(GCS address, Jobs API URL) of a head on 127.0.0.1; stopped by signalling only its group."""
    gcs, dash = free_port(), free_port()
    # Its own temp dir keeps `ray start` from repointing other sessions' `ray.init()` (the
    # /tmp/ray/ray_current_cluster file) at this head; loopback only, so no auth token.
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")      # short: socket paths are limited
    env = {**os.environ, **CREDENTIALS, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", "--num-cpus=2", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--temp-dir={temp_dir}"]
    log = open(tmp_path_factory.mktemp("ray-head") / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for(lambda: jobs_api_up(url) or head.poll() is not None, 120, "the Ray head")
        assert head.poll() is None, "ray start --head exited"
        yield f"127.0.0.1:{gcs}", url
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        time.sleep(5)
        try:
            os.killpg(head.pid, signal.SIGKILL)              # whatever of its group is left
        except ProcessLookupError:
            pass
        head.wait(30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def jobs_api_up(url: str) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def cli(*argv: str, capsys) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.own_process
def test_driver_killed_then_finished_through_the_jobs_api(ray_head, tmp_path, tiny_checkpoint,
                                                          capsys):
    gcs, url = ray_head
    rows = news_rows(24)
    (tmp_path / "in.jsonl").write_bytes(jsonl(rows))
    out = tmp_path / "out"
    (tmp_path / "job.yaml").write_text(json.dumps({
        "name": "killme", "model": str(tiny_checkpoint),
        "input": {"uri": str(tmp_path / "in.jsonl"), "id_column": "id"},
        "sampling": {"max_tokens": 8}, "resources": {"batch_size": 2},
        "output": {"uri": str(out), "format": "jsonl", "rows_per_shard": 2}}))
    env = {**os.environ, "RAY_ADDRESS": gcs, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    driver = subprocess.Popen([str(VENV_BIN / "deltaray"), "batch", "run", str(tmp_path / "job.yaml")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: list(out.glob("part-*")) or driver.poll() is not None, 240, "a commit")
    exited = driver.poll()
    driver.send_signal(signal.SIGKILL)
    stderr = driver.communicate()[1].decode(errors="replace")
    assert exited is None, f"driver exited ({exited}) before committing a shard:\n{stderr[-3000:]}"
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert 0 < len(committed) < 12 and not (out / "_SUCCESS").exists()

    job_id = cli("batch", "submit", str(tmp_path / "job.yaml"), "--address", url,
                 capsys=capsys).strip()
    status = wait_for(lambda: (s := cli("batch", "status", job_id, "--address", url,
                                        capsys=capsys)) and any(t in s for t in
                                                                ("SUCCEEDED", "FAILED", "STOPPED"))
                      and s, 300, "the submitted job")
    logs = cli("batch", "logs", job_id, "--address", url, capsys=capsys)
    assert "SUCCEEDED" in status, logs[-2000:]
    assert "[batch] job 'killme' done" in logs
    assert job_id in cli("batch", "list", "--address", url, capsys=capsys)

    for name, mtime in committed.items():            # shards committed before the kill stay
        assert (out / name).stat().st_mtime_ns == mtime
    got = [json.loads(line) for p in sorted(out.glob("part-*")) for line in p.read_text().splitlines()]
    assert sorted(r["id"] for r in got) == [r["id"] for r in rows]      # each id exactly once
    summary = json.loads((out / "_job.json").read_text())
    assert summary["rows_skipped_done"] == 2 * len(committed)
    assert summary["rows_ok"] == 24 - 2 * len(committed)
