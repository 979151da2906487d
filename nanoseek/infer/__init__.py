"""Inference: latent KV cache, absorbed MLA decode, continuous batching, sampling, MTP
speculation; V4's window + compressed-entry cache."""

from nanoseek.infer.cache import KVCache
from nanoseek.infer.cache_v4 import V4Cache
from nanoseek.infer.engine import Completion, Engine, EngineError, SpecStats, StepOutput
from nanoseek.infer.runner import ModelRunner
from nanoseek.infer.runner_v4 import V4Runner
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
    "V4Cache",
    "V4Runner",
    "Scheduler",
    "Sequence",
]
