"""The engine autoscaling policy and its wiring, without a running stack: the policy on Ray
Serve's own context and sample types, the replica's report against a real Redis, the options
the builder gives the engine deployment, and the policy loaded the way Serve's controller loads
it (by value, in a process that cannot import tokenline). The stack test is
tests/test_autoscaling_e2e.py."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from services.config import AppConfig, EngineAutoscaling, ModelConfig
from services.engine.autoscaling import (
    HELD_METRIC,
    UNFINISHED_METRIC,
    QueueLoadPolicy,
    engine_replica_options,
    queue_load_stats,
)
from services.queue import EngineQueue, QueueConfig
from tests.test_cluster_configs import built_deployments
from tests.test_queue import MODEL, enqueue_all, request

DEPLOYMENT = DeploymentID(name="engine-demo", app_name="tokenline")
R1, R2 = (ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in (1, 2))


def context(
    unfinished: dict[ReplicaID, list[tuple[float, float]]],
    held: dict[ReplicaID, list[tuple[float, float]]] | None = None,
    *,
    current: int = 1,
    bounds: tuple[int, int] = (1, 4),
) -> AutoscalingContext:
    """Serve's context as its controller builds it, with (timestamp, value) samples per replica."""

    def series(samples: dict[ReplicaID, list[tuple[float, float]]]) -> dict[ReplicaID, Any]:
        return {replica: [TimeStampedValue(t, v) for t, v in points] for replica, points in samples.items()}

    raw = {UNFINISHED_METRIC: series(unfinished), HELD_METRIC: series(held or {})}
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=list(unfinished),
        total_num_requests=0.0,  # Serve's own count: control calls only, never work
        total_queued_requests=0.0,
        aggregated_metrics=None,
        raw_metrics={name: per_replica for name, per_replica in raw.items() if per_replica},
        capacity_adjusted_min_replicas=bounds[0],
        capacity_adjusted_max_replicas=bounds[1],
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=10.0,
        config=AutoscalingConfig(min_replicas=bounds[0], max_replicas=bounds[1]),
    )


def test_replicas_wanted_are_unfinished_requests_over_the_target_rounded_up() -> None:
    policy = QueueLoadPolicy(target_per_replica=4)
    assert policy(context({R1: [(1.0, 4)]}))[0] == 1
    assert policy(context({R1: [(1.0, 5)]}))[0] == 2
    assert policy(context({R1: [(1.0, 12)]}))[0] == 3


def test_the_newest_queue_figure_counts_not_the_largest_nor_the_mean() -> None:
    """Every replica reports the same model-wide count: the freshest sample is the truth, an
    older peak (a burst already served) must not hold replicas up."""
    policy = QueueLoadPolicy(target_per_replica=4)
    replicas, state = policy(context({R1: [(1.0, 16), (2.0, 16)], R2: [(3.0, 3)]}, current=2))
    assert (replicas, state["queue_load"]) == (1, 3)


def test_what_replicas_hold_is_a_floor_for_an_older_queue_figure() -> None:
    policy = QueueLoadPolicy(target_per_replica=4)
    held = {R1: [(5.0, 4)], R2: [(5.0, 3)]}
    replicas, state = policy(context({R1: [(1.0, 2)], R2: [(1.0, 2)]}, held, current=2))
    assert (replicas, state["queue_load"]) == (2, 7)


def test_wanted_replicas_stay_within_the_bounds() -> None:
    policy = QueueLoadPolicy(target_per_replica=4)
    assert policy(context({R1: [(1.0, 400)]}, bounds=(1, 3)))[0] == 3
    assert policy(context({R1: [(1.0, 0)]}, current=2, bounds=(2, 3)))[0] == 2


def test_without_reports_the_policy_keeps_the_current_target() -> None:
    """Replicas that have not reported yet (all starting) must not read as an idle queue."""
    assert QueueLoadPolicy(target_per_replica=4)(context({}, current=3))[0] == 3


def test_a_target_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="target_per_replica"):
        QueueLoadPolicy(target_per_replica=0)
    with pytest.raises(ValidationError, match="target_per_replica"):
        EngineAutoscaling(target_per_replica=0)


def test_max_below_min_replicas_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="max_replicas"):
        EngineAutoscaling(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="min_replicas"):
        EngineAutoscaling(min_replicas=0)


def test_replica_report_counts_waiting_and_held_requests_of_every_priority(redis_url: str) -> None:
    config = QueueConfig()
    urgent = replace(request("urgent"), priority=-3)
    enqueue_all(redis_url, config, request("a"), request("b"), urgent)
    with EngineQueue(redis_url, config) as engine:
        assert queue_load_stats(engine, MODEL, held=0) == {UNFINISHED_METRIC: 3.0, HELD_METRIC: 0.0}
        (claimed,) = engine.claim(MODEL, "engine-a", max_count=1, block_ms=0)
        # Claimed, it is held by the engine and still unfinished: the load does not change.
        assert queue_load_stats(engine, MODEL, held=1) == {UNFINISHED_METRIC: 3.0, HELD_METRIC: 1.0}
        engine.finish(MODEL, claimed.entry_id, claimed.request.request_id)
        assert queue_load_stats(engine, MODEL, held=0)[UNFINISHED_METRIC] == 2.0


def test_replica_report_without_redis_carries_only_what_it_holds() -> None:
    with EngineQueue("redis://127.0.0.1:1/0", QueueConfig()) as engine:
        assert queue_load_stats(engine, MODEL, held=2) == {HELD_METRIC: 2.0}


def test_engine_deployment_autoscales_only_when_enabled() -> None:
    fixed = ModelConfig(engine_replicas=3)
    assert engine_replica_options(fixed) == {"num_replicas": 3}

    scaling = EngineAutoscaling(enabled=True, min_replicas=2, max_replicas=5, target_per_replica=8)
    scaled = ModelConfig(engine_replicas=3, engine_autoscaling=scaling)
    assert scaled.most_engine_replicas == 5 and fixed.most_engine_replicas == 3
    args = AppConfig(models=(scaled,), redis_url="redis://r:6379/0").model_dump(mode="json")
    engine = built_deployments(args, "services.app:build_app")["engine-demo"]
    autoscaling = engine._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 5)
    assert (autoscaling.upscale_delay_s, autoscaling.downscale_delay_s) == (10.0, 120.0)
    assert autoscaling.policy.policy_function == "services.engine.autoscaling.QueueLoadPolicy"
    assert autoscaling.policy.policy_kwargs == {"target_per_replica": 8.0}


POLICY_IN_A_BARE_PROCESS = """
import sys
from ray import cloudpickle
from ray.serve._private.common import TimeStampedValue
policy = cloudpickle.loads(sys.stdin.buffer.read())(target_per_replica=4)
class Context:
    raw_metrics = {"%s": {"r1": [TimeStampedValue(1.0, 9)]}}
    target_num_replicas, capacity_adjusted_min_replicas, capacity_adjusted_max_replicas = 1, 1, 8
print(policy(Context())[0], any(name.startswith("services") for name in sys.modules))
"""


def test_policy_loads_and_decides_without_importing_tokenline(tmp_path: Any) -> None:
    """Serve ships the policy to its controller by value; on a cluster whose controller runs
    without the package on its path, it must still load and decide."""
    options = engine_replica_options(ModelConfig(engine_autoscaling=EngineAutoscaling(enabled=True)))
    pickled = options["autoscaling_config"].policy.get_serialized_policy_def()
    result = subprocess.run(
        [sys.executable, "-I", "-c", POLICY_IN_A_BARE_PROCESS % UNFINISHED_METRIC],
        input=pickled,
        capture_output=True,
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    assert result.stdout.decode().split() == ["3", "False"]
