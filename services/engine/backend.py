"""The engine interface an engine replica drives, and the factory that picks a backend.

Two backends satisfy it: tokenline's own engine (``native``, services/engine/engine.py)
and vLLM's engine (``vllm``, services/engine/vllm_backend.py). The replica only ever
calls what ``EngineBackend`` lists, so either one can serve a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.engine.config import EngineConfig
from services.engine.outputs import EngineCapacity, EngineStats, RequestOutput
from services.messages import SamplingParams


class EngineBackend(Protocol):
    """Continuous batching over a paged KV cache, driven one step at a time."""

    stats: EngineStats
    max_model_len: int  # the effective context limit: min(model's, configured)

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        output_prefix: Sequence[int] = (),
    ) -> None:
        """Queue a request; ``output_prefix`` resumes one whose first outputs were produced
        elsewhere (output indices continue at ``len(output_prefix)``). Raises
        InvalidParameterError naming the field for a request it cannot run."""
        ...

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; the new tokens of every request that produced some."""
        ...

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is not in the engine."""
        ...

    def has_unfinished(self) -> bool: ...

    def capacity(self) -> EngineCapacity: ...

    def reserved_blocks(self) -> int:
        """KV blocks admitted requests still need for tokens they already hold."""
        ...


def make_engine(config: EngineConfig) -> EngineBackend:
    """The engine ``config.backend`` names. vLLM is imported only when it is asked for."""
    if config.backend == "vllm":
        from services.engine.vllm_backend import VllmEngine

        return VllmEngine(config)
    from services.engine.engine import Engine

    return Engine(config)
