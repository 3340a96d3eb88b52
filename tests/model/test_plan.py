"""`deltaray model plan` against hand arithmetic for the 397B, 122B and 35B presets."""
from __future__ import annotations

import pytest

from cluster.cli import main
from model.config import ModelConfig
from model.footprint import parameter_counts
from model.plan import parse_bytes, plan

MiB, KiB, GiB = 2**20, 2**10, 2**30

# preset: (GDN layers, value heads, full layers, MoE layers, experts, hidden, expert width)
HAND = {
    "qwen3.5-397b-a17b": (45, 64, 15, 60, 512, 4096, 1024),
    "qwen3.5-122b-a10b": (36, 64, 12, 48, 256, 3072, 1024),
    "qwen3.5-35b-a3b": (30, 32, 10, 40, 256, 2048, 512),
}


def test_397b_matches_the_issue_arithmetic():
    p = plan(ModelConfig.preset("qwen3.5-397b-a17b"), 8, parse_bytes("141GB"), "bf16", 32768)
    assert p.recurrent_per_seq == 45 * 64 * 128 * 128 * 4 == 180 * MiB
    assert p.kv_per_token == 15 * 2 * 2 * 256 * 2 == 30 * KiB


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("gpus,dtype,length", [(8, "bf16", 32768), (16, "fp8", 262144)])
def test_plan_numbers_by_hand(name, gpus, dtype, length):
    gdn, hv, full, moe, E, H, I = HAND[name]
    cfg = ModelConfig.preset(name)
    routed = moe * E * 3 * H * I                       # gate + up [2I, H] and down [H, I]
    assert parameter_counts(cfg).routed_experts == routed
    replicated = parameter_counts(cfg).total - routed
    width = {"bf16": 2, "fp8": 1}[dtype]
    weights = (replicated + routed // gpus) * width
    kv = full * 2 * 2 * 256 * 2
    conv = gdn * (2 * 16 * 128 + hv * 128) * 3 * 2     # conv channels q,k,v x window 3, bf16
    state = gdn * hv * 128 * 128 * 4 + conv
    cache = int(141e9 * 0.9) - weights
    p = plan(cfg, gpus, parse_bytes("141GB"), dtype, length)
    assert (p.weight_bytes, p.kv_per_token, p.state_per_seq) == (weights, kv, state)
    assert p.cache_bytes == cache
    assert p.seqs_per_gpu == cache // (length * kv + state)
    assert p.max_seqs == gpus * p.seqs_per_gpu
    step_s = (weights + p.seqs_per_gpu * (length * kv + state)) / 4.8e12
    assert p.decode_tokens_per_s == pytest.approx(gpus * p.seqs_per_gpu / step_s)


def test_cli_prints_the_plan_and_one_line_errors(capsys):
    assert main(["model", "plan", "--model", "qwen3.5-397b-a17b", "--gpus", "8",
                 "--gpu-memory", "141GB", "--dtype", "bf16", "--max-model-len", "32768"]) == 0
    out = capsys.readouterr().out
    assert "KV per token      30.00 KiB" in out and "180.00 MiB recurrent" in out
    assert main(["model", "plan", "--model", "qwen3.5-397b-a17b", "--gpus", "2",
                 "--max-model-len", "32768"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltaray: error: does not fit") and err.count("\n") == 1
    assert main(["model", "plan", "--model", "qwen3.5-397b-a17b", "--gpus", "8", "--ep", "3",
                 "--max-model-len", "32768"]) == 2
    assert "--ep 3" in capsys.readouterr().err
