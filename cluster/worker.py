"""One rank of an expert-parallel replica: a full engine (scheduler, caches, sampler) over a model
that holds every non-expert weight and this rank's slice of the routed experts.

A plain class; cluster/replica.py runs it as a Ray actor (one process per rank, so the process
group is the process's default group). The coordinator calls `step` on every rank at once, and a
rank with nothing scheduled runs an empty forward so the MoE collectives always pair up.
"""
from __future__ import annotations

import socket

import torch

from cluster.engine.config import EngineConfig
from cluster.engine.engine import Engine
from cluster.engine.llm import eos_token_ids
from cluster.parallel import expert_parallel, expert_range, free_port, init_group
from model.checkpoint import load_model, resolve_dtype
from model.config import ModelConfig
from model.processor import Tokenizer


class RankWorker:
    def __init__(self, model_dir: str, rank: int, ep_size: int, config: EngineConfig,
                 dtype: str = "float32", device: str = "cpu"):
        self.model_dir, self.rank, self.ep_size = model_dir, rank, ep_size
        self.config, self.dtype, self.device = config, resolve_dtype(dtype), device
        self.engine: Engine | None = None

    def address(self) -> str:
        """Rank 0 only: a free loopback port where the process group rendezvous will listen.
        (Loopback: all ranks of a replica share a node, the placement group is PACK.)"""
        host = "127.0.0.1" if self.device == "cpu" else socket.gethostbyname(socket.gethostname())
        return f"{host}:{free_port()}"

    def join(self, address: str, timeout_s: float) -> int:
        """Join the group, load this rank's experts, build the engine; returns max_model_len."""
        backend = "nccl" if self.device.startswith("cuda") else "gloo"
        init_group(address, self.rank, self.ep_size, timeout_s, backend)
        cfg = ModelConfig.from_pretrained(self.model_dir)
        experts = expert_range(cfg.num_experts, self.ep_size, self.rank)
        model = expert_parallel(load_model(self.model_dir, self.dtype, self.device, experts, cfg))
        tokenizer = Tokenizer.from_pretrained(self.model_dir)
        self.engine = Engine(model, tokenizer, self.config, eos_token_ids(self.model_dir))
        return self.engine.max_model_len

    def new_request(self, request_id: str, prompt, params, priority: int = 0):
        """Validate and tokenize (raises RequestError / SamplingError); no engine state changes."""
        return self.engine.new_request(request_id, prompt, params, priority)

    def add(self, request) -> None:
        self.engine.add(request)

    def abort(self, request_id: str):
        return self.engine.abort(request_id)

    def step(self) -> tuple[list, dict]:
        """One lock-step: this rank's outputs and its load afterwards."""
        return self.engine.step(force=True), self.stats()

    def stats(self) -> dict:
        s, c = self.engine.scheduler, self.engine.cache
        return {"running": len(s.running), "waiting": len(s.waiting),
                "free_slots": c.num_free_slots, "num_slots": c.num_slots,
                "free_blocks": c.num_free_blocks, "num_blocks": c.num_blocks}

    def parameter_bytes(self) -> dict:
        """Bytes held on this rank: routed experts and everything else (replicated)."""
        routed = replicated = 0
        for name, p in self.engine.model.named_parameters():
            if ".mlp.experts." in name:
                routed += p.numel() * p.element_size()
            else:
                replicated += p.numel() * p.element_size()
        return {"routed": routed, "replicated": replicated}

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
