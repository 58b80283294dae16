"""The engine core: ``Engine(EngineConfig(...)).generate(prompts, SamplingParams(...))``."""

from services.engine.config import EngineConfig
from services.engine.engine import Engine
from services.engine.outputs import CompletionOutput, EngineCapacity, EngineStats, RequestOutput
from services.messages import FinishReason, SamplingParams

__all__ = [
    "CompletionOutput",
    "Engine",
    "EngineCapacity",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "RequestOutput",
    "SamplingParams",
]
