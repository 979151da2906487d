"""Inference: latent KV cache, absorbed MLA decode, continuous batching, sampling, MTP speculation."""

from nanoseek.infer.cache import KVCache
from nanoseek.infer.engine import Completion, Engine, EngineError, SpecStats, StepOutput
from nanoseek.infer.runner import ModelRunner
from nanoseek.infer.sampling import SamplingError, SamplingParams
from nanoseek.infer.scheduler import Scheduler, Sequence

__all__ = [
    "Engine",
    "EngineError",
    "Completion",
    "StepOutput",
    "SpecStats",
    "SamplingParams",
    "SamplingError",
    "KVCache",
    "ModelRunner",
    "Scheduler",
    "Sequence",
]
