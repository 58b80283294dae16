"""The optimizer as a named Ray actor, apart from serving: it can run on any node of the cluster.

A threaded actor: ``run`` does the work while ``events`` (progress) and ``cancel``
answer from other threads. One run at a time; a second is refused while one is going.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import ray
import torch

from services.errors import InvalidParameterError
from services.optimizer.config import OptimizerConfig
from services.optimizer.pipeline import OptimizeRequest, OptimizeResult, optimize


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    fraction: float
    detail: str


class OptimizerActor:
    def __init__(self, config: OptimizerConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._events: list[ProgressEvent] = []
        self._cancel = threading.Event()
        self._running = False
        torch.set_num_threads(config.num_threads)

    def run(self, request: OptimizeRequest) -> OptimizeResult:
        with self._lock:
            if self._running:
                raise InvalidParameterError("optimize", request.model, "another optimize run is in progress")
            self._running = True
            self._events = []
            self._cancel.clear()
        try:
            return optimize(request, self._config, self._record, self._cancel.is_set)
        finally:
            with self._lock:
                self._running = False

    def events(self, since: int) -> list[ProgressEvent]:
        with self._lock:
            return self._events[since:]

    def cancel(self) -> bool:
        """Ask the current run to stop at its next check; True when one was running."""
        self._cancel.set()
        return self._running

    def _record(self, stage: str, fraction: float, detail: str) -> None:
        with self._lock:
            self._events.append(ProgressEvent(stage, fraction, detail))


def get_or_start_actor(config: OptimizerConfig) -> Any:
    """The named actor (a handle), started with the CPU/GPU needs in ``config`` if none runs yet."""
    remote_class = ray.remote(OptimizerActor)
    return remote_class.options(  # type: ignore[attr-defined]
        name=config.actor_name,
        namespace=config.actor_namespace,
        get_if_exists=True,
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
        max_concurrency=4,
    ).remote(config)
