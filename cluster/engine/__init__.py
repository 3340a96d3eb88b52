"""The inference engine (never imports ray): continuous batching over a hybrid KV + GDN-state cache.

Offline use: `from cluster.engine import LLM, SamplingParams`.
"""
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.config import EngineConfig
from cluster.engine.engine import Engine, RequestError
from cluster.engine.llm import LLM
from cluster.engine.output import CompletionOutput, RequestOutput
from cluster.engine.sampling_params import SamplingError, SamplingParams

__all__ = ["AsyncEngine", "CompletionOutput", "Engine", "EngineConfig", "LLM", "RequestError",
           "RequestOutput", "SamplingError", "SamplingParams"]
