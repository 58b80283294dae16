"""The builder: AppConfig -> Ray Serve application.

Plain classes become deployments here and nowhere else: the tokenizer, one
engine deployment per model, the detokenizer, and the ingress, which serves gRPC
itself (``grpc_ingress: replica``) or behind one of Ray Serve's gRPC servers.
``build_app`` is also the import path for ``serve deploy`` (``cluster/serve-config.yaml``),
with the AppConfig given as the app's args.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from services.config import AppConfig, ModelConfig
from services.detokenizer.service import DetokenizerService
from services.engine.autoscaling import engine_replica_options
from services.engine.replica import EngineReplica
from services.ingress.servicer import IngressService
from services.queue.registry import add_published_variants
from services.queue.served_variants import ServedVariantsSource
from services.tokenizer.service import TokenizerService
from services.variant_watcher import VariantWatcher

# Ray Serve's gRPC servers (grpc_ingress other than 'replica') register the services with these.
GRPC_SERVICER_FUNCTIONS = [
    "services.ingress.registration.add_generation_servicer",
    "services.ingress.registration.add_health_servicer",
]
ENGINE_HEALTH_CHECK_PERIOD_S = 5.0
ENGINE_HEALTH_CHECK_TIMEOUT_S = 10.0
# Beyond the drain: stopping the loop and handing the rest back to the queue.
ENGINE_STOP_MARGIN_S = 15.0
# Serve calls a stopping engine's __del__ (its own drain) once no Serve call is in flight; those
# are control calls of milliseconds, so look often rather than Serve's default of every 2 s.
ENGINE_CONTROL_CALLS_POLL_S = 0.1
# Stopping a detokenizer replica only ends its loop and hands its requests to another one.
DETOKENIZER_STOP_S = 15.0
# A long-lived stream occupies one slot of the ingress for its whole life.
STREAMS_PER_REPLICA = 1000


def resolve_model_path(model: ModelConfig) -> str:
    """The checkpoint directory of a model; the demo model is built (once, then cached) if none is set."""
    if model.path:
        return model.path
    from services.demo import build_demo_model

    return str(build_demo_model())


def build_app(config: AppConfig | dict[str, Any]) -> Application:
    app_config = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
    app_config = app_config.with_environment()  # e.g. the Redis password, from a Secret
    if not app_config.redis_url:
        raise ValueError("redis_url: the application needs a Redis URL (tokenline serve starts one)")
    app_config = add_published_variants(app_config)  # `variants: [demo@int8]` in a Serve config
    paths = {model.name: resolve_model_path(model) for model in app_config.models}
    no_cpu = {"num_cpus": 0}
    live = app_config.live_variants
    served_variants = (
        ServedVariantsSource(app_config.redis_url, app_config.queue.key_prefix, live.cache_ttl_s)
        if live.enabled
        else None
    )
    # Stopping stream holders wait for their streams (checked twice a second) before Serve stops them.
    stream_holder = {
        "ray_actor_options": no_cpu,
        "max_ongoing_requests": STREAMS_PER_REPLICA,
        "graceful_shutdown_timeout_s": app_config.stream_drain_s,
        "graceful_shutdown_wait_loop_s": 0.5,
    }

    tokenizer = _deployment(
        TokenizerService, name="tokenizer", ray_actor_options=no_cpu, max_ongoing_requests=STREAMS_PER_REPLICA
    ).bind(
        paths,
        app_config.default_model_name,
        app_config.redis_url,
        app_config.queue,
        {m.name: m.engine.max_model_len for m in app_config.models},
        served_variants,
    )
    # The detokenizer is a stage on the queue: nothing calls it per request, it only needs to run.
    detokenizer = _deployment(
        DetokenizerService,
        name="detokenizer",
        num_replicas=app_config.detokenizer_replicas,
        ray_actor_options=no_cpu,
        max_ongoing_requests=8,
        health_check_period_s=ENGINE_HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=ENGINE_HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=DETOKENIZER_STOP_S,
    ).bind(paths, app_config.redis_url, app_config.queue, served_variants)
    engines = {m.name: engine_deployment(app_config, m, paths[m.name]) for m in app_config.models}
    # Variants published while the app runs get engine applications of their own (see VariantWatcher).
    watcher = (
        _deployment(VariantWatcher, name="variant-watcher", ray_actor_options=no_cpu).bind(app_config)
        if live.enabled
        else None
    )
    return _deployment(IngressService, name="ingress", **stream_holder).bind(
        app_config.ingress_config(),
        app_config.redis_url,
        tokenizer,
        detokenizer,
        engines,
        watcher,
        app_config.grpc_server_settings(),
    )


def engine_deployment(app_config: AppConfig, model: ModelConfig, path: str) -> Application:
    """The engine replicas of one model, bound: they pull its queue in Redis."""
    return _deployment(
        EngineReplica,
        name=f"engine-{model.name}",
        **engine_replica_options(model),  # fixed engine_replicas, or scaled on the queue
        max_replicas_per_node=model.engine_max_replicas_per_node,
        ray_actor_options={"num_cpus": model.engine_num_cpus, "num_gpus": model.engine_num_gpus},
        health_check_period_s=ENGINE_HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=ENGINE_HEALTH_CHECK_TIMEOUT_S,
        # Work reaches engines through Redis, not through Serve; only control calls come this way.
        max_ongoing_requests=8,
        graceful_shutdown_timeout_s=model.engine_drain_s + ENGINE_STOP_MARGIN_S,
        graceful_shutdown_wait_loop_s=ENGINE_CONTROL_CALLS_POLL_S,
    ).bind(
        model.name,
        model.engine.engine_config(path),
        app_config.redis_url,
        app_config.queue,
        model.engine.num_threads,
        model.engine_stall_after_s,
        model.engine_drain_s,
        model.engine.nice,
    )


def _deployment(cls: type, **options: Any) -> Deployment:
    return serve.deployment(**options)(cls)
