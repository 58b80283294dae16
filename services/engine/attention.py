"""Paged attention over a flat batch, in plain PyTorch (any device).

The step's new keys and values are first written into the paged cache; then
every query reads its sequence's context back from the cache through the
block table. Decode queries (one per sequence) run as one batched
``scaled_dot_product_attention`` call; each prefill chunk runs as one call
whose causal mask is shifted by the sequence's cached prefix.

Grouped-query attention is left to SDPA (``enable_gqa``), which reads each
key/value head for its whole group instead of materialising repeated heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.attention_batch import AttentionBatch, KVCache, PrefillSpan


def _write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Stores the new tokens' keys and values ([T, kv_heads, head_dim]) at their cache slots."""
    k_cache, v_cache = kv_cache
    slots_shape = (-1, *k_cache.shape[2:])
    k_cache.view(slots_shape).index_copy_(0, slot_mapping, k)
    v_cache.view(slots_shape).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of a flat batch against the paged cache.

    ``q`` is [T, heads, head_dim]; ``k`` and ``v`` are [T, kv_heads, head_dim]
    (the step's new tokens, written to the cache here before anything is read).
    ``sliding_window`` limits each query to the last ``sliding_window`` positions,
    itself included. Returns [T, heads, head_dim].
    """
    _write_kv(k, v, kv_cache, batch.slot_mapping)
    num_decode = batch.num_decode_tokens
    if not batch.prefills:
        if not num_decode:
            return torch.empty_like(q)
        return _decode(q, kv_cache, batch, scale, sliding_window)

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_decode:
        out[:num_decode] = _decode(q[:num_decode], kv_cache, batch, scale, sliding_window)
    for span in batch.prefills:
        out[span.start : span.end] = _prefill(q, k, v, kv_cache, span, scale, sliding_window)
    return out


def _decode(
    q: torch.Tensor, kv_cache: KVCache, batch: AttentionBatch, scale: float, sliding_window: int | None
) -> torch.Tensor:
    """One query per sequence; each sees its whole context, gathered from its blocks."""
    num_seqs, num_heads, head_dim = q.shape
    context_len = batch.max_decode_context_len
    keys = _gather(kv_cache[0], batch.decode_block_tables, context_len)  # [D, kv_heads, L, head_dim]
    values = _gather(kv_cache[1], batch.decode_block_tables, context_len)

    mask: torch.Tensor | None = None
    # A lone sequence fills the gathered length exactly, so only a window needs masking.
    if num_seqs > 1 or (sliding_window is not None and sliding_window < context_len):
        key_pos = torch.arange(context_len, device=q.device)
        lens = batch.decode_context_lens[:, None]
        mask = key_pos < lens
        if sliding_window is not None:
            mask &= key_pos >= lens - sliding_window
        mask = mask[:, None, None, :]  # broadcast over heads and the single query

    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    span: PrefillSpan,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """A chunk's queries attend causally to the cached prefix plus the chunk itself."""
    chunk = slice(span.start, span.end)
    num_new = span.end - span.start
    prefix_len = span.context_len - num_new
    queries = q[chunk].transpose(0, 1)[None]  # [1, heads, n, head_dim]

    if prefix_len == 0 and (sliding_window is None or sliding_window >= num_new):
        # Nothing cached before the chunk: its own keys are the whole context.
        keys, values = k[chunk].transpose(0, 1)[None], v[chunk].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(
            queries, keys, values, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        table = span.block_table[None]
        keys = _gather(kv_cache[0], table, span.context_len)
        values = _gather(kv_cache[1], table, span.context_len)
        key_pos = torch.arange(span.context_len, device=q.device)
        query_pos = torch.arange(prefix_len, span.context_len, device=q.device)[:, None]
        mask = key_pos <= query_pos
        if sliding_window is not None:
            mask &= key_pos > query_pos - sliding_window
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, context_len: int) -> torch.Tensor:
    """[B, max_blocks] block ids -> the first ``context_len`` cached vectors, [B, kv_heads, L, head_dim].

    ``index_select`` over whole blocks is one contiguous copy per block; the
    result is returned as a strided view that SDPA reads without another copy.
    """
    num_rows = block_tables.shape[0]
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    blocks = cache.index_select(0, block_tables[:, :num_blocks].reshape(-1))
    tokens = blocks.view(num_rows, num_blocks * block_size, *cache.shape[2:])[:, :context_len]
    return tokens.transpose(1, 2)
