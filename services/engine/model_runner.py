"""Turns a scheduled step into tensors, runs the model and returns the logits to sample from."""

from __future__ import annotations

import torch

from services.engine.attention_batch import AttentionBatch, KVCache, PrefillSpan
from services.engine.config import EngineConfig
from services.engine.models import ModelSpec, load_model
from services.engine.scheduler import SchedulerOutput
from services.engine.sequence import Sequence

_GIB = 1 << 30


class ModelRunner:
    """Owns the model weights and the paged KV cache of one engine."""

    def __init__(self, config: EngineConfig) -> None:
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.model, self.spec = load_model(config.model, self.device, self.dtype)
        self.num_blocks = config.num_kv_blocks or self._blocks_for_memory(config.kv_cache_memory_gib)
        # Head-major (see attention_batch): a gathered context is contiguous per kv head.
        shape = (self.spec.num_kv_heads, self.num_blocks, self.block_size, self.spec.head_dim)
        self.kv_caches: list[KVCache] = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.spec.num_layers)
        ]

    @property
    def model_spec(self) -> ModelSpec:
        return self.spec

    def _blocks_for_memory(self, gib: float) -> int:
        bytes_per_block = (
            2
            * self.spec.num_layers
            * self.block_size
            * self.spec.num_kv_heads
            * self.spec.head_dim
            * torch.empty((), dtype=self.dtype).element_size()
        )
        return max(1, int(gib * _GIB) // bytes_per_block)

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; return float32 logits [N, vocab] for the N sequences that sample now."""
        input_ids, positions, batch, sample_rows, sampling_seqs = self._prepare(step)
        hidden = self.model(input_ids, positions, batch, self.kv_caches)
        if not sample_rows:
            return torch.empty((0, self.spec.vocab_size), dtype=torch.float32), []
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return logits, sampling_seqs

    def _prepare(
        self, step: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, list[int], list[Sequence]]:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling_seqs: list[Sequence] = []
        block_size = self.block_size

        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for seq in step.decodes:
            position = seq.num_computed_tokens
            token_ids.append(seq.token_ids[position])
            positions.append(position)
            slots.append(seq.block_table[position // block_size] * block_size + position % block_size)
            decode_tables.append(seq.block_table)
            decode_lens.append(position + 1)
            sample_rows.append(len(token_ids) - 1)
            sampling_seqs.append(seq)

        spans: list[PrefillSpan] = []
        for chunk in step.prefills:
            seq = chunk.seq
            start = seq.num_computed_tokens
            end = start + chunk.num_tokens
            span_start = len(token_ids)
            token_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            num_blocks = -(-end // block_size)
            spans.append(
                PrefillSpan(
                    start=span_start,
                    end=len(token_ids),
                    context_len=end,
                    block_table=torch.tensor(table[:num_blocks], dtype=torch.long, device=self.device),
                )
            )
            if chunk.completes_prefill:
                sample_rows.append(len(token_ids) - 1)
                sampling_seqs.append(seq)

        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decode_tokens=len(step.decodes),
            decode_block_tables=torch.tensor(padded, dtype=torch.long, device=self.device).reshape(
                len(padded), width
            ),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long, device=self.device),
            max_decode_context_len=max(decode_lens, default=0),
            prefills=tuple(spans),
        )
        return (
            torch.tensor(token_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            batch,
            sample_rows,
            sampling_seqs,
        )
