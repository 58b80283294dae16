"""The narrow contract between the model runner and the model's attention.

One engine step runs a flat batch of ``T`` new tokens. Decode tokens come
first (one per decoding sequence), then the prefill chunks, each contiguous.
The KV cache of every layer is a pair of tensors of shape
``[num_kv_heads, num_blocks, block_size, head_dim]``; a token's *slot* is
``block_id * block_size + offset``, its index along the flattened middle two
dimensions. Heads come first so that gathering a sequence's blocks leaves each
head's context contiguous, ready for attention to read without another copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KVCache = tuple[torch.Tensor, torch.Tensor]  # (keys, values) of one layer


@dataclass(frozen=True)
class PrefillSpan:
    """One sequence's prefill chunk inside the flat batch."""

    start: int  # index of the chunk's first token in the flat batch
    end: int  # one past its last token
    context_len: int  # tokens of the sequence in the cache after this step (cached prefix + chunk)
    block_table: torch.Tensor  # [ceil(context_len / block_size)] int64 block ids


@dataclass(frozen=True)
class AttentionBatch:
    """Where each new token's K/V goes and what each query attends to."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot written by each new token
    num_decode_tokens: int  # decode tokens occupy [0, num_decode_tokens) of the flat batch
    decode_block_tables: torch.Tensor  # [D, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor  # [D] int64, including the token being decoded
    max_decode_context_len: int  # max of decode_context_lens, as a Python int (0 when D == 0)
    prefills: tuple[PrefillSpan, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
