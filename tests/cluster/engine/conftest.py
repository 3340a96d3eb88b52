"""Engine fixtures: the tiny model loaded once, and engines built on it with any settings."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cluster.engine import Engine, EngineConfig
from cluster.engine.llm import eos_token_ids
from model.batch import HybridCache, ForwardBatch
from model.checkpoint import load_model
from model.processor import Tokenizer


@dataclass
class TinyModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    eos: list[int]

    def engine(self, num_blocks: int | None = None, **settings) -> Engine:
        """An engine; `num_blocks` sizes kv_cache_memory to exactly that many KV blocks."""
        settings.setdefault("kv_cache_memory", 8 << 20)       # not the 1 GiB CPU default
        config = EngineConfig(**settings)
        if num_blocks is not None:
            cfg = self.model.config
            config.kv_cache_memory = (
                num_blocks * HybridCache.bytes_per_block(cfg, config.block_size, torch.float32)
                + config.max_num_seqs * HybridCache.bytes_per_slot(cfg, torch.float32))
        return Engine(self.model, self.tokenizer, config, self.eos)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint) -> TinyModel:
    return TinyModel(load_model(tiny_checkpoint), Tokenizer.from_pretrained(tiny_checkpoint),
                     eos_token_ids(tiny_checkpoint))


def run_all(engine: Engine) -> dict:
    """Step until idle; request_id -> final RequestOutput."""
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def full_forward_logits(model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """The model over the whole token list in one step from an empty cache: logits [T, V]."""
    blocks = -(-len(ids) // block_size)
    cache = model.new_cache(num_blocks=blocks, block_size=block_size, num_slots=1)
    batch = ForwardBatch.build([len(ids)], [0], [list(range(blocks))], [0], block_size, logits="all")
    with torch.inference_mode():
        return model(torch.tensor(ids), batch, cache)
