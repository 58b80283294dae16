"""`tokenline optimize`: drive the optimizer actor, show progress per stage, print the gate table
and, as the last line, the variant's directory."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from services.optimizer.actor import ProgressEvent
    from services.optimizer.pipeline import OptimizeRequest, OptimizeResult

_POLL_S = 0.5
_BAR = 24


def add_optimize_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser("optimize", help="quantize a model, gate it against its source, publish it")
    cmd.add_argument("--model", required=True, help="'demo' or a checkpoint directory")
    cmd.add_argument(
        "--recipe",
        required=True,
        help="int8 | int8-all | w8a8 | int4 | int8-gptq | int4-gptq (fp8: GPUs, not exercised)",
    )
    cmd.add_argument("--publish", action="store_true", help="write the registry entry when the gate passes")
    cmd.add_argument("--redis-url", default="", help="Redis holding the variant registry (for --publish)")
    cmd.add_argument("--key-prefix", default="tl", help="the app's Redis key prefix")
    cmd.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start one)")
    cmd.add_argument("--variants-dir", default=None, help="where variants are written")
    cmd.set_defaults(handler=optimize_command)


def optimize_command(args: argparse.Namespace) -> int:
    import ray

    from services.config import expand_environment
    from services.optimizer.actor import get_or_start_actor
    from services.optimizer.config import OptimizerConfig
    from services.optimizer.pipeline import OptimizeRequest

    overrides = {"variants_dir": args.variants_dir} if args.variants_dir else {}
    config = OptimizerConfig(**overrides)
    redis_url = expand_environment("--redis-url", args.redis_url)  # e.g. rediss://default:${PASSWORD}@...
    request = OptimizeRequest(args.model, args.recipe, args.publish, redis_url, args.key_prefix)
    ray.init(address=args.ray_address, namespace=config.actor_namespace, log_to_driver=False)
    try:
        result = run_with_progress(get_or_start_actor(config), request, sys.stderr)
    except KeyboardInterrupt:
        print("cancelled; nothing was published", file=sys.stderr)
        return 130
    finally:
        ray.shutdown()
    print(result.table)
    if not result.passed:
        print(f"{result.variant}: refused by the gate; not written, not published", file=sys.stderr)
        return 1
    print(f"{result.variant}: {'published' if result.published else 'written (not published)'}")
    print(result.variant_dir)
    return 0


def run_with_progress(actor: Any, request: OptimizeRequest, out: TextIO) -> OptimizeResult:
    """Start the run, print a bar per stage as events arrive; Ctrl-C cancels the run in the actor."""
    import ray

    pending = actor.run.remote(request)
    seen = 0
    shown: dict[str, float] = {}
    try:
        while True:
            done, _ = ray.wait([pending], timeout=_POLL_S)
            events: list[ProgressEvent] = ray.get(actor.events.remote(seen))
            seen += len(events)
            for event in events:
                last = shown.get(event.stage)
                # Start, end and every quarter in between: a bar per stage, not a line per tensor.
                if last is None or event.fraction >= 1.0 or event.fraction >= last + 0.25:
                    shown[event.stage] = event.fraction
                    _show(event, out)
            if done:
                result: OptimizeResult = ray.get(pending)
                return result
    except KeyboardInterrupt:
        ray.get(actor.cancel.remote())
        with contextlib.suppress(Exception):  # the cancellation itself surfaces here
            ray.get(pending)
        raise


def _show(event: ProgressEvent, out: TextIO) -> None:
    from services.optimizer.pipeline import STAGES

    filled = int(_BAR * event.fraction)
    index = STAGES.index(event.stage) + 1 if event.stage in STAGES else 0
    label = f"[{index}/{len(STAGES)}] {event.stage:<9}"
    bar = "#" * filled + "." * (_BAR - filled)
    print(f"{label} [{bar}] {event.fraction:4.0%} {event.detail}", file=out, flush=True)
