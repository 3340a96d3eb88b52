"""The engine loop: requests in, one step at a time (schedule -> run -> postprocess), outputs out.

Single-threaded and synchronous; `AsyncEngine` drives it from asyncio and `LLM` to completion.
Never imports ray.
"""
from __future__ import annotations

import logging
import random

import torch

from cluster.engine.cache_manager import CacheManager, CachePlan, plan_capacity
from cluster.engine.config import CPU_DEFAULT_KV_MEMORY, EngineConfig
from cluster.engine.detokenizer import Detokenizer
from cluster.engine.model_runner import ModelRunner, StepHidden
from cluster.engine.output import RequestOutput
from cluster.engine.request import Request
from cluster.engine.sampler import Sampler, top_logprobs
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import Scheduler
from cluster.engine.sequence import Sequence
from kernels.linear_argmax import ScreenedArgmax
from model.batch import HybridCache
from model.image import ImageError
from model.mrope import MultimodalPrompt, prepare_multimodal
from model.video import Video

log = logging.getLogger("deltaray.engine")

PromptInput = str | list[int] | dict


def as_video(value) -> Video:
    """A Video, or a dict of its fields ({"frames": [...], "timestamps": [...] | "fps": f})."""
    if isinstance(value, Video):
        return value
    if isinstance(value, dict) and "frames" in value:
        return Video(list(value["frames"]), value.get("timestamps"), value.get("fps"))
    raise ImageError("a video is a model.video.Video or {'frames': [...], 'timestamps' or 'fps'}")


class RequestError(ValueError):
    """A request the engine cannot run (too long, bad token ids, bad image, duplicate id);
    nothing was done."""


def cache_budget(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.gpu_memory_utilization)
    return CPU_DEFAULT_KV_MEMORY


class Engine:
    """processor: the checkpoint's ImageProcessor (None: image and video requests are refused);
    video_processor: its VideoProcessor; image_filesystem: what reads `s3://` (or other
    scheme) image and frame URIs, e.g. s3fs."""

    def __init__(self, model, tokenizer, config: EngineConfig, eos_token_ids: list[int],
                 processor=None, image_filesystem=None, video_processor=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.processor, self.image_filesystem = processor, image_filesystem
        self.video_processor = video_processor
        greedy_head = None
        if model.lm_head.weight.device.type == "cpu":
            model.store_lm_head_by_column()
            if model.lm_head.weight.dtype == torch.float32:
                greedy_head = ScreenedArgmax(model.lm_head.weight)
        cfg, weight = model.config, model.lm_head.weight
        self.vocab_size = cfg.vocab_size
        self.plan = self.plan_cache(cfg, weight.dtype, weight.device)
        self.max_model_len = self.resolve_max_model_len(cfg.max_position_embeddings)
        log.info("%s; max_model_len %d", self.plan.describe(), self.max_model_len)
        self.cache = CacheManager(self.plan.num_blocks, config.block_size, self.plan.num_slots)
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_num_batched_tokens)
        kv = model.new_cache(self.plan.num_blocks, config.block_size, self.plan.num_slots)
        self.runner = ModelRunner(model, kv, config.block_size, weight.device)
        self.sampler = Sampler(eos_token_ids, greedy_head)
        self.eos_token_ids = list(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.rng = random.Random(config.seed)
        self.next_seq_id = 0

    def plan_cache(self, cfg, dtype: torch.dtype, device: torch.device) -> CachePlan:
        c = self.config
        per_block = HybridCache.bytes_per_block(cfg, c.block_size, dtype)
        return plan_capacity(cache_budget(c, device), per_block,
                             HybridCache.bytes_per_slot(cfg, dtype), c.block_size, c.max_num_seqs,
                             c.max_model_len or cfg.max_position_embeddings)

    def resolve_max_model_len(self, model_max: int) -> int:
        """The configured length, capped so that one sequence always fits the KV blocks."""
        asked = self.config.max_model_len
        if asked is not None and asked > self.plan.max_tokens:
            raise ValueError(f"max_model_len={asked} needs more KV cache than planned "
                             f"({self.plan.max_tokens} tokens); raise kv_cache_memory")
        return min(asked or model_max, self.plan.max_tokens)

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                    priority: int = 0) -> None:
        self.add(self.new_request(request_id, prompt, params, priority))

    def new_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                    priority: int = 0) -> Request:
        """Validate and tokenize; raises before the request touches any engine state."""
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be SamplingParams, "
                               f"got {type(params).__name__}")
        params.validate()
        text, ids = self.tokenize(prompt)
        media = prompt if isinstance(prompt, dict) else {}
        mm = self.prepare_images(ids, media.get("images"), media.get("videos"))
        ids = mm.token_ids if mm is not None else ids
        self.check_prompt(ids)
        return Request(request_id, text, ids, params, priority, mm)

    def tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise RequestError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise RequestError(f"prompt must be str, list[int] or dict, got {type(prompt).__name__}")

    def prepare_images(self, ids: list[int], images, videos=None) -> MultimodalPrompt | None:
        """Decode and preprocess a prompt's images and videos (`model.video.Video`, or a dict
        of its fields), expand the placeholders (None: neither). Any bad input (or placeholder
        count) rejects the request, naming the input."""
        if not images and not videos:
            return None
        if self.processor is None:
            raise RequestError("this model does not accept images or videos (no vision tower or "
                               "preprocessor_config.json)")
        for name, value in (("images", images), ("videos", videos)):
            if value and not isinstance(value, (list, tuple)):
                raise RequestError(f"'{name}' must be a list, got {type(value).__name__}")
        try:
            return prepare_multimodal(ids, list(images or []), self.processor, self.model.config,
                                      filesystem=self.image_filesystem,
                                      videos=[as_video(v) for v in videos or []],
                                      video_processor=self.video_processor,
                                      tokenizer=self.tokenizer)
        except ImageError as e:
            raise RequestError(str(e)) from None

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("prompt is empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; max_model_len is "
                               f"{self.max_model_len}, which leaves no room to generate")

    def add(self, req: Request) -> None:
        for i in range(req.params.n):
            seq = Sequence(self.next_seq_id, req.request_id, i, req.prompt_token_ids, req.params,
                           self.new_generator(req.params.seed, i), self.new_detokenizer(req),
                           req.priority, arrival=self.next_seq_id, mm=req.mm)
            self.next_seq_id += 1
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[req.request_id] = req

    def new_generator(self, seed: int | None, index: int) -> torch.Generator:
        """Per-sequence randomness: the request seed (+ choice index), else the engine stream."""
        value = seed + index if seed is not None else self.rng.getrandbits(63)
        return torch.Generator().manual_seed(value)

    def new_detokenizer(self, req: Request) -> Detokenizer:
        p = req.params
        return Detokenizer(self.tokenizer, req.prompt_token_ids, p.skip_special_tokens, p.stop,
                           p.include_stop_str_in_output)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        return req.output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ------------------------------------------------------------------------
    def step(self, force: bool = False) -> list[RequestOutput]:
        """One step. `force`: run the model even with nothing scheduled (an empty batch), as an
        expert-parallel rank must so that every rank joins each MoE layer's collectives."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if force:
                self.runner.run_empty()
            return []
        return self.postprocess(scheduled, self.runner.run(scheduled))

    @torch.inference_mode()
    def postprocess(self, scheduled: list[tuple[Sequence, int]], step: StepHidden):
        to_sample = []
        for seq, n in scheduled:
            if seq.seq_id in step.prompt_rows:
                self.record_prompt_logprobs(seq, n, step)
            seq.num_cached_tokens += n
            if seq.seq_id in step.sample_rows:
                to_sample.append(seq)
        rows = [step.sample_rows[s.seq_id] for s in to_sample]
        sampled = self.sampler.sample(step.hidden_LH[rows], self.model.lm_head, to_sample) if rows else []
        for seq, (token, logprob, tops) in zip(to_sample, sampled):
            seq.append_token(token, logprob, tops)
            self.check_stop(seq, token)
        return self.collect_outputs({s.request_id for s in to_sample})

    def record_prompt_logprobs(self, seq: Sequence, n: int, step: StepHidden) -> None:
        first_row, first_target = step.prompt_rows[seq.seq_id]
        count = min(n, seq.num_prompt_tokens - first_target)
        logits_LV = self.model.lm_head(step.hidden_LH[first_row:first_row + count])
        logprobs_LV = torch.log_softmax(logits_LV.float(), -1)
        for j in range(count):
            target = first_target + j
            if target == len(seq.prompt_logprobs):      # skip rows recomputed after preemption
                seq.prompt_logprobs.append(top_logprobs(logprobs_LV[j], seq.token_ids[target],
                                                        seq.params.prompt_logprobs))

    def check_stop(self, seq: Sequence, token: int) -> None:
        """Stop policy: EOS, stop token, stop string (after min_tokens), then length limits."""
        p = seq.params
        past_min = seq.num_output_tokens >= p.min_tokens
        stop_string = seq.detokenizer.add_token(token, check_stop=past_min)
        if past_min and not p.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop")
        elif past_min and token in p.stop_token_ids:
            seq.finish("stop", token)
        elif stop_string is not None:
            seq.finish("stop", stop_string)
        elif (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            seq.finish("length")
        if seq.is_finished:
            seq.detokenizer.flush()
            self.scheduler.finish(seq)

    def collect_outputs(self, request_ids: set[str]) -> list[RequestOutput]:
        outs = []
        for rid in sorted(request_ids, key=lambda r: self.requests[r].seqs[0].seq_id):
            req = self.requests[rid]
            outs.append(req.output())
            if req.finished:
                del self.requests[rid]
        return outs
