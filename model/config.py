"""Model configuration: one flat dataclass for the text model, parsed from a checkpoint's config.json.

Supported `model_type`s: `qwen3_5_moe` (VL, nested `text_config`), `qwen3_5_moe_text`, `qwen3_5` /
`qwen3_5_text` (dense MLP) and `qwen3_next` (flat; grouped GDN projections on disk). Named presets
give a `tiny` model for tests, a `demo` model for CPU demos and the real family sizes for planning.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

QWEN35_VOCAB = 248320
QWEN3_NEXT_VOCAB = 151936

MOE_TYPES = {"qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"}
DENSE_TYPES = {"qwen3_5", "qwen3_5_text"}
VL_TYPES = {"qwen3_5_moe", "qwen3_5"}
LAYER_KINDS = ("linear_attention", "full_attention")
# Fields a checkpoint must state (defaults would silently build the wrong shapes).
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads")
MOE_REQUIRED = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


class ConfigError(ValueError):
    """A config.json (or preset) that this implementation cannot run; names the field."""


@dataclass
class VisionConfig:
    """Vision tower settings (model/vision.py); the defaults are the released 1152-wide tower."""
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"


@dataclass
class ModelConfig:
    model_type: str = "qwen3_5_moe_text"
    vocab_size: int = QWEN35_VOCAB
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    layer_types: list[str] = field(default_factory=list)
    # gated full attention
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    mrope_section: list[int] | None = None        # None: plain 1-D rope (Qwen3-Next)
    mrope_interleaved: bool = True
    rope_scaling: dict | None = None              # e.g. {"rope_type": "yarn", "factor": 4.0, ...}
    max_position_embeddings: int = 262144
    # gated deltanet
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # feed-forward: MoE (num_experts > 0) or dense
    num_experts: int = 256
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    intermediate_size: int = 0                    # dense MLP width (dense models, mlp_only_layers)
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # multimodal (VL checkpoints)
    vision: VisionConfig | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers, 4)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_full_attention_layers(self) -> int:
        return self.layer_types.count("full_attention")

    @property
    def num_linear_attention_layers(self) -> int:
        return self.layer_types.count("linear_attention")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        return (self.is_moe and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise ConfigError(f"config field '{name}': {why}")
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"has {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - set(LAYER_KINDS))
        need(not bad, "layer_types", f"unknown layer type(s) {bad}; expected {list(LAYER_KINDS)}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "linear_num_key_heads", "linear_num_value_heads",
                     "linear_key_head_dim", "linear_value_head_dim", "vocab_size"):
            need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}")
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_value_heads",
             f"{self.linear_num_value_heads} is not a multiple of linear_num_key_heads="
             f"{self.linear_num_key_heads}")
        need(self.linear_conv_kernel_dim >= 2, "linear_conv_kernel_dim", "must be at least 2")
        need(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
             "partial_rotary_factor", f"gives rotary dim {self.rotary_dim} for head_dim {self.head_dim}")
        if self.mrope_section is not None:
            need(sum(self.mrope_section) <= self.rotary_dim // 2, "mrope_section",
                 f"sums to {sum(self.mrope_section)} > rotary_dim/2 = {self.rotary_dim // 2}")
        if self.is_moe:
            need(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 f"{self.num_experts_per_tok} not in 1..num_experts={self.num_experts}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        if self.vision is not None:
            need(self.vision.out_hidden_size == self.hidden_size, "vision_config.out_hidden_size",
                 f"{self.vision.out_hidden_size} differs from the text hidden_size {self.hidden_size}")
            need((self.vision.hidden_size // self.vision.num_heads) % 4 == 0, "vision_config.num_heads",
                 "vision head dim (hidden_size / num_heads) must be a multiple of 4 (2-D rotary)")
        if not all(self.layer_is_moe(i) for i in range(self.num_hidden_layers)):
            need(self.intermediate_size > 0, "intermediate_size",
                 "dense MLP layers need a positive intermediate_size")

    # ---- parsing -------------------------------------------------------------------------
    @staticmethod
    def from_pretrained(path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"no config.json in {path}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return ModelConfig.from_dict(raw)

    @staticmethod
    def from_dict(raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in MOE_TYPES | DENSE_TYPES:
            raise ConfigError(f"config field 'model_type': unsupported value {model_type!r}; "
                              f"expected one of {sorted(MOE_TYPES | DENSE_TYPES)}")
        if model_type in VL_TYPES and not isinstance(raw.get("text_config"), dict):
            raise ConfigError(f"config field 'text_config': missing for model_type {model_type!r}")
        text = dict(raw["text_config"]) if model_type in VL_TYPES else dict(raw)
        for name in REQUIRED + (MOE_REQUIRED if model_type in MOE_TYPES else ("intermediate_size",)):
            if name not in text:
                raise ConfigError(f"config field '{name}': missing")
        kw = _text_fields(text, model_type)
        if model_type in VL_TYPES:
            kw["vision"] = _vision_config(raw.get("vision_config"))
            kw["tie_word_embeddings"] = raw.get("tie_word_embeddings", kw["tie_word_embeddings"])
            for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                         "vision_end_token_id"):
                if name in raw:
                    kw[name] = raw[name]
        return ModelConfig(**kw)

    def to_hf_dict(self) -> dict:
        """config.json content in the Hugging Face layout for this model_type."""
        text = {k: v for k, v in asdict(self).items() if k not in _NON_HF_FIELDS}
        text["rope_parameters"] = self.rope_parameters()
        if not self.is_moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                      "mlp_only_layers"):
                text.pop(k)
        elif self.model_type != "qwen3_next":
            for k in ("norm_topk_prob", "intermediate_size", "decoder_sparse_step", "mlp_only_layers"):
                text.pop(k)
        text["hidden_act"] = "silu"
        if self.model_type not in VL_TYPES:
            text["model_type"] = self.model_type
            return text
        text["model_type"] = self.model_type + "_text"
        top = {"model_type": self.model_type, "text_config": text,
               "tie_word_embeddings": self.tie_word_embeddings,
               "architectures": [_VL_ARCH[self.model_type]]}
        for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id"):
            top[name] = getattr(self, name)
        if self.vision is not None:
            top["vision_config"] = {**asdict(self.vision), "model_type": self.model_type + "_vision"}
        return top

    def rope_parameters(self) -> dict:
        rope = {"rope_type": "default", "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        if self.mrope_section is not None:
            rope.update(mrope_section=list(self.mrope_section),
                        mrope_interleaved=self.mrope_interleaved)
        return rope

    # ---- presets -------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], layer_types=list(PRESETS[name].layer_types))

    def with_overrides(self, **kw) -> "ModelConfig":
        return replace(self, **kw)


_NON_HF_FIELDS = {"vision", "image_token_id", "video_token_id", "vision_start_token_id",
                  "vision_end_token_id", "rope_theta", "partial_rotary_factor", "mrope_section",
                  "mrope_interleaved", "rope_scaling", "model_type"}
_VL_ARCH = {"qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
            "qwen3_5": "Qwen3_5ForConditionalGeneration"}


def default_layer_types(num_layers: int, interval: int) -> list[str]:
    """Every `interval`-th layer (1-based) is full attention, the rest Gated DeltaNet."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(num_layers)]


def _text_fields(text: dict, model_type: str) -> dict:
    names = {f.name for f in fields(ModelConfig)} - _NON_HF_FIELDS - {"model_type"}
    kw = {k: text[k] for k in names if k in text and text[k] is not None}
    kw["model_type"] = model_type
    if model_type in DENSE_TYPES:
        kw["num_experts"] = 0
    elif model_type != "qwen3_next":
        kw["norm_topk_prob"] = True          # Qwen3.5 MoE always renormalises
        kw.pop("mlp_only_layers", None)
        kw.pop("decoder_sparse_step", None)
    if "layer_types" not in kw:
        n = kw.get("num_hidden_layers", ModelConfig.num_hidden_layers)
        kw["layer_types"] = default_layer_types(n, text.get("full_attention_interval", 4))
    kw.update(_rope_fields(text, model_type))
    return kw


def _rope_fields(text: dict, model_type: str) -> dict:
    rope = dict(text.get("rope_parameters") or {})
    legacy = text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))  # HF default when absent
    partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    out = {"rope_theta": float(theta), "partial_rotary_factor": float(partial)}
    if model_type != "qwen3_next":
        out["mrope_section"] = list(rope.get("mrope_section", legacy.get("mrope_section",
                                                                         [11, 11, 10])))
        out["mrope_interleaved"] = bool(rope.get("mrope_interleaved", True))
    else:
        out["mrope_section"] = None
    kind = rope.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"config field 'rope_parameters.rope_type': unsupported value {kind!r}")
    if kind == "yarn":
        src = rope if rope.get("rope_type") == "yarn" else legacy
        out["rope_scaling"] = {k: v for k, v in src.items()
                               if k not in ("rope_theta", "partial_rotary_factor", "mrope_section",
                                            "mrope_interleaved", "type")}
        out["rope_scaling"]["rope_type"] = "yarn"
    return out


def _vision_config(raw: dict | None) -> VisionConfig | None:
    if raw is None:
        return None
    names = {f.name for f in fields(VisionConfig)}
    return VisionConfig(**{k: v for k, v in raw.items() if k in names})


_QWEN35 = dict(rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[11, 11, 10],
               head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128,
               linear_num_key_heads=16, max_position_embeddings=262144)

PRESETS: dict[str, ModelConfig] = {
    # tests: both layer types, 4 layers, 8 experts; real vocabulary; loads in about a second
    "tiny": ModelConfig(model_type="qwen3_5_moe", hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=32, shared_expert_intermediate_size=48,
                    mrope_section=[2, 1, 1], max_position_embeddings=262144,
                    vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                        out_hidden_size=64, num_position_embeddings=64)),
    # CPU demo: ~190M parameters (127M of them the two 248K-row embedding matrices)
    "demo": ModelConfig(model_type="qwen3_5_moe", hidden_size=256, num_hidden_layers=8,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
                    linear_value_head_dim=32, num_experts=32, num_experts_per_tok=4,
                    moe_intermediate_size=256, shared_expert_intermediate_size=256,
                    mrope_section=[4, 2, 2], max_position_embeddings=262144,
                    vision=VisionConfig(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                                        out_hidden_size=256, num_position_embeddings=256)),
    "qwen3.5-397b-a17b": ModelConfig(model_type="qwen3_5_moe", hidden_size=4096, num_hidden_layers=60,
                                 num_attention_heads=32, num_key_value_heads=2,
                                 linear_num_value_heads=64, num_experts=512, num_experts_per_tok=10,
                                 moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                                 **_QWEN35, vision=VisionConfig(out_hidden_size=4096)),
    "qwen3.5-122b-a10b": ModelConfig(model_type="qwen3_5_moe", hidden_size=3072, num_hidden_layers=48,
                                 num_attention_heads=32, num_key_value_heads=2,
                                 linear_num_value_heads=64, num_experts=256, num_experts_per_tok=8,
                                 moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                                 **_QWEN35, vision=VisionConfig(out_hidden_size=3072)),
    "qwen3.5-35b-a3b": ModelConfig(model_type="qwen3_5_moe", hidden_size=2048, num_hidden_layers=40,
                               num_attention_heads=16, num_key_value_heads=2,
                               linear_num_value_heads=32, num_experts=256, num_experts_per_tok=8,
                               moe_intermediate_size=512, shared_expert_intermediate_size=512,
                               **_QWEN35, vision=VisionConfig(out_hidden_size=2048)),
    "qwen3.5-27b": ModelConfig(model_type="qwen3_5", hidden_size=5120, num_hidden_layers=64,
                           num_attention_heads=24, num_key_value_heads=4,
                           linear_num_value_heads=48, num_experts=0, intermediate_size=17408,
                           **_QWEN35, vision=VisionConfig(out_hidden_size=5120)),
    "qwen3-next-80b-a3b": ModelConfig(model_type="qwen3_next", vocab_size=QWEN3_NEXT_VOCAB,
                                  hidden_size=2048, num_hidden_layers=48, num_attention_heads=16,
                                  num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                                  linear_num_value_heads=32, num_experts=512, num_experts_per_tok=10,
                                  moe_intermediate_size=512, shared_expert_intermediate_size=512,
                                  intermediate_size=5120, norm_topk_prob=True, rope_theta=1e7,
                                  mrope_section=None, max_position_embeddings=262144),
}
