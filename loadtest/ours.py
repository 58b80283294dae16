"""Contender 1: our engine, every request submitted at once to ``Engine.generate``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.contender import ContenderResult, Stopwatch
from loadtest.workload import Workload
from services.engine import EngineConfig, SamplingParams
from services.engine.engine import Engine


@dataclass(frozen=True)
class EngineSettings:
    """The engine knobs the benchmark picks; the same ``max_batch_size`` binds every contender."""

    max_batch_size: int
    max_num_batched_tokens: int
    kv_cache_memory_gib: float
    block_size: int = 16
    dtype: str = "float32"

    def engine_config(self, model_dir: Path) -> EngineConfig:
        return EngineConfig(
            model=str(model_dir),
            device="cpu",
            dtype=self.dtype,
            max_num_seqs=self.max_batch_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            kv_cache_memory_gib=self.kv_cache_memory_gib,
            block_size=self.block_size,
        )


def build_engine(model_dir: Path, settings: EngineSettings) -> Engine:
    return Engine(settings.engine_config(model_dir))


def greedy_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def warm_up(engine: Engine, vocab_size: int) -> None:
    """One short request so one-time costs (allocator growth, lazy init) are not timed."""
    engine.generate([[3 + i % (vocab_size - 3) for i in range(32)]], greedy_params(4))


def run_ours(engine: Engine, workload: Workload) -> ContenderResult:
    """Time one ``generate`` call over the whole workload (prefill included)."""
    params = [greedy_params(n) for n in workload.output_lengths]
    before = asdict(engine.stats)
    with Stopwatch() as clock:
        outs = engine.generate(workload.prompts, params)
    after = asdict(engine.stats)
    stats = {key: after[key] - before[key] for key in after}
    return ContenderResult(
        name="ours",
        wall_s=clock.wall_s,
        cpu_s=clock.cpu_s,
        outputs=[list(out.token_ids) for out in outs],
        details={"engine_stats": stats},
    )
