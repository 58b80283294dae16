"""The engine core: ``Engine(EngineConfig(...)).generate(prompts, SamplingParams(...))``.

``Engine`` lives in ``services.engine.engine``; this package imports nothing heavy, so that a
process that only needs the engine's config or message types (every Serve replica unpickles
the application config) does not import torch.
"""

from services.engine.config import EngineConfig
from services.engine.outputs import CompletionOutput, EngineCapacity, EngineStats, RequestOutput
from services.messages import FinishReason, SamplingParams

__all__ = [
    "CompletionOutput",
    "EngineCapacity",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "RequestOutput",
    "SamplingParams",
]
