"""Engine settings: one flat dataclass, checked once when the engine is built."""
from __future__ import annotations

from dataclasses import dataclass

CPU_DEFAULT_KV_MEMORY = 1 << 30      # bytes of hybrid cache on CPU unless told otherwise


@dataclass
class EngineConfig:
    max_num_seqs: int = 64                  # running sequences (= GDN state slots)
    max_num_batched_tokens: int = 8192      # new tokens per step, prefill chunks and decodes
    block_size: int = 16                    # tokens per KV block
    kv_cache_memory: int | None = None      # bytes; None = 1 GiB on CPU, see gpu_memory_utilization
    gpu_memory_utilization: float = 0.9     # on GPU: this fraction of free memory after loading
    max_model_len: int | None = None        # None = the model's max_position_embeddings
    seed: int = 0                           # seeds unseeded requests, in arrival order

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive bytes, got {self.kv_cache_memory}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
