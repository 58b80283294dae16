"""Settings of the whole application: one place for every default.

``AppConfig`` loads from YAML (``cluster/serve-config.yaml``) for ``serve deploy``
and from CLI flags for ``tokenline serve``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.edge_config import GrpcIngress, GrpcServerSettings, TlsConfig
from services.engine.config import Backend, EngineConfig
from services.errors import InvalidParameterError
from services.queue.config import QueueConfig
from services.queue.served_variants import LiveVariantsConfig


def _engine_default(name: str) -> Any:
    """The default of an engine knob: EngineConfig holds the one value."""
    return EngineConfig.__dataclass_fields__[name].default


# EngineSettings fields that set up the replica's threads rather than the engine.
REPLICA_ONLY_SETTINGS = frozenset({"num_threads", "nice"})


class EngineSettings(BaseModel):
    """Engine knobs of one model; ``EngineConfig`` minus the checkpoint path. Every default
    comes from ``EngineConfig`` (services/engine/config.py), so there is one per knob."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Backend = Field(
        default=_engine_default("backend"),
        description="'native' (tokenline's engine) or 'vllm' (vLLM's engine; `make install-vllm`).",
    )
    device: str = Field(
        default=_engine_default("device"),
        description="'cpu' or 'cuda[:N]'; engine replicas reserve a GPU for cuda.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default=_engine_default("dtype"), description="Weights and KV dtype."
    )
    block_size: int = Field(
        default=_engine_default("block_size"),
        description="Tokens per KV-cache block (power of two; vLLM on CPU: a multiple of 32).",
    )
    kv_cache_memory_gib: float = Field(
        default=_engine_default("kv_cache_memory_gib"),
        description="Memory for the paged KV cache per replica.",
    )
    max_num_seqs: int = Field(
        default=_engine_default("max_num_seqs"), description="Most sequences one replica runs at once."
    )
    max_num_batched_tokens: int = Field(
        default=_engine_default("max_num_batched_tokens"),
        description="Per-step token budget (chunked prefill).",
    )
    max_model_len: int | None = Field(
        default=_engine_default("max_model_len"),
        description="Context limit (prompt + output); None: the model's own. The ingress refuses longer "
        "prompts with INVALID_ARGUMENT.",
    )
    enable_prefix_caching: bool = Field(
        default=_engine_default("enable_prefix_caching"),
        description="Reuse KV blocks of shared prompt prefixes.",
    )
    num_threads: int = Field(default=1, ge=1, description="torch intra-op threads per engine replica.")
    nice: int = Field(
        default=-10,
        ge=-20,
        le=19,
        description="Nice value of the replica's engine threads (the step loop and its Redis writer): "
        "below 0 they run ahead of the data plane on a shared CPU. Needs CAP_SYS_NICE; without it "
        "they keep their priority and the replica logs a warning. 0 leaves it alone.",
    )

    def engine_config(self, model_path: str) -> EngineConfig:
        options = self.model_dump(exclude=set(REPLICA_ONLY_SETTINGS))
        return EngineConfig(model=model_path, **options)


class VariantInfo(BaseModel):
    """What the registry says about a served variant: its source, recipe, gate figures, checksum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    variant_of: str = Field(description="The source model's name.")
    recipe: str = Field(description="Quantization recipe.")
    gate: dict[str, float] = Field(default_factory=dict, description="Gate figures at publishing.")
    checksum: str = Field(description="Artifact checksum the registry holds; verified before serving.")


class EngineAutoscaling(BaseModel):
    """Engine replicas that follow the work waiting for them. Engines pull from Redis, so Ray
    Serve's own signal (requests routed through it) says nothing about their load: each replica
    reports the model's unfinished requests (waiting in any priority band, or running), and
    ``services.engine.autoscaling`` asks for ceil(unfinished / target_per_replica) replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=False, description="Scale engine replicas on the queue; off: engine_replicas, fixed."
    )
    min_replicas: int = Field(
        default=1,
        ge=1,
        description="Fewest engine replicas; at least one, because running replicas report the queue.",
    )
    max_replicas: int = Field(default=4, ge=1, description="Most engine replicas.")
    target_per_replica: float = Field(
        default=32.0,
        gt=0.0,
        description="Unfinished requests (waiting + running) per replica to aim for; about "
        "engine.max_num_seqs means: scale up once the queue holds more than the replicas can run.",
    )
    upscale_delay_s: float = Field(
        default=10.0, ge=0.0, description="How long more replicas must be wanted before one is added."
    )
    downscale_delay_s: float = Field(
        default=120.0, ge=0.0, description="How long fewer replicas must be wanted before one is stopped."
    )
    metrics_interval_s: float = Field(
        default=1.0,
        gt=0.0,
        description="How often each replica samples the queue and reports it to Serve's controller; "
        "a burst is seen within about two of these.",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> EngineAutoscaling:
        if self.max_replicas < self.min_replicas:
            raise InvalidParameterError(
                "max_replicas", self.max_replicas, f"must be >= min_replicas ({self.min_replicas})"
            )
        return self


class ModelConfig(BaseModel):
    """One served model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        default="demo",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?$",
        description="The name clients send in GenerateRequest.model; MODEL@RECIPE for a quantized variant.",
    )
    path: str | None = Field(default=None, description="Checkpoint directory; None: the built-in demo model.")
    engine_replicas: int = Field(
        default=1, ge=1, description="Engine replicas pulling this model's queue (when not autoscaled)."
    )
    engine_autoscaling: EngineAutoscaling = Field(default_factory=EngineAutoscaling)
    engine_num_cpus: float = Field(
        default=0.0, ge=0.0, description="CPUs each engine replica reserves in Ray."
    )
    engine_num_gpus: float = Field(
        default=0.0, ge=0.0, description="GPUs each engine replica reserves in Ray."
    )
    engine_max_replicas_per_node: int | None = Field(
        default=None,
        ge=1,
        description="Most engine replicas of this model on one Ray node (1: one per node, so that "
        "losing a node loses one replica); None: no limit.",
    )
    default_max_tokens: int = Field(
        default=256, ge=1, description="max_tokens when a request leaves it unset."
    )
    engine_stall_after_s: float = Field(
        default=30.0, gt=0.0, description="An engine loop without progress this long fails its health check."
    )
    engine_drain_s: float = Field(
        default=10.0,
        ge=0.0,
        description="On a graceful stop (rolling update, scale-down) how long an engine replica keeps "
        "running the requests it holds before it hands the rest back to the queue for another replica.",
    )
    engine: EngineSettings = Field(default_factory=EngineSettings)
    variant: VariantInfo | None = Field(
        default=None, description="Set for a published quantized variant (filled from the registry)."
    )

    @property
    def most_engine_replicas(self) -> int:
        """Engine replicas this model may run at once: what the cluster must have room for."""
        scaling = self.engine_autoscaling
        return scaling.max_replicas if scaling.enabled else self.engine_replicas


class AuthConfig(BaseModel):
    """Access control at the gRPC edge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(default=True, description="Require 'authorization: Bearer <key>' on every RPC.")
    cache_ttl_s: float = Field(
        default=2.0,
        ge=0.0,
        description="How long an ingress trusts a key lookup; a revoked key stops working within this time.",
    )


class IngressConfig(BaseModel):
    """The part of the application config the ingress acts on: model names and defaults, access
    control and the queue's key layout. Engine and gRPC settings are not its business."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_max_tokens: dict[str, int] = Field(
        min_length=1, description="Served model names, each with its max_tokens for requests that set none."
    )
    default_model: str = Field(min_length=1, description="Model used when a request names none.")
    queue: QueueConfig = Field(default_factory=QueueConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    variants: dict[str, VariantInfo] = Field(
        default_factory=dict, description="Served quantized variants by name, for ListModels."
    )
    live_variants: LiveVariantsConfig = Field(default_factory=LiveVariantsConfig)
    tokenizer_calls_in_flight: int = Field(
        ge=1, description="AppConfig.tokenizer_calls_in_flight (the default is kept there)."
    )

    def variant_fields(self, name: str) -> dict[str, object]:
        """ModelInfo fields of a served variant (none for a source model)."""
        info = self.variants.get(name)
        if info is None:
            return {}
        return {"variant_of": info.variant_of, "recipe": info.recipe, "gate": dict(info.gate)}

    def model_name(self, requested: str) -> str | None:
        """The served model a request names ('' = the default), or None when none matches."""
        wanted = requested or self.default_model
        return wanted if wanted in self.default_max_tokens else None


class AppConfig(BaseModel):
    """The serving application: models, Redis, gRPC edge and queue policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: tuple[ModelConfig, ...] = Field(default=(ModelConfig(),), min_length=1)
    default_model: str = Field(
        default="", description="Model used when a request names none; '' = the first."
    )
    redis_url: str = Field(
        default="",
        description="Redis URL; '' makes `tokenline serve` start a private one. `${NAME}` is replaced "
        "with the environment variable NAME where the application is built (a password from a "
        "Kubernetes Secret, kept out of the Serve config).",
    )
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="The gRPC port clients dial.")
    grpc_ingress: GrpcIngress = Field(
        default="replica",
        description="How calls reach the ingress replicas. 'replica': each ingress replica runs its own "
        "gRPC server on grpc_port (shared by the replicas of a node through SO_REUSEPORT), with "
        "grpc.health.v1, reflection and TLS; no proxy, no HAProxy. 'haproxy': Ray Serve's direct "
        "ingress (each ingress replica serves gRPC itself) behind HAProxy, which listens on grpc_port "
        "on every node: no Python hop, a stable port across replica restarts (needs the haproxy "
        "binary). 'direct': the ingress replicas' own ports, from grpc_port up; a restarted "
        "replica may come back on another port. 'proxy': Ray Serve's Python gRPC proxy on "
        "grpc_port, one Ray streaming hop per message.",
    )
    tls: TlsConfig | None = Field(
        default=None, description="TLS on grpc_port (grpc_ingress 'replica' only); None = plaintext."
    )
    grpc_max_message_bytes: int = Field(
        default=4 << 20, ge=1024, description="Largest gRPC message the proxy accepts or sends."
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the Prometheus endpoint (Ray's metrics agent, /metrics) of a Ray that "
        "`tokenline serve` starts itself; None: grpc_port + 105, past the ports the gRPC edge takes, "
        "so that stacks with different grpc_port do not collide. A Ray cluster started elsewhere "
        "keeps its own (`ray start --metrics-export-port`).",
    )
    app_name: str = Field(default="tokenline", description="Ray Serve application name.")
    detokenizer_replicas: int = Field(
        default=1,
        ge=1,
        description="Detokenizer replicas; each renders the text of the requests it owns, and a dead "
        "one's requests move to the others after the queue lease.",
    )
    stream_drain_s: float = Field(
        default=60.0,
        gt=0.0,
        description="On a graceful stop (rolling update) how long an ingress replica "
        "keeps serving its open streams before Serve stops it; a stream still open then breaks and "
        "its client continues it with Resume.",
    )
    tokenizer_calls_in_flight: int = Field(
        default=2,
        ge=1,
        description="Most calls one ingress replica has out to the tokenizer replicas at once. A "
        "prompt that arrives while that many are out waits and goes with every other waiting prompt "
        "in the next call: a call's fixed cost (Redis round trips on both sides, against a fraction "
        "of a millisecond to encode a prompt) is then shared under load, while a lone prompt still "
        "leaves at once.",
    )
    queue: QueueConfig = Field(default_factory=QueueConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    variants: tuple[str, ...] = Field(
        default=(),
        description="Published variants (MODEL@RECIPE) to serve next to their source models; "
        "looked up in the registry in Redis when the stack starts.",
    )
    live_variants: LiveVariantsConfig = Field(default_factory=LiveVariantsConfig)

    @model_validator(mode="after")
    def _check_models(self) -> AppConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: duplicate names in {names}")
        if self.default_model and self.default_model not in names:
            raise ValueError(f"default_model: {self.default_model!r} is not one of {names}")
        if self.tls is not None and self.grpc_ingress != "replica":
            raise ValueError(
                f"tls: needs grpc_ingress 'replica' (Ray Serve's gRPC servers have no TLS), "
                f"got {self.grpc_ingress!r}"
            )
        if self.metrics_port is None and self.grpc_port + METRICS_PORT_OFFSET > 65535:
            port = self.grpc_port + METRICS_PORT_OFFSET
            raise ValueError(f"metrics_port: grpc_port + {METRICS_PORT_OFFSET} = {port} is no port; set one")
        return self

    def grpc_server_settings(self) -> GrpcServerSettings | None:
        """The ingress replicas' own server, None when Ray Serve serves gRPC."""
        if self.grpc_ingress != "replica":
            return None
        return GrpcServerSettings(
            port=self.grpc_port,
            max_message_bytes=self.grpc_max_message_bytes,
            drain_s=self.stream_drain_s,
            tls=self.tls,
        )

    def with_environment(self) -> AppConfig:
        """This config with the ``${NAME}`` references of ``redis_url`` filled in."""
        return self.model_copy(update={"redis_url": expand_environment("redis_url", self.redis_url)})

    @property
    def metrics_export_port(self) -> int:
        return self.metrics_port if self.metrics_port is not None else self.grpc_port + METRICS_PORT_OFFSET

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.models[0].name

    def model(self, name: str) -> ModelConfig | None:
        wanted = name or self.default_model_name
        return next((m for m in self.models if m.name == wanted), None)

    def ingress_config(self) -> IngressConfig:
        return IngressConfig(
            default_max_tokens={m.name: m.default_max_tokens for m in self.models},
            default_model=self.default_model_name,
            queue=self.queue,
            auth=self.auth,
            variants={m.name: m.variant for m in self.models if m.variant is not None},
            live_variants=self.live_variants,
            tokenizer_calls_in_flight=self.tokenizer_calls_in_flight,
        )

    @classmethod
    def from_yaml(cls, path: Path) -> AppConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


# The gRPC edge may take grpc_port .. grpc_port + 104 (ingress replicas, HAProxy's metrics and
# stats, Serve's HTTP port: services/server.py); the metrics port comes right after.
METRICS_PORT_OFFSET = 105

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_environment(field: str, text: str) -> str:
    """``text`` with every ``${NAME}`` replaced by the environment variable NAME; a variable
    that is not set is an error naming the field and the variable."""

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise InvalidParameterError(field, name, "names an environment variable that is not set")
        return os.environ[name]

    return _ENV_REFERENCE.sub(value_of, text)


def local_api_key_path() -> Path:
    """Where `tokenline serve` leaves the key it made for a private Redis, and where
    `tokenline generate` looks when no --api-key is given (readable by the user only)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tokenline" / "local-api-key"
