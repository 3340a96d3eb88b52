"""Hugging Face checkpoint I/O: safetensors (single file or sharded with an index) <-> our model.

Loading builds the model on the `meta` device, allocates it once, and reads each tensor straight
into its parameter (model/weight_file.py), so peak memory stays close to the weight bytes. It accepts both
expert layouts (fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] without a
`.weight` suffix, and per-expert `experts.{e}.{gate,up,down}_proj.weight`), both prefixes
(`model.language_model.` and `model.`), and Qwen3-Next's grouped GDN projections. An expert-
parallel rank loads only `experts` (a contiguous range of global expert ids), reading only their
bytes. Anything missing,
unexpected or wrongly shaped fails loudly, naming the tensor and the file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import VL_TYPES, ModelConfig
from model.hybrid import HybridForCausalLM
from model.weight_file import WeightFile, WeightFileError

# On-disk prefix -> our prefix. Our module names below the prefix are the Hugging Face ones.
PREFIX_MAP = {
    "model.language_model.": "model.",
    "model.": "model.",
    "lm_head.": "lm_head.",
}
IGNORED = re.compile(r"^mtp\.")                         # MTP head (unused)
VISUAL = re.compile(r"^model\.visual\.")                 # vision tower: loaded when cfg.vision is set
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
        self.expert_parts: dict[str, set] = {}     # fused name -> (row, part) filled from files

    def load(self, path: Path) -> None:
        for file, names in weight_files(path).items():
            try:
                with WeightFile(path / file) as wf:
                    for name in names or wf.keys():
                        if name not in wf.entries:
                            raise CheckpointError(f"tensor {name} is listed in the index for "
                                                  f"{file} but is not in that file")
                        self.take(name, wf)
            except WeightFileError as e:
                raise CheckpointError(str(e)) from None
        self.check_complete(path)

    def take(self, disk_name: str, wf: WeightFile) -> None:
        if IGNORED.match(disk_name) or (VISUAL.match(disk_name) and self.cfg.vision is None):
            return
        name = our_name(disk_name)
        where = f"{disk_name} in {wf.path.name}"
        if name is None:
            raise CheckpointError(f"unexpected tensor {where}")
        if (m := PER_EXPERT.match(name)):
            return self.take_expert(m, wf, disk_name, where)
        if FUSED_EXPERT.match(name):
            target = self.param(name, where)
            shape = wf.shape(disk_name)
            check_shape(shape[1:], target.shape[1:], where, shape)
            if shape[0] < self.experts.stop:
                raise CheckpointError(f"tensor {where} holds {shape[0]} experts, "
                                      f"need ids up to {self.experts.stop - 1}")
            return self.fill(name, wf, disk_name, rows=self.experts)
        if (m := GROUPED_GDN.match(name)):
            for part, tensor in ungroup_gdn(m.group(2), wf.read(disk_name), self.cfg).items():
                target = self.param(f"{m.group(1)}.{part}.weight", where)
                check_shape(tensor.shape, target.shape, where)
                with torch.no_grad():
                    target.copy_(tensor)
                self.unfilled.discard(f"{m.group(1)}.{part}.weight")
            return
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return
        check_shape(wf.shape(disk_name), self.param(name, where).shape, where)
        self.fill(name, wf, disk_name)

    def fill(self, name: str, wf: WeightFile, disk_name: str, rows: range | None = None) -> None:
        with torch.no_grad():
            wf.read_into(disk_name, self.params[name].data, rows)
        self.unfilled.discard(name)

    def take_expert(self, m: re.Match, wf: WeightFile, disk_name: str, where: str) -> None:
        e = int(m.group(2))
        if e not in self.experts:
            return
        row, which = e - self.experts.start, m.group(3)
        fused = f"{m.group(1)}.{'down_proj' if which == 'down' else 'gate_up_proj'}"
        target = self.param(fused, where).data
        I = self.cfg.moe_intermediate_size
        dest = {"gate": target[row, :I], "up": target[row, I:], "down": target[row]}[which]
        check_shape(wf.shape(disk_name), dest.shape, where)
        with torch.no_grad():
            wf.read_into(disk_name, dest)
        filled = self.expert_parts.setdefault(fused, set())
        filled.add((row, which))
        if len(filled) == (1 if which == "down" else 2) * len(self.experts):
            self.unfilled.discard(fused)

    def param(self, name: str, where: str) -> torch.nn.Parameter:
        if name not in self.params:
            raise CheckpointError(f"unexpected tensor {where}")
        return self.params[name]

    def check_complete(self, path: Path) -> None:
        if self.unfilled:
            missing = sorted(self.unfilled)
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"checkpoint {path} is missing tensor(s) "
                                  f"{', '.join(missing[:5])}{more}")


def check_shape(got, expected, where: str, full=None) -> None:
    if tuple(got) != tuple(expected):
        shown = tuple(full) if full is not None else tuple(got)
        raise CheckpointError(f"tensor {where} has shape {shown}, expected {tuple(expected)}"
                              + (" after the expert dimension" if full is not None else ""))


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
        if VISUAL.match(name):
            disk = name
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
