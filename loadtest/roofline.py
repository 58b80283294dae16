"""Batch-1 decode speed against the memory-bandwidth roofline.

At batch 1 every decode step must stream every weight matrix from DRAM once
(the weights are far larger than any cache) and does only 2 FLOPs per 4-byte
float32 weight -- far too little arithmetic to hide the memory traffic. So the
best possible decode rate is ``bandwidth / bytes read per step``, with the
bandwidth measured in the same run.

The required bandwidth is STREAM's "copy": ``dst.copy_(src)`` over buffers many
times the last-level cache. Each element is read once from ``src`` and written
once to ``dst``, so one copy moves ``2 * nbytes`` -- that is what we count, as
STREAM does. A CPU that write-allocates also reads each ``dst`` line before
overwriting it, so the DRAM physically carries up to ``3 * nbytes``; that hidden
read is not counted, which makes copy bandwidth a bit *lower* than what a pure
read stream (decode's pattern) can reach. So we also report a read-only
bandwidth measured with a large matrix-vector product -- exactly decode's access
pattern -- and the ratio against it, the stricter of the two. Best of several
repetitions: a roofline is what the machine can do, and other processes on a
shared machine only ever make a repetition slower. Both bandwidths use the
run's torch thread count, the same the engine decodes with.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loadtest.bench_model import BenchModel
from loadtest.ours import greedy_params
from services.engine.engine import Engine

_GB = 1e9


@dataclass(frozen=True)
class BandwidthMeasurement:
    copy_gb_s: float  # 2 * nbytes per copy (read src + write dst), best repetition
    read_gb_s: float  # matrix bytes per matrix-vector product, best repetition
    buffer_bytes: int
    repetitions: int


def _best_seconds(action: Callable[[], object], repetitions: int) -> float:
    action()  # first touch: page faults belong to allocation, not to bandwidth
    best = float("inf")
    for _ in range(repetitions):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(buffer_bytes: int = 256 << 20, repetitions: int = 8) -> BandwidthMeasurement:
    """Copy and read-stream bandwidth over ``buffer_bytes`` float32 buffers, in GB/s (1e9 bytes/s)."""
    columns = 4096
    rows = max(1, buffer_bytes // 4 // columns)
    src = torch.ones(rows * columns, dtype=torch.float32)
    dst = torch.zeros_like(src)
    nbytes = src.numel() * src.element_size()
    copy_s = _best_seconds(lambda: dst.copy_(src), repetitions)
    matrix, vector = src.view(rows, columns), torch.ones(columns, dtype=torch.float32)
    read_s = _best_seconds(lambda: torch.mv(matrix, vector), repetitions)
    return BandwidthMeasurement(
        copy_gb_s=2 * nbytes / copy_s / _GB,
        read_gb_s=nbytes / read_s / _GB,
        buffer_bytes=nbytes,
        repetitions=repetitions,
    )


@dataclass(frozen=True)
class DecodeMeasurement:
    tok_s: float  # best repetition, comparable with the best-of bandwidth
    median_tok_s: float
    tok_s_per_repetition: tuple[float, ...]
    decode_steps: int
    prompt_len: int


def measure_decode_b1(
    engine: Engine, prompt_len: int, decode_steps: int, vocab_size: int, repetitions: int = 3
) -> DecodeMeasurement:
    """Decode tokens/s of one request alone, prefill excluded, best of ``repetitions``.

    In each repetition the first ``step`` prefills the prompt and samples the first
    token; the clock starts after it, so only the ``decode_steps`` one-token steps
    are timed.
    """
    prompt = [3 + (i * 7919) % (vocab_size - 3) for i in range(prompt_len)]
    engine.generate([prompt], greedy_params(4))  # warm-up, untimed
    rates = []
    for repetition in range(repetitions):
        engine.add_request(f"decode-b1-{repetition}", prompt, greedy_params(decode_steps + 1))
        engine.step()
        tokens = 0
        start = time.perf_counter()
        while engine.has_unfinished():
            tokens += len(engine.step())
        wall = time.perf_counter() - start
        if tokens != decode_steps:
            raise AssertionError(f"batch-1 decode produced {tokens} tokens, expected {decode_steps}")
        rates.append(tokens / wall)
    return DecodeMeasurement(
        tok_s=max(rates),
        median_tok_s=statistics.median(rates),
        tok_s_per_repetition=tuple(rates),
        decode_steps=decode_steps,
        prompt_len=prompt_len,
    )


@dataclass(frozen=True)
class RooflineReport:
    decode_b1_tok_s: float
    decode_b1_tok_s_per_repetition: tuple[float, ...]
    copy_bandwidth_gb_s: float
    read_bandwidth_gb_s: float
    weight_bytes_per_step: int

    @property
    def roofline_tok_s(self) -> float:
        return self.copy_bandwidth_gb_s * _GB / self.weight_bytes_per_step

    @property
    def read_roofline_tok_s(self) -> float:
        return self.read_bandwidth_gb_s * _GB / self.weight_bytes_per_step

    @property
    def ratio(self) -> float:
        return self.decode_b1_tok_s / self.roofline_tok_s

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "decode_b1_tok_s": self.decode_b1_tok_s,
            "decode_b1_tok_s_per_repetition": list(self.decode_b1_tok_s_per_repetition),
            "copy_bandwidth_gb_s": self.copy_bandwidth_gb_s,
            "decode_b1_weight_bytes_per_step": self.weight_bytes_per_step,
            "decode_b1_roofline_tok_s": self.roofline_tok_s,
            "decode_b1_roofline_ratio": self.ratio,
            "read_bandwidth_gb_s": self.read_bandwidth_gb_s,
            "decode_b1_read_roofline_tok_s": self.read_roofline_tok_s,
            "decode_b1_read_roofline_ratio": self.decode_b1_tok_s / self.read_roofline_tok_s,
        }


def roofline_report(
    model: BenchModel, decode: DecodeMeasurement, bandwidth: BandwidthMeasurement
) -> RooflineReport:
    """Roofline from the weights one step must read (the embedding table excluded: one row per step).

    The KV cache a step reads at this context (~150 tokens) is under 1% of the
    weights and is left out; both omissions raise the roofline, so only lower the ratio.
    """
    return RooflineReport(
        decode_b1_tok_s=decode.tok_s,
        decode_b1_tok_s_per_repetition=decode.tok_s_per_repetition,
        copy_bandwidth_gb_s=bandwidth.copy_gb_s,
        read_bandwidth_gb_s=bandwidth.read_gb_s,
        weight_bytes_per_step=model.decode_weight_bytes,
    )
