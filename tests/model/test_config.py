"""Config parsing against transformers' own config classes, presets, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from model.config import PRESETS, ConfigError, ModelConfig
from model.footprint import parameter_counts
from model.hybrid import HybridForCausalLM
from tests.model.hf_reference import MOE, MROPE, TEXT


def hf_dict(config) -> dict:
    return json.loads(config.to_json_string())


def test_parses_transformers_configs():
    import transformers as tf
    text = tf.Qwen3_5MoeTextConfig(**TEXT, **MOE, rope_parameters=dict(MROPE))
    vl = tf.Qwen3_5MoeConfig(text_config=hf_dict(text), vision_config={"out_hidden_size": 64},
                             tie_word_embeddings=True)
    dense = tf.Qwen3_5TextConfig(**TEXT, intermediate_size=96, rope_parameters=dict(MROPE))
    nxt = tf.Qwen3NextConfig(**TEXT, **MOE, intermediate_size=96, norm_topk_prob=False,
                             mlp_only_layers=[1])
    a = ModelConfig.from_dict(hf_dict(text))
    assert (a.num_experts, a.mrope_section, a.rope_theta, a.layer_types[3]) == \
        (8, [2, 1, 1], 1e7, "full_attention")
    b = ModelConfig.from_dict(hf_dict(vl))
    assert b.model_type == "qwen3_5_moe" and b.vision is not None and b.tie_word_embeddings
    assert b.hidden_size == 64 and b.image_token_id == 248056
    c = ModelConfig.from_dict(hf_dict(dense))
    assert not c.is_moe and c.intermediate_size == 96
    d = ModelConfig.from_dict(hf_dict(nxt))
    assert d.mrope_section is None and not d.norm_topk_prob
    assert not d.layer_is_moe(1) and d.layer_is_moe(2)
    assert d.rope_theta == 10000.0          # HF default when the file names no theta


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_and_build_on_meta(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg
    with torch.device("meta"):
        HybridForCausalLM(cfg)
    assert cfg.vocab_size == (151936 if name.startswith("qwen3-next") else 248320)


def test_flagship_counts_agree_with_the_spec():
    """§2.1: 396.80B total (vision tower included, MTP excluded), 386.55B in routed experts."""
    counts = parameter_counts(ModelConfig.preset("qwen3.5-397b-a17b"))
    assert round(counts.routed_experts / 1e9, 2) == 386.55
    assert round(counts.total / 1e9, 2) == 396.80


def test_demo_preset_is_a_cpu_sized_model():
    assert 100e6 <= parameter_counts(ModelConfig.preset("demo")).total <= 300e6


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(model_type="llama"), "model_type"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda c: c.update(linear_num_value_heads=5), "linear_num_value_heads"),
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c.pop("num_experts"), "num_experts"),
    (lambda c: c.update(layer_types=["linear_attention"] * 3), "layer_types"),
    (lambda c: c.update(layer_types=["linear_attention"] * 3 + ["sliding"]), "layer_types"),
    (lambda c: c.update(num_experts_per_tok=99), "num_experts_per_tok"),
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}),
     "rope_parameters.rope_type"),
])
def test_bad_configs_name_the_field(edit, field):
    raw = ModelConfig.preset("tiny").to_hf_dict()
    edit(raw if field == "model_type" else raw.get("text_config", raw))
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_dict(raw)


def test_vl_config_without_text_config_is_named():
    with pytest.raises(ConfigError, match="'text_config'"):
        ModelConfig.from_dict({"model_type": "qwen3_5_moe"})


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
