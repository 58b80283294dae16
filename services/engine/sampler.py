"""Next-token selection for a batch of sequences, each with its own parameters.

Reproducibility: the random draw for output token ``i`` of a request comes from a
generator seeded with ``(seed, i)`` alone, and every filter is row-wise, so the
token a request gets does not depend on which other requests share the batch, on
the replica, or on whether the request was resumed from a partial output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.sequence import Sequence

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads (seed, index) over the seed space
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def draw_seed(seed: int, output_index: int) -> int:
    return ((seed ^ (output_index * _MIX)) * _MIX + output_index) & _MASK


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._generator = torch.Generator(device=device)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """``logits``: [len(seqs), vocab] float32, one row per sequence."""
        raw_logprobs = self._raw_logprobs(logits, seqs)
        logits = self._apply_penalties(logits, seqs)
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.greedy]
        token_ids = [0] * len(seqs)
        if greedy_rows:
            picked = logits[greedy_rows].argmax(dim=-1).tolist()
            for row, token in zip(greedy_rows, picked, strict=True):
                token_ids[row] = int(token)
        for row, seq in enumerate(seqs):
            if not seq.params.greedy:
                token_ids[row] = self._sample_row(logits[row], seq)
        return [self._result(row, token_ids[row], seqs[row], raw_logprobs) for row in range(len(seqs))]

    def _sample_row(self, row_logits: torch.Tensor, seq: Sequence) -> int:
        params = seq.params
        scores = row_logits / params.temperature
        # A temperature near zero (float32 allows 1e-45) overflows the division, and a
        # softmax over +inf is NaN: every token would tie. Shifted by the largest logit first,
        # the best token stays at 0 and the rest are finite or -inf: the near-greedy
        # distribution such a temperature asks for. Selected on the device (no sync), and
        # only when needed, so ordinary seeded outputs stay bit for bit what they were.
        shifted = (row_logits - row_logits.max()) / params.temperature
        scores = torch.where(torch.isfinite(scores).all(), scores, shifted)
        if params.top_k > 0 and params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if params.min_p > 0.0:
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, using one
        # seeded draw per vocabulary entry so the result depends on (seed, index) only.
        self._generator.manual_seed(draw_seed(seq.seed, seq.num_output_tokens))
        race = torch.empty_like(probs).exponential_(generator=self._generator)
        return int((probs / race).argmax().item())

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        penalized = [
            i
            for i, s in enumerate(seqs)
            if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty != 0.0
            or s.params.frequency_penalty != 0.0
        ]
        if not penalized:
            return logits
        logits = logits.clone()
        vocab = logits.shape[-1]
        for row in penalized:
            params = seqs[row].params
            if params.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seqs[row].token_ids)), device=logits.device)
                seen = seen[seen < vocab]
                values = logits[row, seen]
                penalized_values = torch.where(
                    values > 0, values / params.repetition_penalty, values * params.repetition_penalty
                )
                # A penalty near 0 or near the float32 limit overflows to +-inf, and an infinite
                # logit turns the softmax into NaN; the largest finite values still rank first
                # (or last), which is what such a penalty asks for.
                limit = torch.finfo(logits.dtype).max
                logits[row, seen] = penalized_values.clamp(min=-limit, max=limit)
            output = seqs[row].output_token_ids
            if output and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
                counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=vocab)[:vocab]
                logits[row] -= params.frequency_penalty * counts.to(logits.dtype)
                logits[row] -= params.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    @staticmethod
    def _raw_logprobs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor | None:
        if all(s.params.logprobs is None for s in seqs):
            return None
        return torch.log_softmax(logits, dim=-1)

    @staticmethod
    def _result(row: int, token_id: int, seq: Sequence, logprobs: torch.Tensor | None) -> SampledToken:
        if logprobs is None or seq.params.logprobs is None:
            return SampledToken(token_id)
        row_logprobs = logprobs[row]
        top: tuple[tuple[int, float], ...] = ()
        if seq.params.logprobs > 0:
            values, indices = torch.topk(row_logprobs, seq.params.logprobs)
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        return SampledToken(token_id, float(row_logprobs[token_id]), top)
