"""`tokenline bench pipeline`: the whole stack over gRPC against the engine in-process, one run.

Both sides run the same model (the demo model unless told otherwise), the same
engine settings (``EngineSettings()``: what a replica gets, its torch thread
count included) and the same closed-loop workload: ``c`` clients, each sending
its next request as soon as its previous one ended, at c=1 and c=16. Prompts are
the demo task's arithmetic questions; decoding is greedy with EOS ignored, so
every request gets exactly ``output_tokens`` tokens.

- **in-process**: one ``Engine`` driven with ``add_request``/``step``; a request's
  clock starts at ``add_request``; each token is stamped when the ``step`` that
  made it returns. Prompt ids come from ``PromptTokenizer.encode`` beforehand.
- **stack**: ``running_stack`` with one engine replica (private Redis, local Ray,
  Serve's gRPC proxy, ingress, tokenizer, detokenizer); ``c`` threads share one
  gRPC channel and call ``GenerateStream`` with the prompt *text*; a request's
  clock starts before the call; each token is stamped when its message arrives.

TTFT is first token minus start; inter-token latency (ITL) is the gap between
consecutive tokens of one request, pooled over all requests; throughput is
output tokens over the span from the first start to the last token.

The per-stage breakdown is measured from outside, without changing services/:
direct calls of the pieces the stack chains together (each stage's ``how`` in
the output says what was timed), the replica's step count through its Serve
``status`` call, and CPU seconds per process from /proc during the stack's c=16
run, for every process this run started.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import math
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.report import write_json

if TYPE_CHECKING:
    from services.config import AppConfig, EngineSettings
    from services.engine import Engine
    from services.queue import ClaimedRequest, QueueConfig
    from services.tokenizer.tokenizer import PromptTokenizer

Log = Callable[[str], None]

CONCURRENCIES = (1, 16)
LOW, HIGH = CONCURRENCIES
MODEL_NAME = "demo"
PROBE_MODEL = "bench-probe"  # the queue probes use their own stream; no engine reads it
STREAM_TIMEOUT_S = 300.0
PROBE_WAIT_MS = 2000
SETTLE_S = 0.01  # how long a probe lets the other side block in Redis before acting

# name -> (result key, bound, "min" or "max"): the pipeline's targets on the 2-core CPU.
TARGETS: dict[str, tuple[str, float, str]] = {
    "ratio_throughput_c16": ("ratio_throughput_c16", 0.85, "min"),
    "ttft_p50_added_ms": ("ttft_p50_added_ms", 15.0, "max"),
    "itl_p50_added_ms": ("itl_p50_added_ms", 2.0, "max"),
}

# stage -> (unit of work, how it is measured). All but engine_step_* and *_encode/_push
# run against the live stack or its Redis, while it is otherwise idle.
STAGES: dict[str, tuple[str, str]] = {
    "tokenize_encode": ("request", "PromptTokenizer.encode(TextPrompt) called in-process"),
    "tokenize_rpc": ("request", "Tokenize RPC round trip: client -> proxy -> ingress -> tokenizer replica"),
    "grpc_roundtrip": ("request", "ListModels RPC round trip: client -> proxy -> ingress (answer cached)"),
    "queue_enqueue": ("request", "QueueClient.enqueue alone (Lua script, AOF appendfsync always)"),
    "queue_enqueue_to_claim": ("request", "enqueue start -> EngineQueue.claim blocked in XREADGROUP returns"),
    "replica_claim_poll": ("step", "EngineQueue.claim(wait 0) on an empty stream: a busy replica's poll"),
    "replica_step_redis_1": ("step", "EngineQueue.append_and_poll_cancels, 1 chunk: the per-step write"),
    f"replica_step_redis_{HIGH}": ("step", f"EngineQueue.append_and_poll_cancels, {HIGH} chunks"),
    "output_append_to_read": ("step", "EngineQueue.append -> a QueueClient.read blocked in XREAD returns"),
    f"engine_step_c{LOW}": ("step", f"Engine.step in-process during the c={LOW} run"),
    f"engine_step_c{HIGH}": ("step", f"Engine.step in-process during the c={HIGH} run"),
    "detokenize_push": ("token", "IncrementalDetokenizer.push of one token"),
}

# Flat keys every result carries. Unsuffixed latencies are at c=1 (the pipeline's own
# cost, no batching), ``_c16`` ones under load.
HEADLINE_KEYS = tuple(
    [f"throughput_{side}_c{c}_tok_s" for c in CONCURRENCIES for side in ("in_process", "stack")]
    + [f"ratio_throughput_c{c}" for c in CONCURRENCIES]
    + [
        f"{metric}_{side}_ms{suffix}"
        for suffix in ("", f"_c{HIGH}")
        for metric in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99")
        for side in ("in_process", "stack", "added")
    ]
)


# ---- plan and workload --------------------------------------------------------------------
@dataclass(frozen=True)
class PipelinePlan:
    """What one run does; ``quick`` changes only the number of requests."""

    requests: Mapping[int, int]  # concurrency -> requests timed at that concurrency
    output_tokens: int  # asked per request; cut to fit the model's context
    warmup_requests: int
    probe_samples: int
    quick: bool
    seed: int = 0


def plan_for(quick: bool) -> PipelinePlan:
    return PipelinePlan(
        requests={LOW: 16, HIGH: 64} if quick else {LOW: 48, HIGH: 256},
        output_tokens=48,
        warmup_requests=HIGH,
        probe_samples=50 if quick else 200,
        quick=quick,
    )


def demo_prompts(count: int, seed: int) -> list[str]:
    """The demo task's prompts, seeded: addition, counting and facts in turn (from
    ``services.demo.corpus``), or addition alone (``"a+b="``) where that module is missing."""
    rng = random.Random(seed)
    try:
        from services.demo import corpus
    except ImportError:
        return [f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=" for _ in range(count)]
    makers: tuple[Callable[[], str], ...] = (
        lambda: corpus.addition_example(rng.randint(0, 99), rng.randint(0, 99)).prompt,
        lambda: corpus.counting_example(rng.randint(0, 99), rng.randint(1, 9)).prompt,
        lambda: corpus.fact_example(rng.choice(corpus.WORLD), rng.choice(corpus.FACT_ATTRIBUTES)).prompt,
    )
    return [makers[index % len(makers)]() for index in range(count)]


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Fraction of output positions, over all requests, before the two sides first differ.
    Greedy decoding of the same weights agrees unless a float near-tie flips in another batch."""
    total = agreed = 0
    for left, right in zip(a, b, strict=True):
        total += max(len(left), len(right))
        for x, y in zip(left, right, strict=False):
            if x != y:
                break
            agreed += 1
    return agreed / total if total else 1.0


def output_budget(wanted: int, max_context_length: int, longest_prompt: int) -> int:
    """Output tokens per request: ``wanted``, cut so that prompt + output fits the context."""
    budget = min(wanted, max_context_length - longest_prompt - 1)
    if budget < 2:
        raise ValueError(
            f"a {longest_prompt}-token prompt leaves {budget} output tokens in a context of "
            f"{max_context_length}; inter-token latency needs at least 2"
        )
    return budget


@dataclass(frozen=True)
class Workload:
    """The same requests for both sides: text for the stack, token ids for the engine."""

    texts: Mapping[int, list[str]]  # concurrency (0: warm-up) -> prompts
    ids: Mapping[int, list[list[int]]]
    output_tokens: int

    def describe(self, plan: PipelinePlan) -> dict[str, Any]:
        lengths = [len(ids) for group in self.ids.values() for ids in group]
        return {
            "prompts": "the demo task's prompts (addition, counting, facts), seeded",
            "seed": plan.seed,
            "prompt_tokens_mean": sum(lengths) / len(lengths),
            "output_tokens": self.output_tokens,
            "decoding": "greedy, ignore_eos",
            "requests": {str(c): plan.requests[c] for c in CONCURRENCIES},
            "warmup_requests": plan.warmup_requests,
            "load": "closed loop: c clients, each sends its next request when its previous one ends",
        }


def make_workload(plan: PipelinePlan, tokenizer: PromptTokenizer) -> Workload:
    from services.tokenizer.prompt import TextPrompt

    counts = {0: plan.warmup_requests, **{c: plan.requests[c] for c in CONCURRENCIES}}
    texts = demo_prompts(sum(counts.values()), plan.seed)
    ids = [tokenizer.encode(TextPrompt(text)) for text in texts]
    by_c_texts: dict[int, list[str]] = {}
    by_c_ids: dict[int, list[list[int]]] = {}
    offset = 0
    for c, n in counts.items():
        by_c_texts[c], by_c_ids[c] = texts[offset : offset + n], ids[offset : offset + n]
        offset += n
    budget = output_budget(plan.output_tokens, tokenizer.max_context_length, max(map(len, ids)))
    return Workload(by_c_texts, by_c_ids, budget)


# ---- timing records and statistics (pure) ---------------------------------------------------
@dataclass
class RequestTrace:
    """One request's clock: when it started and when each of its output tokens arrived."""

    start: float = 0.0
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    messages: int = 0  # deliveries that carried tokens (a step's output, a stream message)

    def add(self, when: float, token_ids: Sequence[int]) -> None:
        self.messages += 1
        self.token_times.extend([when] * len(token_ids))
        self.token_ids.extend(token_ids)

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(traces: Sequence[RequestTrace]) -> dict[str, float]:
    """Throughput and latency (milliseconds) of one closed-loop run."""
    done = [t for t in traces if t.token_times]
    if any(len(t.token_times) < 2 for t in done) or not done:
        raise ValueError("every request needs 2 tokens or more: inter-token latency is undefined otherwise")
    itls = [gap for t in done for gap in t.itls_s]
    start, end = min(t.start for t in done), max(t.token_times[-1] for t in done)
    tokens = sum(len(t.token_times) for t in done)
    ttfts = [t.ttft_s for t in done]
    e2e = [t.token_times[-1] - t.start for t in done]
    # time per output token after the first, per request: unlike ITL, blind to how tokens are bunched
    tpots = [(t.token_times[-1] - t.token_times[0]) / (len(t.token_times) - 1) for t in done]
    return {
        "requests": len(done),
        "output_tokens": tokens,
        "wall_s": end - start,
        "tok_s": tokens / (end - start) if end > start else 0.0,
        "ttft_p50_ms": 1e3 * percentile(ttfts, 50),
        "ttft_p99_ms": 1e3 * percentile(ttfts, 99),
        "itl_p50_ms": 1e3 * percentile(itls, 50),
        "itl_p99_ms": 1e3 * percentile(itls, 99),
        "itl_mean_ms": 1e3 * sum(itls) / len(itls),
        "tpot_p50_ms": 1e3 * percentile(tpots, 50),
        "tokens_per_message": tokens / sum(t.messages for t in done),
        "e2e_p50_ms": 1e3 * percentile(e2e, 50),
    }


def headline(
    in_process: Mapping[int, Mapping[str, float]], stack: Mapping[int, Mapping[str, float]]
) -> dict[str, float]:
    """The flat numbers of ``HEADLINE_KEYS``."""
    out: dict[str, float] = {}
    for c in CONCURRENCIES:
        out[f"throughput_in_process_c{c}_tok_s"] = in_process[c]["tok_s"]
        out[f"throughput_stack_c{c}_tok_s"] = stack[c]["tok_s"]
        out[f"ratio_throughput_c{c}"] = stack[c]["tok_s"] / in_process[c]["tok_s"]
        suffix = "" if c == LOW else f"_c{c}"
        for metric in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99"):
            ours, theirs = in_process[c][f"{metric}_ms"], stack[c][f"{metric}_ms"]
            out[f"{metric}_in_process_ms{suffix}"] = ours
            out[f"{metric}_stack_ms{suffix}"] = theirs
            out[f"{metric}_added_ms{suffix}"] = theirs - ours
    return out


def check_targets(results: Mapping[str, Any]) -> dict[str, dict[str, float | bool | str]]:
    checked: dict[str, dict[str, float | bool | str]] = {}
    for name, (key, bound, kind) in TARGETS.items():
        value = float(results[key])
        met = value >= bound if kind == "min" else value <= bound
        checked[name] = {"value": value, "target": bound, "kind": kind, "met": met}
    return checked


def stages_from(samples_s: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float | str]]:
    """Each stage of ``STAGES`` as p50/p99 milliseconds with its unit and how it was measured."""
    return {
        name: {
            "p50_ms": 1e3 * percentile(samples_s[name], 50),
            "p99_ms": 1e3 * percentile(samples_s[name], 99),
            "per": per,
            "how": how,
        }
        for name, (per, how) in STAGES.items()
    }


def latency_budgets(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The c=1 latency the stack adds, split into the stages measured alone (p50s).

    TTFT: the hops a request takes before its first token reaches the client. ITL: what the
    replica's loop thread does per step besides ``Engine.step`` (both blocking round trips).
    ``unexplained`` is the rest: Ray Serve's streaming hops (detokenizer -> ingress -> proxy),
    the client, and waiting for a CPU.
    """
    s = {name: float(entry["p50_ms"]) for name, entry in results["stages"].items()}
    ttft = {
        "grpc_proxy_ingress": s["grpc_roundtrip"],
        "tokenizer_hop": max(0.0, s["tokenize_rpc"] - s["grpc_roundtrip"]),
        "enqueue_to_claim": s["queue_enqueue_to_claim"],
        "first_step_write": s["replica_step_redis_1"],
        "output_append_to_read": s["output_append_to_read"],
        "detokenize": s["detokenize_push"],
    }
    ttft["unexplained"] = results["ttft_p50_added_ms"] - sum(ttft.values())
    itl = {"claim_poll": s["replica_claim_poll"], "step_write": s["replica_step_redis_1"]}
    itl["unexplained"] = results["itl_p50_added_ms"] - sum(itl.values())
    return {"ttft_p50_added_ms": ttft, "itl_p50_added_ms": itl}


def assemble(
    *,
    context: Mapping[str, Any],
    in_process: Mapping[int, Mapping[str, float]],
    stack: Mapping[int, Mapping[str, float]],
    samples: Mapping[str, Sequence[float]],
    extra: Mapping[str, Any],
    agreement: float,
) -> dict[str, Any]:
    """The result document: ``context`` (run facts), both sides' summaries, the headline
    numbers, the stages, the latency budgets and the targets."""
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **context,
        "in_process": {str(c): dict(v) for c, v in in_process.items()},
        "stack": {str(c): dict(v) for c, v in stack.items()},
        **headline(in_process, stack),
        "stages": stages_from(samples),
        "stack_engine_loop": {},
        "cpu_during_stack_c16": {},
        **extra,
        "greedy_agreement": agreement,
    }
    results["latency_budgets"] = latency_budgets(results)
    results["targets"] = check_targets(results)
    return results


# ---- the report ---------------------------------------------------------------------------
def format_table(results: Mapping[str, Any]) -> str:
    model, workload, settings = results["model"], results["workload"], results["engine_settings"]
    lines = [
        f"tokenline bench pipeline  {results['date']}  (quick={results['quick']})",
        f"model {model['path']} (context {model['max_context_length']}, vocab {model['vocab_size']}); "
        f"engine: {settings['num_threads']} torch thread(s), max_num_seqs {settings['max_num_seqs']}, "
        f"token budget {settings['max_num_batched_tokens']}; {results['cpu_count']} CPUs",
        f"workload: demo task prompts ({workload['prompt_tokens_mean']:.1f} tokens mean), "
        f"{workload['output_tokens']} output tokens each, greedy, ignore_eos, closed loop; "
        f"requests per concurrency {workload['requests']}",
        "",
        f"{'':<14}"
        + "".join(f"{f'c={c} in-proc':>14}{f'c={c} stack':>12}{'stack-in':>10}" for c in CONCURRENCIES),
    ]
    rows = (("tok/s", "tok_s"), ("TTFT p50 ms", "ttft_p50_ms"), ("TTFT p99 ms", "ttft_p99_ms"),
            ("ITL p50 ms", "itl_p50_ms"), ("ITL p99 ms", "itl_p99_ms"), ("ITL mean ms", "itl_mean_ms"),
            ("TPOT p50 ms", "tpot_p50_ms"),
            ("e2e p50 ms", "e2e_p50_ms"), ("tokens/msg", "tokens_per_message"))
    for label, key in rows:
        cells = ""
        for c in CONCURRENCIES:
            ours, theirs = results["in_process"][str(c)][key], results["stack"][str(c)][key]
            diff = f"x{theirs / ours:.3f}" if key == "tok_s" else f"{theirs - ours:+.2f}"
            cells += f"{ours:>14.2f}{theirs:>12.2f}{diff:>10}"
        lines.append(f"{label:<14}{cells}")
    lines += ["", "stages, measured from outside the stack (p50 / p99 ms):"]
    for name, entry in results["stages"].items():
        lines.append(
            f"  {name:<24}{entry['p50_ms']:>8.3f}{entry['p99_ms']:>9.3f}  per {entry['per']:<8}{entry['how']}"
        )
    for key, parts in results["latency_budgets"].items():
        split = " + ".join(f"{name} {value:.2f}" for name, value in parts.items())
        lines.append(f"c=1 {key} {results[key]:.2f} = {split}")
    loop = results["stack_engine_loop"]
    if loop:
        lines.append(
            f"engine replica during the c={HIGH} run: {loop['steps']} steps, {loop['ms_per_step']:.2f} ms "
            f"per step (in-process p50 {results['stages'][f'engine_step_c{HIGH}']['p50_ms']:.2f} ms)"
        )
    cpu = results["cpu_during_stack_c16"]
    if cpu:
        lines += [
            "",
            f"CPU during the stack's c={HIGH} run: {cpu['total_cpu_s']:.1f} CPU s in {cpu['wall_s']:.1f} s "
            f"wall ({results['cpu_count']} CPUs), {cpu['output_tokens']} tokens",
        ]
        for name, row in cpu["processes"].items():
            lines.append(f"  {name:<46}{row['cpu_s']:>7.2f} CPU s{row['cpu_ms_per_token']:>8.3f} ms/token")
    lines += ["", f"greedy agreement, stack vs in-process: {results['greedy_agreement']:.2f}", "targets:"]
    for name, target in results["targets"].items():
        sign = ">=" if target["kind"] == "min" else "<="
        verdict = "met" if target["met"] else "MISSED"
        lines.append(f"  {name:<24}{target['value']:>9.2f}  ({sign} {target['target']:g})  {verdict}")
    return "\n".join(lines)


# ---- CPU per process, from /proc (Linux) ----------------------------------------------------
def process_label(cmdline: Sequence[str]) -> str:
    """A short name for a process: Ray's title for Ray workers, else the program (and the
    Python script or module it runs)."""
    first = cmdline[0].strip() if cmdline else ""
    if not first:
        return "?"
    if first.startswith("ray::"):  # Ray appends ".method" while an actor runs a task; drop it
        return re.sub(r"\.[A-Za-z_]\w*$", "", first.split()[0])
    program = os.path.basename(first.split()[0])
    if program.startswith("python"):
        for index, arg in enumerate(cmdline[1:], start=1):
            if arg == "-m" and index + 1 < len(cmdline):
                return f"python -m {cmdline[index + 1]}"
            if arg.endswith(".py"):
                return f"python {os.path.basename(arg)}"
    return program


def cpu_by_process(root_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds) for ``root_pid`` and all its descendants; {} off Linux."""
    if not os.path.isdir("/proc"):
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float, list[str]]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                stat = stat_file.read()
            with open(f"/proc/{entry}/cmdline", "rb") as cmd_file:
                raw = cmd_file.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, cmdline)
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, tuple[str, float]] = {}
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            _, cpu, cmdline = table[pid]
            label = "this process (benchmark client)" if pid == root_pid else process_label(cmdline)
            found[pid] = (label, cpu)
            todo.extend(children.get(pid, []))
    return found


CpuSnapshot = Mapping[int, tuple[str, float]]


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot, tokens: int, wall_s: float) -> dict[str, Any]:
    """CPU seconds spent between two snapshots, summed by label, largest first."""
    by_label: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        by_label[label] = by_label.get(label, 0.0) + cpu - before.get(pid, (label, 0.0))[1]
    ranked = sorted(by_label.items(), key=lambda item: -item[1])
    return {
        "wall_s": wall_s,
        "output_tokens": tokens,
        "total_cpu_s": sum(by_label.values()),
        "how": "utime+stime of this process and its descendants from /proc/<pid>/stat, "
        "before and after the run, summed by process title",
        "processes": {
            label: {"cpu_s": cpu, "cpu_ms_per_token": 1e3 * cpu / tokens if tokens else 0.0}
            for label, cpu in ranked
            if cpu >= 0.005
        },
    }


# ---- the two sides under load -----------------------------------------------------------------
def run_in_process(
    engine: Engine, prompts: Sequence[Sequence[int]], output_tokens: int, concurrency: int, tag: str
) -> tuple[list[RequestTrace], list[float]]:
    """Closed loop on ``engine``: keep ``concurrency`` requests in it; stamp each token when
    the step that made it returns. Returns the traces and every step's duration."""
    from services.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    traces = [RequestTrace() for _ in prompts]
    active: dict[str, int] = {}
    step_times: list[float] = []
    next_index = 0
    while next_index < len(prompts) or active:
        while next_index < len(prompts) and len(active) < concurrency:
            request_id = f"{tag}-{next_index}"
            traces[next_index].start = time.perf_counter()
            engine.add_request(request_id, prompts[next_index], params)
            active[request_id] = next_index
            next_index += 1
        begin = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        step_times.append(now - begin)
        for out in outputs:
            traces[active[out.request_id]].add(now, out.new_token_ids)
            if out.finished:
                del active[out.request_id]
    return traces, step_times


class _StackLoad:
    """``concurrency`` threads on one gRPC channel, each streaming its next request as soon as
    its previous one ended; a token is stamped when the message carrying it arrives."""

    def __init__(
        self, target: str, api_key: str, prompts: Sequence[str], output_tokens: int, tag: str
    ) -> None:
        from services.client import TokenlineClient

        self._client = TokenlineClient(target, api_key)
        self._prompts = prompts
        self._output_tokens = output_tokens
        self._tag = tag
        self._lock = threading.Lock()
        self._pending = iter(range(len(prompts)))
        self.traces = [RequestTrace() for _ in prompts]
        self.errors: list[BaseException] = []

    def run(self, concurrency: int) -> list[RequestTrace]:
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            self._client.close()
        if self.errors:
            error = self.errors[0]
            raise RuntimeError(f"stack load at c={concurrency} failed: {error!r}") from error
        return self.traces

    def _worker(self) -> None:
        from services.proto.tokenline.v1 import generation_pb2 as pb

        try:
            while not self.errors:
                with self._lock:
                    index = next(self._pending, None)
                if index is None:
                    return
                sampling = pb.SamplingParams(
                    max_tokens=self._output_tokens, temperature=0.0, ignore_eos=True, seed=index
                )
                request = pb.GenerateRequest(
                    request_id=f"{self._tag}-{index}", text=self._prompts[index], sampling=sampling
                )
                trace = self.traces[index]
                trace.start = time.perf_counter()
                for message in self._client.stream(request, STREAM_TIMEOUT_S):
                    if message.token_ids:
                        trace.add(time.perf_counter(), list(message.token_ids))
        except BaseException as exc:  # the caller raises it after joining
            self.errors.append(exc)


def run_stack_load(
    target: str, api_key: str, prompts: Sequence[str], output_tokens: int, concurrency: int, tag: str
) -> list[RequestTrace]:
    tag = f"{tag}-{uuid.uuid4().hex[:6]}"  # request ids stay unique across runs on one Redis
    return _StackLoad(target, api_key, prompts, output_tokens, tag).run(concurrency)


def check_delivered(name: str, traces: Sequence[RequestTrace], output_tokens: int) -> None:
    wrong = [(i, len(t.token_ids)) for i, t in enumerate(traces) if len(t.token_ids) != output_tokens]
    if wrong:
        raise AssertionError(
            f"{name}: requests without exactly {output_tokens} tokens (index, got): {wrong[:5]}"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stack_config(model_path: str, settings: EngineSettings) -> AppConfig:
    from services.config import AppConfig, ModelConfig

    model = ModelConfig(name=MODEL_NAME, path=model_path, engine_replicas=1, engine=settings)
    return AppConfig(models=(model,), grpc_port=free_port())


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


# ---- stage probes ---------------------------------------------------------------------------
def _timed(call: Callable[..., object], *args: Any) -> float:
    """Seconds one ``call(*args)`` takes."""
    begin = time.perf_counter()
    call(*args)
    return time.perf_counter() - begin


def probe_rpcs(target: str, api_key: str, prompts: Sequence[str], samples: int) -> dict[str, list[float]]:
    """Round trips of Tokenize (proxy -> ingress -> tokenizer deployment and back) and of
    ListModels (proxy -> ingress and back; the ingress answers from its caches)."""
    from services.client import TokenlineClient
    from services.proto.tokenline.v1 import generation_pb2 as pb

    tokenize = [pb.TokenizeRequest(text=prompts[i % len(prompts)]) for i in range(samples)]
    listing = pb.ListModelsRequest()
    metadata = (("authorization", f"Bearer {api_key}"),)
    with TokenlineClient(target) as client:
        stub = client.stub
        return {
            "tokenize_rpc": [_timed(stub.Tokenize, request, 10, metadata) for request in tokenize],
            "grpc_roundtrip": [_timed(stub.ListModels, listing, 10, metadata) for _ in range(samples)],
        }


class _QueueProbe:
    """The Redis hops of one request, on the stack's own Redis, through a probe model's
    stream that no engine reads: the same client classes and calls the stack uses."""

    def __init__(self, redis_url: str, queue_config: QueueConfig) -> None:
        from services.queue import EngineQueue, QueueClient

        self._loop = asyncio.new_event_loop()
        self._engine_queue = EngineQueue(redis_url, queue_config)
        self._client = QueueClient(redis_url, queue_config)
        self._engine_queue.ensure_group(PROBE_MODEL)
        self._consumer = f"bench-probe-{uuid.uuid4().hex[:8]}"
        self._claimed: list[ClaimedRequest] = []
        self._stamp = 0.0

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()
        self._engine_queue.close()

    def sample(self, width: int) -> dict[str, float]:
        from services.messages import GenerationRequest, SamplingParams, TokenChunk

        request_id = f"probe-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=4)
        request = GenerationRequest(request_id, PROBE_MODEL, tuple(range(3, 10)), params)
        out: dict[str, float] = {}
        # enqueue -> a claim already blocked in XREADGROUP: an idle replica's wait.
        claimer = self._in_background(self._claim)
        time.sleep(SETTLE_S)  # until the claimer's XREADGROUP is blocked in Redis
        begin = time.perf_counter()
        self._loop.run_until_complete(self._client.enqueue(request))
        out["queue_enqueue"] = time.perf_counter() - begin
        claimer.join()
        if not self._claimed:
            raise RuntimeError(f"queue probe: the request was not claimed within {PROBE_WAIT_MS} ms")
        out["queue_enqueue_to_claim"] = self._stamp - begin
        # A busy replica's poll for new work, once per loop iteration; here the stream is empty.
        out["replica_claim_poll"] = _timed(self._engine_queue.claim, PROBE_MODEL, self._consumer, 16, 0)
        # A replica's per-step write: every running request's chunk plus the cancel poll.
        for n in (1, width):
            ids = [request_id, *(f"{request_id}-{k}" for k in range(1, n))]
            chunks = [TokenChunk(rid, 0, (5,)) for rid in ids]
            out[f"replica_step_redis_{n}"] = _timed(
                self._engine_queue.append_and_poll_cancels, PROBE_MODEL, chunks, ids
            )
        # Output append -> a read already blocked in XREAD: the detokenizer's wait for a step.
        from services.queue import OutputCursor

        cursor = self._loop.run_until_complete(self._client.read(OutputCursor(request_id), block_ms=0))[1]
        appender = self._in_background(self._append_final, request_id, cursor.next_index)
        self._loop.run_until_complete(self._client.read(cursor, block_ms=PROBE_WAIT_MS))
        out["output_append_to_read"] = time.perf_counter() - self._stamp
        appender.join()
        self._engine_queue.finish(PROBE_MODEL, self._claimed.pop().entry_id, request_id)
        return out

    @staticmethod
    def _in_background(target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        return thread

    def _claim(self) -> None:
        self._claimed.extend(self._engine_queue.claim(PROBE_MODEL, self._consumer, 1, PROBE_WAIT_MS))
        self._stamp = time.perf_counter()

    def _append_final(self, request_id: str, index: int) -> None:
        from services.messages import FinishReason, TokenChunk

        time.sleep(SETTLE_S)  # until the caller's XREAD is blocked in Redis
        self._stamp = time.perf_counter()
        self._engine_queue.append([TokenChunk(request_id, index, (6,), FinishReason.LENGTH)])


def probe_queue(redis_url: str, queue_config: QueueConfig, samples: int) -> dict[str, list[float]]:
    probe = _QueueProbe(redis_url, queue_config)
    found: dict[str, list[float]] = {}
    try:
        for _ in range(samples):
            for name, seconds in probe.sample(HIGH).items():
                found.setdefault(name, []).append(seconds)
    finally:
        probe.close()
    return found


def probe_tokenizer(tokenizer: PromptTokenizer, prompts: Sequence[str], samples: int) -> list[float]:
    from services.tokenizer.prompt import TextPrompt

    requests = [TextPrompt(prompts[i % len(prompts)]) for i in range(samples)]
    return [_timed(tokenizer.encode, request) for request in requests]


def probe_detokenizer(tokenizer: PromptTokenizer, outputs: Sequence[Sequence[int]]) -> list[float]:
    """``IncrementalDetokenizer.push`` one token at a time, as the detokenizer gets them."""
    from services.detokenizer.incremental import IncrementalDetokenizer

    found: list[float] = []
    for ids in outputs:
        detokenizer = IncrementalDetokenizer(tokenizer)
        found.extend([_timed(detokenizer.push, (token_id,)) for token_id in ids])
    return found


# ---- the run --------------------------------------------------------------------------------
def run_pipeline_benchmark(
    quick: bool, json_path: Path | None, *, model_path: str | None = None
) -> dict[str, Any]:
    """Run the benchmark, print the table, write JSON to ``json_path`` if given; return the results.

    ``model_path``: a checkpoint directory with a tokenizer; None builds (or reuses) the demo model.
    """
    return run_plan(plan_for(quick), json_path, model_path=model_path, log=_stderr)


@dataclass
class _Side:
    """One side's results: summary per concurrency and the tokens it produced."""

    summaries: dict[int, dict[str, float]] = field(default_factory=dict)
    outputs: dict[int, list[list[int]]] = field(default_factory=dict)

    def record(self, name: str, c: int, traces: Sequence[RequestTrace], output_tokens: int, log: Log) -> None:
        check_delivered(f"{name} c={c}", traces, output_tokens)
        self.summaries[c] = summary = summarize(traces)
        self.outputs[c] = [t.token_ids for t in traces]
        log(f"  {name} c={c}: {summary['tok_s']:.1f} tok/s, TTFT p50 {summary['ttft_p50_ms']:.2f} ms, "
            f"ITL p50 {summary['itl_p50_ms']:.2f} ms")

    def all_outputs(self) -> list[list[int]]:
        return [ids for c in CONCURRENCIES for ids in self.outputs[c]]


def _run_in_process_side(
    path: str, settings: EngineSettings, workload: Workload, log: Log
) -> tuple[_Side, dict[str, list[float]]]:
    import torch

    from services.engine import Engine

    side, steps = _Side(), {}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.num_threads)  # what EngineReplica.__init__ does
    try:
        engine = Engine(settings.engine_config(path))
        run_in_process(engine, workload.ids[0], workload.output_tokens, HIGH, "warmup")
        for c in CONCURRENCIES:
            log(f"in-process: {len(workload.ids[c])} requests at concurrency {c}")
            traces, steps[f"engine_step_c{c}"] = run_in_process(
                engine, workload.ids[c], workload.output_tokens, c, f"inproc-c{c}"
            )
            side.record("in-process", c, traces, workload.output_tokens, log)
        del engine
        gc.collect()
    finally:
        torch.set_num_threads(threads_before)
    return side, steps


def _run_stack_side(
    path: str, settings: EngineSettings, workload: Workload, probe_samples: int, log: Log
) -> tuple[_Side, dict[str, list[float]], dict[str, Any]]:
    from services.server import running_stack

    side = _Side()
    config = stack_config(path, settings)
    extra: dict[str, Any] = {"stack_engine_loop": {}, "cpu_during_stack_c16": {}}
    log("starting the stack: private Redis, local Ray, Serve gRPC, 1 engine replica")
    with running_stack(config) as running:
        api_key = issue_api_key(running.config)
        wait_ready(running.grpc_target, api_key)
        target = running.grpc_target
        run_stack_load(target, api_key, workload.texts[0], workload.output_tokens, HIGH, "warmup")
        for c in CONCURRENCIES:
            log(f"stack: {len(workload.texts[c])} requests at concurrency {c}")
            steps_before, cpu_before = engine_steps(config.app_name), cpu_by_process(os.getpid())
            traces = run_stack_load(target, api_key, workload.texts[c], workload.output_tokens, c, f"c{c}")
            steps_after, cpu_after = engine_steps(config.app_name), cpu_by_process(os.getpid())
            side.record("stack", c, traces, workload.output_tokens, log)
            if c != HIGH:
                continue
            summary = side.summaries[c]
            extra["cpu_during_stack_c16"] = cpu_delta(
                cpu_before, cpu_after, int(summary["output_tokens"]), summary["wall_s"]
            )
            if steps_before is not None and steps_after is not None and steps_after > steps_before:
                steps = steps_after - steps_before
                extra["stack_engine_loop"] = {
                    "steps": steps,
                    "ms_per_step": 1e3 * summary["wall_s"] / steps,
                    "how": f"wall of the c={HIGH} run / engine steps it took (ReplicaStatus.steps)",
                }
        log(f"stage probes: {probe_samples} samples each")
        texts = [text for group in workload.texts.values() for text in group]
        samples = probe_rpcs(target, api_key, texts, probe_samples)
        samples.update(probe_queue(running.config.redis_url, running.config.queue, probe_samples))
    return side, samples, extra


def run_plan(
    plan: PipelinePlan, json_path: Path | None, *, model_path: str | None, log: Log
) -> dict[str, Any]:
    import torch

    from services.config import EngineSettings
    from services.tokenizer.tokenizer import PromptTokenizer

    path = model_path or _demo_model_path(log)
    settings = EngineSettings()
    tokenizer = PromptTokenizer(path)
    workload = make_workload(plan, tokenizer)

    in_process, samples = _run_in_process_side(path, settings, workload, log)
    stack, stack_samples, extra = _run_stack_side(path, settings, workload, plan.probe_samples, log)
    samples.update(stack_samples)
    all_texts = [text for group in workload.texts.values() for text in group]
    samples["tokenize_encode"] = probe_tokenizer(tokenizer, all_texts, plan.probe_samples)
    samples["detokenize_push"] = probe_detokenizer(tokenizer, in_process.outputs[LOW])

    results = assemble(
        context={
            "quick": plan.quick,
            "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__,
            "model": {
                "path": path,
                "max_context_length": tokenizer.max_context_length,
                "vocab_size": tokenizer.vocab_size,
            },
            "engine_settings": settings.model_dump(),
            "workload": workload.describe(plan),
        },
        in_process=in_process.summaries,
        stack=stack.summaries,
        samples=samples,
        extra=extra,
        agreement=token_agreement(stack.all_outputs(), in_process.all_outputs()),
    )
    print(format_table(results), flush=True)
    if json_path is not None:
        write_json(results, json_path)
        log(f"wrote {json_path}")
    return results


def _demo_model_path(log: Log) -> str:
    from services.demo import build_demo_model

    log("building (or reusing) the demo model")
    return str(build_demo_model())


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m loadtest.pipeline_bench``: the same run, with ``--model`` to pick a checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.pipeline_bench")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer requests, same shape (<10 min)")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    args = parser.parse_args(argv)
    run_pipeline_benchmark(args.quick, args.json, model_path=args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
