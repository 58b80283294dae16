"""The result document of `tokenline bench pipeline` and the table printed from it (pure).

``assemble`` joins both sides' summaries, the per-stage samples and the run's facts into
one dictionary: flat headline numbers (``HEADLINE_KEYS``), stages, latency budgets and
targets; ``format_table`` prints it. JSON goes through ``loadtest.report.write_json``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.pipeline_plan import CONCURRENCIES, HIGH, LOW
from loadtest.stats import percentile

# name -> (result key, bound, "min" or "max"): the pipeline's targets on the 2-core CPU.
TARGETS: dict[str, tuple[str, float, str]] = {
    "ratio_throughput_c16": ("ratio_throughput_c16", 0.85, "min"),
    "ttft_p50_added_ms": ("ttft_p50_added_ms", 15.0, "max"),
    "itl_p50_added_ms": ("itl_p50_added_ms", 2.0, "max"),
    "stack_cpu_us_per_token": ("stack_cpu_us_per_token", 300.0, "max"),
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


def is_stack_process(label: str) -> bool:
    """Every process of the stack but the engine replicas and the benchmark's own client:
    ingress, detokenizer, tokenizer, proxy if any, Redis, Ray's own."""
    return "engine-" not in label and not label.startswith("this process")


def stack_cpu_s(cpu: Mapping[str, Any]) -> float:
    """CPU seconds of the stack's processes (``is_stack_process``) in a ``cpu_delta`` breakdown."""
    return sum(float(row["cpu_s"]) for label, row in cpu["processes"].items() if is_stack_process(label))


def stack_cpu_us_per_token(cpu: Mapping[str, Any]) -> float:
    """The stack's CPU (``stack_cpu_s``) per token streamed at c=16, in microseconds. NaN
    without a CPU breakdown (not Linux)."""
    if not cpu or not cpu.get("output_tokens"):
        return float("nan")
    return 1e6 * stack_cpu_s(cpu) / float(cpu["output_tokens"])


def stack_cpu_split(during: Mapping[str, Any], at_rest: Mapping[str, Any]) -> dict[str, float]:
    """``stack_cpu_us_per_token`` split into the part the stack spends at rest whatever it
    streams (its rate at rest spread over the c=16 run's tokens per second: the floor at that
    throughput) and the rest, which streaming adds. NaN where either breakdown is missing."""
    if not during or not during.get("output_tokens") or not at_rest or not at_rest.get("wall_s"):
        keys = (
            "stack_cpu_at_rest_ms_per_s",
            "stack_cpu_floor_us_per_token",
            "stack_cpu_streaming_us_per_token",
        )
        return dict.fromkeys(keys, float("nan"))
    rest_rate = stack_cpu_s(at_rest) / float(at_rest["wall_s"])  # CPU seconds per second
    tokens_per_s = float(during["output_tokens"]) / float(during["wall_s"])
    floor = 1e6 * rest_rate / tokens_per_s
    return {
        "stack_cpu_at_rest_ms_per_s": 1e3 * rest_rate,
        "stack_cpu_floor_us_per_token": floor,
        "stack_cpu_streaming_us_per_token": stack_cpu_us_per_token(during) - floor,
    }


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
        "cpu_at_rest": {},
        "redis_commands_c16": {},
        **extra,
        "greedy_agreement": agreement,
    }
    results["stack_cpu_us_per_token"] = stack_cpu_us_per_token(results["cpu_during_stack_c16"])
    results.update(stack_cpu_split(results["cpu_during_stack_c16"], results["cpu_at_rest"]))
    results["latency_budgets"] = latency_budgets(results)
    results["targets"] = check_targets(results)
    return results


def format_table(results: Mapping[str, Any]) -> str:
    model, workload, settings = results["model"], results["workload"], results["engine_settings"]
    lines = [
        f"tokenline bench pipeline  {results['date']}  (quick={results['quick']}, "
        f"gRPC ingress: {results.get('grpc_ingress', '?')})",
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
    rows = (
        ("tok/s", "tok_s"),
        ("TTFT p50 ms", "ttft_p50_ms"),
        ("TTFT p99 ms", "ttft_p99_ms"),
        ("ITL p50 ms", "itl_p50_ms"),
        ("ITL p99 ms", "itl_p99_ms"),
        ("ITL mean ms", "itl_mean_ms"),
        ("TPOT p50 ms", "tpot_p50_ms"),
        ("e2e p50 ms", "e2e_p50_ms"),
        ("tokens/msg", "tokens_per_message"),
    )
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
    lines.append(
        f"stack CPU (all but engines and the client): {results['stack_cpu_us_per_token']:.0f} us/token"
    )
    rest = results["cpu_at_rest"]
    if rest:
        lines += [
            f"  at rest ({rest['wall_s']:.0f} s, nothing streaming) the stack spends "
            f"{results['stack_cpu_at_rest_ms_per_s']:.1f} ms of CPU per s: "
            f"{results['stack_cpu_floor_us_per_token']:.0f} us/token at the c={HIGH} throughput; "
            f"streaming adds {results['stack_cpu_streaming_us_per_token']:.0f}",
        ]
        at_rest = (
            f"{name} {1e3 * row['cpu_s'] / rest['wall_s']:.1f}"
            for name, row in rest["processes"].items()
            if is_stack_process(name)
        )
        lines.append("  at rest, ms of CPU per s: " + ", ".join(at_rest))
    commands = results["redis_commands_c16"]
    if commands:
        most = ", ".join(f"{name} {count:.2f}" for name, count in list(commands["by_command"].items())[:8])
        lines.append(
            f"Redis commands per request during the c={HIGH} run (inside scripts included): "
            f"{commands['total']:.1f} ({most}, ...)"
        )
    lines += ["", f"greedy agreement, stack vs in-process: {results['greedy_agreement']:.2f}", "targets:"]
    for name, target in results["targets"].items():
        sign = ">=" if target["kind"] == "min" else "<="
        verdict = "met" if target["met"] else "MISSED"
        lines.append(f"  {name:<24}{target['value']:>9.2f}  ({sign} {target['target']:g})  {verdict}")
    return "\n".join(lines)
