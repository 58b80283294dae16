"""`tokenline ...`: the command line. Each sub-command imports only what it needs,
so `tokenline generate` starts fast and never loads torch."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


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

    bench = commands.add_parser("bench", help="benchmarks (ratios against baselines, one run)")
    bench_kinds = bench.add_subparsers(title="benchmarks")
    engine = bench_kinds.add_parser("engine", help="engine vs transformers generate / generate_batch")
    engine.add_argument("--json", type=Path, default=None, help="write the results here")
    engine.add_argument("--quick", action="store_true", help="fewer requests, same shape (<10 min)")
    engine.set_defaults(handler=_bench_engine)
    pipeline = bench_kinds.add_parser("pipeline", help="the whole stack over gRPC vs the engine in-process")
    pipeline.add_argument("--json", type=Path, default=None, help="write the results here")
    pipeline.add_argument("--quick", action="store_true", help="fewer requests, same shape (<10 min)")
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


def _bench_engine(args: argparse.Namespace) -> int:
    from loadtest.engine_bench import run_engine_benchmark

    run_engine_benchmark(quick=args.quick, json_path=args.json)
    return 0


def _bench_pipeline(args: argparse.Namespace) -> int:
    from loadtest.pipeline_bench import run_pipeline_benchmark

    run_pipeline_benchmark(quick=args.quick, json_path=args.json)
    return 0


def _bench_optimizer(args: argparse.Namespace) -> int:
    from loadtest.optimizer_bench import run_optimizer_benchmark

    run_optimizer_benchmark(quick=args.quick, json_path=args.json, model_dir=args.model)
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from loadtest.soak import soak_command

    return soak_command(args.minutes, args.concurrency, args.json)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
