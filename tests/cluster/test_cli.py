"""The `deltaray` command as a user runs it: a real subprocess, exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def deltaray(*args, check=False):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True,
                          text=True, check=check)


def test_model_init_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    run = deltaray("model", "init", "--preset", "tiny", "--out", str(out), "--seed", "3",
                   "--dtype", "bfloat16", check=True)
    assert str(out) in run.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).exists(), name
    from model.checkpoint import load_model
    model = load_model(out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["model_type"] == model.config.model_type


def test_model_inspect_preset():
    run = deltaray("model", "inspect", "qwen3.5-397b-a17b", check=True)
    assert "LLLF" * 15 in run.stdout
    assert "45 Gated DeltaNet + 15 full attention" in run.stdout
    assert "386.55B routed experts" in run.stdout


def test_model_inspect_directory(tiny_checkpoint):
    run = deltaray("model", "inspect", str(tiny_checkpoint), check=True)
    assert "LLLF" in run.stdout and "MoE 8 experts, top-2" in run.stdout


@pytest.mark.parametrize("args, needle", [
    (["model", "inspect", "no-such-model"], "unknown preset 'no-such-model'"),
    (["model", "init", "--preset", "qwen3.5-397b-a17b", "--out", "/tmp/x"], "--preset"),
    (["model", "init", "--preset", "huge", "--out", "/tmp/x"], "--preset"),
])
def test_user_errors_are_one_line(args, needle):
    run = deltaray(*args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in run.stderr
