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

The pieces: ``pipeline_plan`` (plan, workload), ``pipeline_runs`` (the two sides),
``pipeline_probes`` and ``proc_cpu`` (the breakdown), ``stats`` and ``pipeline_report``
(the numbers, the result document and its table).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.pipeline_plan import LOW, PipelinePlan, demo_prompts, make_workload, plan_for
from loadtest.pipeline_probes import probe_detokenizer, probe_tokenizer
from loadtest.pipeline_report import assemble, format_table
from loadtest.pipeline_runs import Log, run_in_process_side, run_stack_side
from loadtest.report import write_json
from loadtest.stats import token_agreement
from services.edge_config import GRPC_INGRESS_MODES

# demo_prompts: loadtest/locustfile.py imports it from here
__all__ = ["demo_prompts", "main", "run_pipeline_benchmark", "run_plan"]


def run_pipeline_benchmark(
    quick: bool, json_path: Path | None, *, model_path: str | None = None, grpc_ingress: str | None = None
) -> dict[str, Any]:
    """Run the benchmark, print the table, write JSON to ``json_path`` if given; return the results.

    ``model_path``: a checkpoint directory with a tokenizer; None builds (or reuses) the demo model.
    """
    return run_plan(plan_for(quick), json_path, model_path=model_path, log=_stderr, grpc_ingress=grpc_ingress)


def run_plan(
    plan: PipelinePlan,
    json_path: Path | None,
    *,
    model_path: str | None,
    log: Log,
    grpc_ingress: str | None = None,
) -> dict[str, Any]:
    import torch

    from services.config import EngineSettings
    from services.tokenizer.tokenizer import PromptTokenizer

    path = model_path or _demo_model_path(log)
    settings = EngineSettings()
    tokenizer = PromptTokenizer(path)
    workload = make_workload(plan, tokenizer)

    in_process, samples = run_in_process_side(path, settings, workload, log)
    stack, stack_samples, extra = run_stack_side(
        path, settings, workload, plan.probe_samples, plan.rest_s, log, grpc_ingress
    )
    samples.update(stack_samples)
    samples["tokenize_encode"] = probe_tokenizer(tokenizer, workload.all_texts(), plan.probe_samples)
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
    parser.add_argument(
        "--grpc-ingress", choices=GRPC_INGRESS_MODES, default=None, help="default: AppConfig's"
    )
    args = parser.parse_args(argv)
    run_pipeline_benchmark(args.quick, args.json, model_path=args.model, grpc_ingress=args.grpc_ingress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
