"""`tokenline bench soak`: the whole stack under steady load for minutes; memory per process.

The stack is the pipeline benchmark's (``pipeline_stack``: private Redis, local Ray, Serve's
gRPC proxy, one engine replica of the demo model, authentication on). ``concurrency``
closed-loop clients stream the demo task's prompts with mixed output lengths (greedy, EOS
ignored) for ``minutes``; a client refused with RESOURCE_EXHAUSTED retries after the hint.
Meanwhile the RSS of every stack process and Redis ``used_memory`` are sampled
(``loadtest.rss``); the table gives each one's start, end, max and slope after a warm-up.
A leak shows as a slope that stays positive however long the run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.load_driver import LoadRequest, LoadTally, StreamingLoad
from loadtest.pipeline_plan import demo_prompts
from loadtest.report import write_json
from loadtest.rss import RssSampler, Series
from loadtest.soak_report import assemble, format_table
from services.errors import InvalidParameterError

Log = Callable[[str], None]

DEFAULT_JSON = Path("bench-results/soak.json")
MAX_MINUTES = 24 * 60.0
MAX_CONCURRENCY = 1024
OUTPUT_LENGTHS = (16, 48, 96)  # mixed, so that requests finish at different steps
PROMPT_COUNT = 24
PROGRESS_EVERY_S = 60.0


@dataclass(frozen=True)
class SoakPlan:
    minutes: float
    concurrency: int = 8
    sample_every_s: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes)):
            raise InvalidParameterError("minutes", self.minutes, "must be a finite number")
        if not 0 < self.minutes <= MAX_MINUTES:
            raise InvalidParameterError("minutes", self.minutes, f"must be > 0 and at most {MAX_MINUTES:g}")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise InvalidParameterError("concurrency", self.concurrency, "must be an integer")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise InvalidParameterError("concurrency", self.concurrency, f"must be in 1..{MAX_CONCURRENCY}")
        if not (math.isfinite(self.sample_every_s) and self.sample_every_s > 0):
            raise InvalidParameterError("sample_every_s", self.sample_every_s, "must be > 0")

    @property
    def duration_s(self) -> float:
        return 60.0 * self.minutes

    @property
    def warmup_s(self) -> float:
        """Samples before this are left out of the slope: buffers and caches grow to their
        working size in the first minute or two, which is not a leak."""
        return min(120.0, self.duration_s / 5)

    def requests(self, prompts: Sequence[str]) -> list[LoadRequest]:
        """The request kinds: each prompt with the next of the mixed output lengths."""
        return [LoadRequest(p, OUTPUT_LENGTHS[i % len(OUTPUT_LENGTHS)]) for i, p in enumerate(prompts)]


def run_soak(
    plan: SoakPlan, json_path: Path | None, *, model_path: str | None = None, log: Log
) -> dict[str, Any]:
    """Start the stack, run the load, print the table, write JSON if ``json_path``; the results."""
    from loadtest.pipeline_stack import issue_api_key, stack_config, wait_ready
    from services.config import EngineSettings
    from services.server import running_stack

    if model_path is None:
        from services.demo import build_demo_model

        log("building (or reusing) the demo model")
        model_path = str(build_demo_model())
    settings = EngineSettings()
    log("starting the stack: private Redis, local Ray, Serve gRPC, 1 engine replica")
    with running_stack(stack_config(model_path, settings)) as running:
        api_key = issue_api_key(running.config)
        wait_ready(running.grpc_target, api_key)
        load = StreamingLoad(running.grpc_target, api_key)
        tally, series = _drive(plan, load, running.config.redis_url, log)
    results = assemble(
        context={
            "command": f"tokenline bench soak --minutes {plan.minutes:g} --concurrency {plan.concurrency}",
            "minutes": plan.minutes,
            "concurrency": plan.concurrency,
            "sample_every_s": plan.sample_every_s,
            "cpu_count": os.cpu_count(),
            "model": model_path,
            "engine_settings": settings.model_dump(),
            "workload": {
                "description": f"{PROMPT_COUNT} demo task prompts, max_tokens "
                f"{'/'.join(map(str, OUTPUT_LENGTHS))}, greedy, ignore_eos; closed loop, "
                "retry after RESOURCE_EXHAUSTED's hint",
                "seed": plan.seed,
            },
        },
        tally=tally,
        series=series,
        warmup_s=plan.warmup_s,
    )
    print(format_table(results), flush=True)
    if json_path is not None:
        write_json(results, json_path)
        log(f"wrote {json_path}")
    return results


def _drive(plan: SoakPlan, load: StreamingLoad, redis_url: str, log: Log) -> tuple[LoadTally, list[Series]]:
    import redis

    with redis.Redis.from_url(redis_url) as info:

        def used_memory() -> int:
            return int(info.info("memory")["used_memory"])

        # The stack's processes are this process's descendants: ray.init here started them.
        with RssSampler(
            os.getpid(), plan.sample_every_s, gauges={"redis used_memory": used_memory}
        ) as sampler:
            tally = asyncio.run(_with_progress(plan, load, log))
        return tally, sampler.series()


async def _with_progress(plan: SoakPlan, load: StreamingLoad, log: Log) -> LoadTally:
    tally = LoadTally()
    kinds = plan.requests(demo_prompts(PROMPT_COUNT, plan.seed))
    run = asyncio.ensure_future(load.closed_loop(kinds, plan.concurrency, plan.duration_s, tally))
    while not run.done():
        await asyncio.wait({run}, timeout=PROGRESS_EVERY_S)
        log(f"  {tally.completed} completed, {tally.refused} refused, {tally.failures} failed")
    return run.result()


def soak_command(
    minutes: float, concurrency: int, json_path: Path | None, model_path: str | None = None
) -> int:
    """What `tokenline bench soak` runs. Exit code 2 for a bad argument (before anything
    starts); 1 when a request failed or a stream skipped or repeated a token index, which is
    what a soak is run to find; else 0."""
    try:
        plan = SoakPlan(minutes=minutes, concurrency=concurrency)
    except InvalidParameterError as error:
        _stderr(f"error: {error}")
        return 2
    requests = run_soak(plan, json_path, model_path=model_path, log=_stderr)["requests"]
    return 1 if requests["failed"] or requests["index_errors"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loadtest.soak``: the same run, with ``--model`` to pick a checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak")
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the results here")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    args = parser.parse_args(argv)
    return soak_command(args.minutes, args.concurrency, args.json, args.model)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
