"""Hugging Face checkpoint I/O: safetensors (single file or sharded with an index) <-> our model.

Loading builds the model on the `meta` device, allocates it once, and copies tensors in one at a
time from memory-mapped files, so peak memory stays close to the weight bytes. It accepts both
expert layouts (fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] without a
`.weight` suffix, and per-expert `experts.{e}.{gate,up,down}_proj.weight`), both prefixes
(`model.language_model.` and `model.`), and Qwen3-Next's grouped GDN projections. An expert-
parallel rank loads only `experts` (a contiguous range of global expert ids). Anything missing,
unexpected or wrongly shaped fails loudly, naming the tensor and the file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import VL_TYPES, ModelConfig
from model.hybrid import HybridForCausalLM

# On-disk prefix -> our prefix. Our module names below the prefix are the Hugging Face ones.
PREFIX_MAP = {
    "model.language_model.": "model.",
    "model.": "model.",
    "lm_head.": "lm_head.",
}
IGNORED = re.compile(r"^(mtp\.|model\.visual\.)")       # MTP head (unused), vision tower (later)
PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
GROUPED_GDN = re.compile(r"^(model\.layers\.\d+\.linear_attn)\.(in_proj_qkvz|in_proj_ba)\.weight$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor and file."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unsupported value {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def weight_files(path: Path) -> dict[str, list[str]]:
    """file -> tensor names, from the index when sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files: dict[str, list[str]] = {}
        for name, file in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not (path / file).exists():
                raise CheckpointError(f"shard {file} listed in {index.name} is missing from {path}")
        return files
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return {f: None for f in found}


def load_model(path: str | Path, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu", experts: range | None = None,
               config: ModelConfig | None = None) -> HybridForCausalLM:
    path = Path(path)
    cfg = config or ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    model = HybridForCausalLM.empty(cfg, dtype, device, experts)
    Loader(model, cfg, experts).load(path)
    return model.eval()


class Loader:
    def __init__(self, model: HybridForCausalLM, cfg: ModelConfig, experts: range | None):
        self.cfg = cfg
        self.params = dict(model.named_parameters())
        self.unfilled = set(self.params)
        self.experts = experts or range(cfg.num_experts)
        self.expert_rows: dict[str, set] = {}     # fused name -> local rows filled (per-expert)

    def load(self, path: Path) -> None:
        for file, names in weight_files(path).items():
            try:
                with safe_open(str(path / file), framework="pt") as f:
                    for name in names or f.keys():
                        self.take(name, lambda n=name: f.get_tensor(n), file)
            except CheckpointError:
                raise
            except Exception as e:   # safetensors raises its own types for corrupt files
                raise CheckpointError(f"cannot read {path / file}: {e}") from None
        self.check_complete(path)

    def take(self, disk_name: str, read, file: str) -> None:
        if IGNORED.match(disk_name):
            return
        name = our_name(disk_name)
        if name is None:
            raise CheckpointError(f"unexpected tensor {disk_name} in {file}")
        if (m := PER_EXPERT.match(name)):
            return self.take_expert(m, read, disk_name, file)
        if FUSED_EXPERT.match(name):
            return self.copy(name, read()[self.experts.start:self.experts.stop], disk_name, file)
        if (m := GROUPED_GDN.match(name)):
            for part, tensor in ungroup_gdn(m.group(2), read(), self.cfg).items():
                self.copy(f"{m.group(1)}.{part}.weight", tensor, disk_name, file)
            return
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return
        self.copy(name, read(), disk_name, file)

    def take_expert(self, m: re.Match, read, disk_name: str, file: str) -> None:
        e = int(m.group(2))
        if e not in self.experts:
            return
        row, which = e - self.experts.start, m.group(3)
        fused = f"{m.group(1)}.{'down_proj' if which == 'down' else 'gate_up_proj'}"
        target = self.param(fused, disk_name, file)
        tensor = read()
        I = self.cfg.moe_intermediate_size
        dest = {"gate": target[row, :I], "up": target[row, I:], "down": target[row]}[which]
        self.check_shape(dest, tensor, disk_name, file)
        with torch.no_grad():
            dest.copy_(tensor)
        filled = self.expert_rows.setdefault(fused, set())
        filled.add((row, which))
        parts = 1 if which == "down" else 2
        if len(filled) == parts * len(self.experts):
            self.unfilled.discard(fused)

    def param(self, name: str, disk_name: str, file: str) -> torch.nn.Parameter:
        if name not in self.params:
            raise CheckpointError(f"unexpected tensor {disk_name} in {file}")
        return self.params[name]

    def copy(self, name: str, tensor: torch.Tensor, disk_name: str, file: str) -> None:
        target = self.param(name, disk_name, file)
        self.check_shape(target, tensor, disk_name, file)
        with torch.no_grad():
            target.copy_(tensor)
        self.unfilled.discard(name)

    @staticmethod
    def check_shape(target: torch.Tensor, tensor: torch.Tensor, disk_name: str, file: str):
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {disk_name} in {file} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(target.shape)}")

    def check_complete(self, path: Path) -> None:
        if self.unfilled:
            missing = sorted(self.unfilled)
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"checkpoint {path} is missing tensor(s) "
                                  f"{', '.join(missing[:5])}{more}")


def our_name(disk_name: str) -> str | None:
    for prefix, ours in PREFIX_MAP.items():
        if disk_name.startswith(prefix):
            return ours + disk_name[len(prefix):]
    return None


def ungroup_gdn(kind: str, w: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Qwen3-Next stores, per key head g, [q_g | k_g | v_g | z_g] and [b_g | a_g]; we keep
    [q all | k all | v all], z, b and a as separate projections (the Qwen3.5 layout)."""
    HK, K, V = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // HK
    H = w.shape[-1]
    if kind == "in_proj_ba":
        b, a = w.view(HK, 2 * r, H).split([r, r], dim=1)
        return {"in_proj_b": b.reshape(-1, H), "in_proj_a": a.reshape(-1, H)}
    q, k, v, z = w.view(HK, 2 * K + 2 * r * V, H).split([K, K, r * V, r * V], dim=1)
    qkv = torch.cat([q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)])
    return {"in_proj_qkv": qkv, "in_proj_z": z.reshape(-1, H)}


# ---- writing ---------------------------------------------------------------------------------

def hf_state_dict(model: HybridForCausalLM, fused_experts: bool = True) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names for the model's config (Qwen3.5 layouts only)."""
    cfg = model.config
    prefix = "model.language_model." if cfg.model_type in VL_TYPES else "model."
    out = {}
    for name, p in model.state_dict().items():
        if name.startswith("model.rotary") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        disk = prefix + name[len("model."):] if name.startswith("model.") else name
        if not fused_experts and FUSED_EXPERT.match(name):
            out.update(split_experts(disk, p, cfg.moe_intermediate_size))
        else:
            out[disk] = p
    return out


def split_experts(fused_name: str, p: torch.Tensor, I: int) -> dict[str, torch.Tensor]:
    base = fused_name.rsplit(".", 1)[0]
    if fused_name.endswith("down_proj"):
        return {f"{base}.{e}.down_proj.weight": p[e] for e in range(p.shape[0])}
    out = {}
    for e in range(p.shape[0]):
        out[f"{base}.{e}.gate_proj.weight"] = p[e, :I]
        out[f"{base}.{e}.up_proj.weight"] = p[e, I:]
    return out


def save_checkpoint(model: HybridForCausalLM, out_dir: str | Path, max_shard_bytes: int = 2 << 30,
                    fused_experts: bool = True) -> None:
    """config.json + safetensors (sharded with an index above `max_shard_bytes`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    write_safetensors({k: v.detach().contiguous() for k, v in
                       hf_state_dict(model, fused_experts).items()}, out, max_shard_bytes)


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
