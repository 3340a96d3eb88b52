"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))` and `.chat(...)`.

`model` is a checkpoint directory or `preset:NAME`, which writes that preset's random
checkpoint into ~/.cache/deltaray/presets/NAME (or $DELTARAY_CACHE/presets/NAME) on first use.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from cluster.engine.config import EngineConfig
from cluster.engine.engine import Engine, PromptInput
from cluster.engine.output import RequestOutput
from cluster.engine.sampling_params import SamplingParams
from model.checkpoint import load_model, resolve_dtype
from model.config import ModelConfig
from model.image_processor import ImageProcessor
from model.video import VideoProcessor
from model.processor import Tokenizer


def cache_root() -> Path:
    return Path(os.environ.get("DELTARAY_CACHE", Path.home() / ".cache" / "deltaray"))


def resolve_model_dir(model: str | Path) -> Path:
    """A checkpoint directory; `preset:NAME` is written into the cache on first use."""
    text = str(model)
    if text.startswith("preset:"):
        return preset_dir(text.removeprefix("preset:"))
    path = Path(text)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model {text!r}: no config.json there (or use preset:NAME)")
    return path


def preset_dir(name: str) -> Path:
    """The cached preset checkpoint, rebuilt when the preset's config has changed since (a stamp
    of its config.json content sits beside it). Written to a temporary directory and renamed,
    so a reader never sees half a checkpoint."""
    stamp = hashlib.sha256(json.dumps(ModelConfig.preset(name).to_hf_dict(), sort_keys=True,
                                      default=str).encode()).hexdigest()[:16]
    target = cache_root() / "presets" / name
    stamp_file = target / ".preset-stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return target
    from model.random_checkpoint import write_random_checkpoint
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    write_random_checkpoint(name, tmp)
    (tmp / ".preset-stamp").write_text(stamp)
    if target.exists():                        # stale: move it aside, then drop it
        old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=target.parent))
        target.rename(old / name)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:                            # another process won the race; theirs is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def show_engine_log() -> None:
    """The cache plan is logged at INFO; give the package logger a handler if nobody has (as
    vLLM does), so the offline user sees it without configuring logging."""
    root = logging.getLogger("deltaray")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def eos_token_ids(path: str | Path) -> list[int]:
    """EOS ids from generation_config.json (int or list), else config.json."""
    path = Path(path)
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.exists():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def chat_images(conversation: list[dict]) -> list:
    """The images of a conversation's content parts, in order: OpenAI `{"type": "image_url",
    "image_url": {"url": ...}}` (a data: URL, path or s3:// URI) and `{"type": "image",
    "image": ...}` (anything model.image.load_image takes)."""
    images = []
    for message in conversation:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            if "image_url" in part:               # the same tests as the chat template's
                url = part["image_url"]
                images.append(url.get("url") if isinstance(url, dict) else url)
            elif "image" in part or part.get("type") == "image":
                images.append(part.get("image"))
    return images


def chat_videos(conversation: list[dict]) -> list:
    """The videos of a conversation's `{"type": "video", "video": Video | {"frames": [...],
    "timestamps" or "fps"}}` content parts, in order."""
    return [part.get("video") for message in conversation
            for part in (message.get("content") if isinstance(message.get("content"), list) else [])
            if isinstance(part, dict) and ("video" in part or part.get("type") == "video")]


def chat_prompt(templated: str | list[int], images: list, videos: list = ()) -> dict:
    prompt = {"prompt": templated} if isinstance(templated, str) else {"prompt_token_ids": templated}
    media = {"images": images} if images else {}
    return {**prompt, **media, **({"videos": list(videos)} if videos else {})}


class LLM:
    def __init__(self, model: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 seed: int = 0, max_num_seqs: int = 64, max_num_batched_tokens: int = 8192,
                 max_model_len: int | None = None, kv_cache_memory: int | None = None,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9, ep_size: int = 1,
                 gpus_per_rank: float | None = None, image_filesystem=None):
        """image_filesystem: reads `s3://` image URIs (e.g. s3fs.S3FileSystem); images given as
        PIL images, bytes, paths or data: URLs need none."""
        config = EngineConfig(max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                              kv_cache_memory=kv_cache_memory, max_model_len=max_model_len,
                              seed=seed, gpu_memory_utilization=gpu_memory_utilization)
        self.model_dir = resolve_model_dir(model)
        if ep_size > 1:              # ranks in Ray actors (cluster/replica.py); the API stays
            from cluster.replica import attach
            return attach(self, self.model_dir, ep_size, config, dtype, device, gpus_per_rank)
        self.model = load_model(self.model_dir, dtype=resolve_dtype(dtype), device=device)
        self.tokenizer = Tokenizer.from_pretrained(self.model_dir)
        show_engine_log()
        processor = (ImageProcessor.from_pretrained(self.model_dir)
                     if self.model.config.vision is not None else None)
        videos = VideoProcessor.from_pretrained(self.model_dir) if processor is not None else None
        self.engine = Engine(self.model, self.tokenizer, config, eos_token_ids(self.model_dir),
                             processor, image_filesystem, videos)
        self.request_counter = 0

    def generate(self, prompts: PromptInput | list[PromptInput],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        priority = priority or [0] * len(prompts)
        requests = [self.engine.new_request(self.next_id(), p, sp, pr)      # validate all first
                    for p, sp, pr in zip(prompts, params, priority)]
        for req in requests:
            self.engine.add(req)
        return self.run_to_completion([r.request_id for r in requests])

    def chat(self, conversations: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             enable_thinking: bool = False, tools: list[dict] | None = None) -> list[RequestOutput]:
        """Chat-template each conversation (list of {"role", "content"}) and generate."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=True,
                                                      enable_thinking=enable_thinking)
                   for c in conversations]
        return self.generate([chat_prompt(p, chat_images(c), chat_videos(c))
                              for p, c in zip(prompts, conversations)],
                             sampling_params)

    def next_id(self) -> str:
        self.request_counter += 1
        return str(self.request_counter - 1)

    def run_to_completion(self, request_ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in request_ids]
