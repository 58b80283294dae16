"""The benchmark's side of the live stack: its config, an API key, readiness, step counts.

``stack_config`` is one engine replica of the benchmark's model on a free gRPC port, with the
same ``EngineSettings`` the in-process engine gets; the rest talk to the running stack.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loadtest.pipeline_plan import MODEL_NAME
from services.ports import free_loopback_port

if TYPE_CHECKING:
    from services.config import AppConfig, EngineSettings


def stack_config(model_path: str, settings: EngineSettings, grpc_ingress: str | None = None) -> AppConfig:
    """One engine replica; ``grpc_ingress`` None keeps AppConfig's default."""
    from services.config import AppConfig, ModelConfig

    model = ModelConfig(name=MODEL_NAME, path=model_path, engine_replicas=1, engine=settings)
    ingress = {} if grpc_ingress is None else {"grpc_ingress": grpc_ingress}
    return AppConfig.model_validate({"models": (model,), "grpc_port": free_loopback_port(), **ingress})


def issue_api_key(config: AppConfig) -> str:
    """A key for an unlimited tenant "bench": the stack runs with authentication on, as served."""
    from services.ingress.api_keys import ApiKeyStore

    with ApiKeyStore(config.redis_url, config.queue.key_prefix) as store:
        key, _ = store.create("bench")
    return key


def wait_ready(target: str, api_key: str, timeout_s: float = 180.0) -> None:
    import grpc

    from services.proto.tokenline.v1 import generation_pb2 as pb
    from services.proto.tokenline.v1 import generation_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout_s
    metadata = (("authorization", f"Bearer {api_key}"),)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while True:
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def engine_steps(app_name: str) -> int | None:
    """Steps the (single) engine replica has run, from its Serve ``status`` call."""
    from ray import serve

    try:
        handle = serve.get_deployment_handle(f"engine-{MODEL_NAME}", app_name=app_name)
        return int(handle.status.remote().result(timeout_s=10).steps)
    except Exception:  # diagnostics only: a failure here must not void the run
        return None
