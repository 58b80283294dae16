"""The two sides of `tokenline bench pipeline` under the same closed-loop load.

- in-process: one ``Engine`` driven with ``add_request``/``step``; each token is stamped
  when the ``step`` that made it returns;
- stack: ``running_stack`` with one engine replica; ``c`` callers on one asyncio gRPC channel
  call ``GenerateStream`` with the prompt text; each token is stamped when its message arrives.

Each side warms up untimed, then runs every concurrency of ``CONCURRENCIES`` in turn.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loadtest.pipeline_plan import CONCURRENCIES, HIGH, Workload
from loadtest.pipeline_probes import probe_queue, probe_rpcs
from loadtest.pipeline_stack import engine_steps, issue_api_key, stack_config, wait_ready
from loadtest.proc_cpu import cpu_by_process, cpu_delta
from loadtest.redis_commands import command_calls, commands_per_request
from loadtest.stats import RequestTrace, summarize

if TYPE_CHECKING:
    from services.config import EngineSettings
    from services.engine.engine import Engine

Log = Callable[[str], None]

STREAM_TIMEOUT_S = 300.0


def run_in_process(
    engine: Engine, prompts: Sequence[Sequence[int]], output_tokens: int, concurrency: int, tag: str
) -> tuple[list[RequestTrace], list[float]]:
    """Closed loop on ``engine``: keep ``concurrency`` requests in it; stamp each token when
    the step that made it returns. Returns the traces and every step's duration."""
    from loadtest.ours import greedy_params

    params = greedy_params(output_tokens)
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
    """``concurrency`` callers on one asyncio gRPC channel, each streaming its next request as
    soon as its previous one ended; a token is stamped when the message carrying it arrives.
    One event loop rather than a thread per caller: the load generator shares the machine
    with the stack it measures, and 16 threads contending for one interpreter cost it ~20 %
    more CPU per token."""

    def __init__(
        self, target: str, api_key: str, prompts: Sequence[str], output_tokens: int, tag: str
    ) -> None:
        self._target = target
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._prompts = prompts
        self._output_tokens = output_tokens
        self._tag = tag
        self._pending = iter(range(len(prompts)))
        self.traces = [RequestTrace() for _ in prompts]

    def run(self, concurrency: int) -> list[RequestTrace]:
        try:
            asyncio.run(self._run(concurrency))
        except Exception as error:
            raise RuntimeError(f"stack load at c={concurrency} failed: {error!r}") from error
        return self.traces

    async def _run(self, concurrency: int) -> None:
        import grpc

        from services.proto.tokenline.v1 import generation_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(self._target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            async with asyncio.TaskGroup() as callers:  # the first failure cancels the rest
                for _ in range(concurrency):
                    callers.create_task(self._caller(stub))

    async def _caller(self, stub: Any) -> None:
        from services.proto.tokenline.v1 import generation_pb2 as pb

        for index in self._pending:
            sampling = pb.SamplingParams(
                max_tokens=self._output_tokens, temperature=0.0, ignore_eos=True, seed=index
            )
            request = pb.GenerateRequest(
                request_id=f"{self._tag}-{index}", text=self._prompts[index], sampling=sampling
            )
            trace = self.traces[index]
            trace.start = time.perf_counter()
            async for message in stub.GenerateStream(
                request, timeout=STREAM_TIMEOUT_S, metadata=self._metadata
            ):
                if message.token_ids:
                    trace.add(time.perf_counter(), list(message.token_ids))


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


@dataclass
class Side:
    """One side's results: summary per concurrency and the tokens it produced."""

    summaries: dict[int, dict[str, float]] = field(default_factory=dict)
    outputs: dict[int, list[list[int]]] = field(default_factory=dict)

    def record(self, name: str, c: int, traces: Sequence[RequestTrace], output_tokens: int, log: Log) -> None:
        check_delivered(f"{name} c={c}", traces, output_tokens)
        self.summaries[c] = summary = summarize(traces)
        self.outputs[c] = [t.token_ids for t in traces]
        log(
            f"  {name} c={c}: {summary['tok_s']:.1f} tok/s, TTFT p50 {summary['ttft_p50_ms']:.2f} ms, "
            f"ITL p50 {summary['itl_p50_ms']:.2f} ms"
        )

    def all_outputs(self) -> list[list[int]]:
        return [ids for c in CONCURRENCIES for ids in self.outputs[c]]


def run_in_process_side(
    path: str, settings: EngineSettings, workload: Workload, log: Log
) -> tuple[Side, dict[str, list[float]]]:
    """The in-process side, with the replica's torch thread count; also every step's duration."""
    import torch

    from services.engine.engine import Engine

    side, steps = Side(), {}
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


def run_stack_side(
    path: str,
    settings: EngineSettings,
    workload: Workload,
    probe_samples: int,
    rest_s: float,
    log: Log,
    grpc_ingress: str | None = None,
) -> tuple[Side, dict[str, list[float]], dict[str, Any]]:
    """The stack side; also the stage probes that need the live stack, and the replica's step
    count, the CPU per process during the c=16 run and during ``rest_s`` seconds at rest
    after the warm-up (``extra``)."""
    from services.server import running_stack

    side = Side()
    config = stack_config(path, settings, grpc_ingress)
    extra: dict[str, Any] = {
        "stack_engine_loop": {},
        "cpu_during_stack_c16": {},
        "cpu_at_rest": {},
        "redis_commands_c16": {},
        "grpc_ingress": config.grpc_ingress,
    }
    log(f"starting the stack: private Redis, local Ray, Serve gRPC ({config.grpc_ingress}), 1 engine replica")
    with running_stack(config) as running:
        api_key = issue_api_key(running.config)
        wait_ready(running.grpc_target, api_key)
        target = running.grpc_target
        run_stack_load(target, api_key, workload.texts[0], workload.output_tokens, HIGH, "warmup")
        log(f"stack at rest: {rest_s:g} s")
        extra["cpu_at_rest"] = cpu_at_rest(rest_s)
        for c in CONCURRENCIES:
            log(f"stack: {len(workload.texts[c])} requests at concurrency {c}")
            commands_before = command_calls(running.config.redis_url)
            steps_before, cpu_before = engine_steps(config.app_name), cpu_by_process(os.getpid())
            traces = run_stack_load(target, api_key, workload.texts[c], workload.output_tokens, c, f"c{c}")
            steps_after, cpu_after = engine_steps(config.app_name), cpu_by_process(os.getpid())
            commands_after = command_calls(running.config.redis_url)
            side.record("stack", c, traces, workload.output_tokens, log)
            if c != HIGH:
                continue
            summary = side.summaries[c]
            extra["cpu_during_stack_c16"] = cpu_delta(
                cpu_before, cpu_after, int(summary["output_tokens"]), summary["wall_s"]
            )
            extra["redis_commands_c16"] = commands_per_request(commands_before, commands_after, len(traces))
            if steps_before is not None and steps_after is not None and steps_after > steps_before:
                steps = steps_after - steps_before
                extra["stack_engine_loop"] = {
                    "steps": steps,
                    "ms_per_step": 1e3 * summary["wall_s"] / steps,
                    "how": f"wall of the c={HIGH} run / engine steps it took (ReplicaStatus.steps)",
                }
        log(f"stage probes: {probe_samples} samples each")
        samples = probe_rpcs(target, api_key, workload.all_texts(), probe_samples)
        samples.update(probe_queue(running.config.redis_url, running.config.queue, probe_samples))
    return side, samples, extra


def cpu_at_rest(seconds: float) -> dict[str, Any]:
    """CPU per process while the stack streams nothing: what Ray, Serve, Redis and each replica
    spend whatever the load (their timers, health checks, metrics, control loops)."""
    before, start = cpu_by_process(os.getpid()), time.perf_counter()
    time.sleep(seconds)
    return cpu_delta(before, cpu_by_process(os.getpid()), 0, time.perf_counter() - start)
