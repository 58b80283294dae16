"""Engine replicas scale on the work waiting for them, not on Ray Serve's request count.

Work reaches engine replicas through Redis (they pull from the model's priority bands), so the
requests Serve routes to them — control calls only — say nothing about their load. Instead
each engine replica reports every ``metrics_interval_s`` (Serve calls its
``record_autoscaling_stats``, see ``queue_load_stats``):

- ``UNFINISHED_METRIC``: the model's accepted, unfinished requests — waiting in any priority
  band, held by an engine, or handed back by a stopping one. The same model-wide figure from
  every replica.
- ``HELD_METRIC``: the requests that replica holds (running or about to run).

``QueueLoadPolicy`` runs in Serve's controller on each control-loop tick and asks for
ceil(load / target_per_replica) replicas. Serve then applies the up/down delays and the bounds.

The policy travels to the controller by value (cloudpickle), so its methods use nothing of
tokenline beyond this module's constants: the controller never imports the package.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from services.config import ModelConfig
from services.errors import QueueUnavailableError

if TYPE_CHECKING:
    from services.queue import EngineQueue

UNFINISHED_METRIC = "tokenline_unfinished_requests"
HELD_METRIC = "tokenline_held_requests"
# Serve samples a replica every look_back * 0.2 s (RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR)
# and at most every metrics_interval_s: five intervals of look-back make the two equal.
LOOK_BACK_INTERVALS = 5


class _Sample(Protocol):
    timestamp: float
    value: float


def queue_load_stats(queue: EngineQueue, model: str, held: int) -> dict[str, float]:
    """An engine replica's report to the autoscaler. Without Redis it reports only what it
    holds; the policy keeps the queue figure it had (the loop logs the outage)."""
    stats = {HELD_METRIC: float(held)}
    with contextlib.suppress(QueueUnavailableError):
        stats[UNFINISHED_METRIC] = float(queue.unfinished(model))
    return stats


class QueueLoadPolicy:
    """Ray Serve class-based autoscaling policy (one instance per deployment, in the controller)."""

    def __init__(self, target_per_replica: float) -> None:
        if not target_per_replica > 0:  # a plain ValueError: tokenline's errors are not in the controller
            raise ValueError(f"target_per_replica={target_per_replica!r}: must be > 0")
        self._target = target_per_replica

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """Replicas wanted for the newest reports in ``ctx`` (an ``AutoscalingContext``)."""
        reported: Mapping[str, Mapping[Any, list[_Sample]]] = ctx.raw_metrics or {}
        queue_samples = [s for series in reported.get(UNFINISHED_METRIC, {}).values() for s in series]
        if not queue_samples:  # nothing reported yet (replicas starting): stay where Serve is
            return int(ctx.target_num_replicas), {}
        # The model-wide figure as last seen by any replica; what the replicas say they hold is
        # a floor for it when their reports are fresher than that figure.
        unfinished = max(queue_samples, key=lambda sample: sample.timestamp).value
        held = sum(_newest(series) for series in reported.get(HELD_METRIC, {}).values())
        load = max(unfinished, held)
        wanted = math.ceil(load / self._target)
        lowest, highest = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return min(max(wanted, lowest), highest), {"queue_load": load}


def _newest(series: Iterable[_Sample]) -> float:
    newest = max(series, key=lambda sample: sample.timestamp, default=None)
    return 0.0 if newest is None else newest.value


def engine_replica_options(model: ModelConfig) -> dict[str, Any]:
    """Serve deployment options that set an engine deployment's replica count: fixed
    ``engine_replicas``, or an autoscaling config that runs ``QueueLoadPolicy``."""
    scaling = model.engine_autoscaling
    if not scaling.enabled:
        return {"num_replicas": model.engine_replicas}
    with warnings.catch_warnings():
        # Ray 2.60 marks metrics_interval_s deprecated in favour of an environment variable
        # that nothing reads yet; it is still what sets a replica's report interval.
        warnings.simplefilter("ignore", DeprecationWarning)
        config = AutoscalingConfig(
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            upscale_delay_s=scaling.upscale_delay_s,
            downscale_delay_s=scaling.downscale_delay_s,
            metrics_interval_s=scaling.metrics_interval_s,
            look_back_period_s=LOOK_BACK_INTERVALS * scaling.metrics_interval_s,
            policy=AutoscalingPolicy(  # type: ignore[no-untyped-call]
                policy_function=QueueLoadPolicy,
                policy_kwargs={"target_per_replica": scaling.target_per_replica},
            ),
        )
    return {"autoscaling_config": config}
