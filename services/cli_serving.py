"""`tokenline serve` and `tokenline generate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.config import AppConfig, ModelConfig, local_api_key_path
from services.edge_config import TlsConfig
from services.engine.config import BACKENDS
from services.engine.vllm_backend import vllm_block_size


def add_serving_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve_cmd = commands.add_parser(
        "serve", help="run the serving stack (local Ray + private Redis by default)"
    )
    serve_cmd.add_argument(
        "--config", type=Path, default=None, help="AppConfig YAML (flags below override it)"
    )
    serve_cmd.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    serve_cmd.add_argument(
        "--model-name", default=None, help="name clients use (default: 'demo' or dir name)"
    )
    serve_cmd.add_argument(
        "--redis-url",
        default=None,
        help="existing Redis: redis:// or rediss:// (TLS; ?ssl_ca_certs=CA), ${NAME} filled in from the "
        "environment (default: start a private one)",
    )
    serve_cmd.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start one)")
    serve_cmd.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051)")
    serve_cmd.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus port of a Ray started here (default: gRPC port + 105)",
    )
    serve_cmd.add_argument("--engine-replicas", type=int, default=None, help="engine replicas per model")
    serve_cmd.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="engine backend of the first model (default: the config's, else native). vllm needs "
        "`make install-vllm`; on CPU it needs block_size a multiple of 32, so a smaller block size "
        "in the config is raised to 32",
    )
    serve_cmd.add_argument("--no-auth", action="store_true", help="accept RPCs without an API key")
    serve_cmd.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="MODEL@RECIPE",
        help="published quantized variants to serve next to their source (needs --redis-url)",
    )
    serve_cmd.add_argument("--tls-cert", default=None, help="serve gRPC over TLS with this certificate (PEM)")
    serve_cmd.add_argument("--tls-key", default=None, help="private key of --tls-cert (PEM)")
    serve_cmd.set_defaults(handler=_serve)

    gen = commands.add_parser("generate", help="send one prompt over gRPC and print the answer")
    gen.add_argument("prompt")
    gen.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC endpoint")
    gen.add_argument("--stream", action="store_true", help="print text as it arrives")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--model", default="", help="model name (default: the server's default)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user chat message")
    gen.add_argument(
        "--api-key", default=None, help="sent as 'authorization: Bearer KEY' (default: the key `serve` wrote)"
    )
    gen.add_argument("--tls", action="store_true", help="connect over TLS (system roots unless --ca)")
    gen.add_argument("--ca", default=None, help="CA (PEM) that signed the server certificate; implies --tls")
    gen.set_defaults(handler=_generate)


def app_config_from_args(args: argparse.Namespace) -> AppConfig:
    config = AppConfig.from_yaml(args.config) if args.config else AppConfig()
    updates: dict[str, object] = {}
    if args.model or args.engine_replicas or args.model_name or args.backend:
        base = config.models[0]
        model_updates: dict[str, object] = {}
        if args.model:
            model_updates["path"] = str(Path(args.model).resolve())
            model_updates["name"] = args.model_name or Path(args.model).resolve().name
        elif args.model_name:
            model_updates["name"] = args.model_name
        if args.engine_replicas:
            model_updates["engine_replicas"] = args.engine_replicas
        if args.backend:
            engine = base.engine.model_copy(update={"backend": args.backend})
            if args.backend == "vllm":
                engine = engine.model_copy(
                    update={"block_size": vllm_block_size(engine.block_size, engine.device)}
                )
            model_updates["engine"] = engine.model_dump()
        updates["models"] = (
            ModelConfig.model_validate({**base.model_dump(), **model_updates}),
            *config.models[1:],
        )
        if "name" in model_updates:
            updates["default_model"] = ""
    if args.redis_url:
        updates["redis_url"] = args.redis_url
    if args.grpc_port is not None:
        updates["grpc_port"] = args.grpc_port
    if args.metrics_port is not None:
        updates["metrics_port"] = args.metrics_port
    if args.variants:
        updates["variants"] = tuple(args.variants)
    if args.tls_cert or args.tls_key:
        updates["tls"] = TlsConfig(cert_file=args.tls_cert or "", key_file=args.tls_key or "")
    if args.no_auth:
        updates["auth"] = config.auth.model_copy(update={"enabled": False})
    return AppConfig.model_validate({**config.model_dump(), **updates})


def _serve(args: argparse.Namespace) -> int:
    from services.server import run_server

    return run_server(app_config_from_args(args), ray_address=args.ray_address)


def _generate(args: argparse.Namespace) -> int:
    from services.client import GenerateOptions, generate_to_stdout

    api_key = args.api_key
    key_file = local_api_key_path()
    if api_key is None and key_file.exists():
        api_key = key_file.read_text().strip()
    options = GenerateOptions(
        target=args.target,
        model=args.model,
        stream=args.stream,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        chat=args.chat,
        api_key=api_key,
        tls=args.tls,
        ca_file=args.ca,
    )
    return generate_to_stdout(args.prompt, options, out=sys.stdout)
