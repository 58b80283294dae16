"""`tokenline bench load`: locust over a concurrency sweep; CSV, JSON and PNG plots.

For each user count, one headless locust run of ``loadtest/locustfile.py`` (closed
loop, no think time: N users = N streams in flight) for ``run_time``, then the
next. Each run's exact samples (the locustfile's ``TOKENLINE_LOCUST_JSON``) give
TTFT, inter-token latency (gap between messages), TPOT and end-to-end p50/p99 and
output tokens/s; locust's own CSV and log of each run are kept beside them.

Without ``--target`` the benchmark starts the stack itself (as ``bench soak`` does:
private Redis, local Ray, Serve gRPC, one engine replica of the demo model or
``--model``, authentication on with a key it issues); with one, it loads that
endpoint with ``--api-key`` (or ``TOKENLINE_API_KEY``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.stats import percentile
from services.errors import InvalidParameterError

Log = Callable[[str], None]

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
DEFAULT_OUT_DIR = Path("bench-results")
MAX_USERS = 1024
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")
_SECONDS_PER_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class LoadPlan:
    users: tuple[int, ...]
    run_time_s: float
    max_tokens: int = 32
    stop_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.users:
            raise InvalidParameterError("users", self.users, "needs at least one user count")
        for count in self.users:
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_USERS:
                raise InvalidParameterError("users", count, f"each user count must be in 1..{MAX_USERS}")
        if not (math.isfinite(self.run_time_s) and self.run_time_s >= 1):
            raise InvalidParameterError("run_time", self.run_time_s, "must be at least 1 second")
        if isinstance(self.max_tokens, bool) or not 2 <= self.max_tokens <= 4096:
            raise InvalidParameterError("max_tokens", self.max_tokens, "must be in 2..4096 (ITL needs 2)")


def parse_users(text: str) -> tuple[int, ...]:
    """``"1,4,16,64"`` -> (1, 4, 16, 64)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise InvalidParameterError("users", text, "must be comma-separated integers") from error


def parse_run_time(text: str) -> float:
    """Seconds of ``"30s"``, ``"2m"``, ``"1h"`` or ``"45"`` (as locust's --run-time)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidParameterError("run_time", text, "must look like 30s, 2m, 1h or 45")
    return float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]


def run_load_sweep(
    plan: LoadPlan,
    out_dir: Path,
    *,
    target: str | None = None,
    api_key: str | None = None,
    model_path: str | None = None,
    log: Log,
) -> dict[str, Any]:
    """Run the sweep, write ``load.csv``, ``load.json`` and the PNG plots; the results."""
    from loadtest.load_report import format_table, write_outputs

    out_dir.mkdir(parents=True, exist_ok=True)
    if target is not None:
        rows = [_one_run(plan, users, target, api_key, out_dir, log) for users in plan.users]
        model = "(the server's)"
    else:
        rows, model = _with_own_stack(plan, out_dir, model_path, log)
    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "tokenline bench load --users "
        f"{','.join(map(str, plan.users))} --run-time {plan.run_time_s:g}s --max-tokens {plan.max_tokens}",
        "target": target or "own stack (1 engine replica)",
        "model": model,
        "max_tokens": plan.max_tokens,
        "run_time_s": plan.run_time_s,
        "workload": "closed loop, no think time; demo task prompts; greedy, ignore_eos",
        "cpu_count": os.cpu_count(),
        "loadavg_before": _loadavg(),
        "rows": rows,
    }
    written = write_outputs(results, out_dir)
    print(format_table(results), flush=True)
    for path in written:
        log(f"wrote {path}")
    return results


def _with_own_stack(
    plan: LoadPlan, out_dir: Path, model_path: str | None, log: Log
) -> tuple[list[dict[str, Any]], str]:
    from loadtest.pipeline_stack import issue_api_key, stack_config, wait_ready
    from services.config import EngineSettings
    from services.server import running_stack

    if model_path is None:
        from services.demo import build_demo_model

        log("building (or reusing) the demo model")
        model_path = str(build_demo_model())
    log("starting the stack: private Redis, local Ray, Serve gRPC, 1 engine replica")
    with running_stack(stack_config(model_path, EngineSettings())) as running:
        api_key = issue_api_key(running.config)
        wait_ready(running.grpc_target, api_key)
        rows = [_one_run(plan, users, running.grpc_target, api_key, out_dir, log) for users in plan.users]
    return rows, model_path


def _one_run(
    plan: LoadPlan, users: int, target: str, api_key: str | None, out_dir: Path, log: Log
) -> dict[str, Any]:
    prefix = out_dir / f"locust-u{users}"
    samples_json = prefix.with_suffix(".samples.json")
    env = {
        **os.environ,
        "TOKENLINE_MAX_TOKENS": str(plan.max_tokens),
        "TOKENLINE_IGNORE_EOS": "1",
        "TOKENLINE_LOCUST_JSON": str(samples_json),
    }
    if api_key is not None:
        env["TOKENLINE_API_KEY"] = api_key
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", target,
        "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{plan.run_time_s:g}s",
        "--stop-timeout", f"{plan.stop_timeout_s:g}", "--only-summary", "--csv", str(prefix),
    ]  # fmt: skip
    log(f"locust: {users} users for {plan.run_time_s:g} s")
    with prefix.with_suffix(".log").open("w") as output:
        finished = subprocess.run(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, check=False,
            timeout=plan.run_time_s + plan.stop_timeout_s + 300,
        )  # fmt: skip
    if not samples_json.is_file():
        raise RuntimeError(f"locust ({users} users) exited with {finished.returncode} and wrote no samples")
    row = summarize_run(json.loads(samples_json.read_text()), exit_code=finished.returncode)
    loadavg = _loadavg()
    row["loadavg_1m_after"] = loadavg[0] if loadavg else None  # the machine's load shapes these figures
    return row


def summarize_run(summary: dict[str, Any], exit_code: int = 0) -> dict[str, Any]:
    """One row of the sweep from the locustfile's samples: p50/p99 in ms and tokens/s."""
    samples: dict[str, Sequence[float]] = summary["samples_ms"]
    row: dict[str, Any] = {
        "users": summary["users"],
        "requests": summary["requests"],
        "failures": summary["failures"],
        "locust_exit_code": exit_code,
        "output_tokens": summary["output_tokens"],
        "wall_s": round(summary["wall_s"], 3),
        "tokens_per_s": round(summary["tokens_per_s"], 1),
    }
    for key, name in (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "GenerateStream")):
        values = samples[name]
        for q in (50, 99):
            row[f"{key}_p{q}_ms"] = round(percentile(values, q), 2) if values else None
    return row


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None
