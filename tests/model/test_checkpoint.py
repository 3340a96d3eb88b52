"""Checkpoint loading: sharding, dtypes, and bad checkpoints failing with a message that names the
tensor or file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.config import ConfigError
from tests.model.hf_reference import full_forward


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_written_checkpoint_is_complete(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert json.loads((tiny_checkpoint / "generation_config.json").read_text())["eos_token_id"] \
        == [248046, 248044]


def test_random_weights_stay_finite_in_float32_and_bfloat16(tiny_checkpoint):
    ids = torch.randint(0, 248000, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    for dtype in ("float32", "bfloat16"):
        logits = full_forward(load_model(tiny_checkpoint, dtype=dtype), ids)
        assert torch.isfinite(logits).all(), dtype
        assert logits.float().std() > 0.1, dtype       # not collapsed either


def test_every_parameter_is_random(tiny):
    for name, p in tiny.named_parameters():
        assert p.float().std() > 0, f"{name} is constant"


def test_sharded_with_index_loads_identically(tiny, tmp_path):
    save_checkpoint(tiny, tmp_path, max_shard_bytes=4 << 20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3     # embed | layers | lm_head
    again = load_model(tmp_path)
    for (name, a), (_, b) in zip(tiny.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversion(tiny_checkpoint, tiny, dtype):
    model = load_model(tiny_checkpoint, dtype=dtype)
    for (name, a), (_, b) in zip(tiny.named_parameters(), model.named_parameters()):
        assert b.dtype == dtype and torch.equal(a.to(dtype), b), name


def rewrite(ckpt, edit):
    file = ckpt / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    rewrite(ckpt, lambda t: t.pop("model.language_model.layers.2.linear_attn.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.2\.linear_attn\.A_log"):
        load_model(ckpt)


def test_wrong_shape_is_named_with_file(tiny_checkpoint, tmp_path):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    rewrite(ckpt, lambda t: t.update({"model.language_model.layers.3.self_attn.k_proj.weight": torch.zeros(8, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.language_model\.layers\.3\.self_attn\.k_proj\.weight in "
                                              r"model\.safetensors has shape \(8, 64\), expected \(64, 64\)"):
        load_model(ckpt)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    rewrite(ckpt, lambda t: t.update({"model.language_model.layers.0.mlp.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.language_model\.layers\.0\.mlp\.bogus\.weight"):
        load_model(ckpt)


def test_truncated_file_is_named(tiny_checkpoint, tmp_path):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor \S+ ends"):
        load_model(ckpt)


def test_missing_shard_is_named(tiny, tmp_path):
    save_checkpoint(tiny, tmp_path, max_shard_bytes=4 << 20)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(tmp_path)


def test_unknown_model_type_is_named(tiny_checkpoint, tmp_path):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"'model_type': unsupported value 'llama'"):
        load_model(ckpt)


def test_mtp_weights_are_ignored(tiny_checkpoint, tmp_path):
    ckpt = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    rewrite(ckpt, lambda t: t.update({"mtp.fc.weight": torch.zeros(64, 128)}))
    load_model(ckpt)


LOAD_PEAK = """
import gc, sys, torch
from model.checkpoint import load_model
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) * 1024
del load_model(sys.argv[1], dtype=sys.argv[2]).lm_head  # warm-up: lazy imports, allocator
gc.collect()
open('/proc/self/clear_refs', 'w').write('5')          # reset the peak (VmHWM) to the current RSS
anon_before = status('RssAnon')
model = load_model(sys.argv[1], dtype=sys.argv[2])
# Library pages evicted by other processes and faulted back in also raise VmHWM; they are file
# pages, so count the peak less the file-backed part (as it stands after the load).
peak_anon = status('VmHWM') - status('RssFile') - status('RssShmem')
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print((peak_anon - anon_before) / weights)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_during_load_is_close_to_weight_bytes(tiny_checkpoint, dtype):
    """Peak resident memory added by loading, in a fresh process, relative to the weight bytes."""
    # A fixed mmap threshold makes glibc return every large block on free, so what the warm-up
    # load freed cannot hide inside the heap and the figure does not depend on allocator history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tiny_checkpoint), dtype],
                         capture_output=True, text=True, check=True, env=env)
    assert float(out.stdout.strip()) < 1.35
