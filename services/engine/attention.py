"""Paged attention over a flat batch, in plain PyTorch (any device).

The step's new keys and values are first written into the paged cache; then
every query reads its sequence's context back from the cache through the
block table. The cache is head-major, ``[kv_heads, num_blocks, block_size,
head_dim]``: gathering blocks with ``index_select(1, ids)`` leaves each
(kv head, sequence) context as one contiguous run that SDPA reads in place.

Decode queries (one per sequence) are grouped by context length, and each
group runs as one ``scaled_dot_product_attention`` call padded only to the
group's own longest context, so a short sequence next to a long one does not
pay for the long one's padding. Each prefill chunk runs as one call whose
causal mask is shifted by the sequence's cached prefix.

Grouped-query attention never materialises repeated key/value heads: decode
folds a kv head's query heads into the query-length dimension, and prefill
leaves it to SDPA's ``enable_gqa``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.engine import native
from services.engine.attention_batch import AttentionBatch, KVCache, PrefillSpan

# A decode group costs a few kernel launches (two gathers, SDPA, the scatter
# back) on top of the bytes it reads. These express that fixed cost as
# key/value bytes, so grouping trades padding against calls. On CPU a call costs
# about as much as reading ~100 tokens of a small model's K/V (the engine
# benchmark is flat from 64 KiB to 1 MiB; one group per step is 2x slower); on
# accelerators the launches dwarf the bytes, so decodes there stay in one group
# unless padding is enormous.
_GROUP_COST_BYTES_CPU = 256 << 10
_GROUP_COST_BYTES_ACCELERATOR = 256 << 20
# Bounds the calls per layer whatever the lengths (the cost is raised until it fits).
_MAX_DECODE_GROUPS = 8


def _write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Stores the new tokens' keys and values ([T, kv_heads, head_dim]) at their cache slots."""
    k_cache, v_cache = kv_cache
    kv_heads, head_dim = k_cache.shape[0], k_cache.shape[3]
    # A slot indexes dim 1 of the [kv_heads, slots, head_dim] view of the cache.
    k_cache.view(kv_heads, -1, head_dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(kv_heads, -1, head_dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


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
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_decode = batch.num_decode_tokens
    if num_decode and not _decode_in_place(q[:num_decode], kv_cache, batch, scale, sliding_window, out):
        _decode(q[:num_decode], kv_cache, batch, scale, sliding_window, out[:num_decode])
    for span in batch.prefills:
        out[span.start : span.end] = _prefill(q, k, v, kv_cache, span, scale, sliding_window)
    return out


def _decode_in_place(
    q: torch.Tensor,
    kv_cache: KVCache,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
) -> bool:
    """Decode attention by the native kernel, reading each block where it lies; False if unavailable."""
    k_cache, v_cache = kv_cache
    if not native.supports(q.dtype, q.device):
        return False
    kernel = native.paged_decode_kernel()
    if kernel is None:
        return False
    num_seqs, num_heads, head_dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    tables, lens = batch.decode_block_tables, batch.decode_context_lens
    kv_heads, num_blocks, block_size, _ = k_cache.shape
    failed = kernel(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), tables.stride(0), lens.data_ptr(), out.data_ptr(),
        num_seqs, num_heads, kv_heads, head_dim, block_size, num_blocks,
        sliding_window or 0, scale, int(q.dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    return bool(failed == 0)


@dataclass(frozen=True)
class _DecodeGroup:
    """Decode sequences of similar context length, attended in one SDPA call."""

    rows: torch.Tensor | None  # [n] their rows in the decode batch; None: all rows, in order
    block_ids: torch.Tensor  # [n * num_blocks] their first num_blocks block ids, row by row
    num_seqs: int
    context_len: int  # the group's longest context: every row's keys are padded to it
    mask: torch.Tensor | None  # [1, n, 1, context_len] additive (0 / -inf); None when nothing is masked


def _decode(
    q: torch.Tensor,
    kv_cache: KVCache,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None,
    out: torch.Tensor,
) -> None:
    """One query per sequence, each seeing its whole context; writes [D, heads, head_dim] into ``out``."""
    k_cache, v_cache = kv_cache
    kv_heads, head_dim = k_cache.shape[0], k_cache.shape[3]
    num_seqs, num_heads, _ = q.shape
    group_size = num_heads // kv_heads
    out_by_kv_head = out.view(num_seqs, kv_heads, group_size, head_dim)
    for group in _decode_groups(batch, sliding_window, q.dtype, k_cache):
        n, length = group.num_seqs, group.context_len
        # [kv_heads, n * blocks, block, head_dim] -> [kv_heads, n, L, head_dim]: per (head, seq) contiguous.
        keys = k_cache.index_select(1, group.block_ids).view(kv_heads, n, -1, head_dim)[:, :, :length]
        values = v_cache.index_select(1, group.block_ids).view(kv_heads, n, -1, head_dim)[:, :, :length]
        queries = q if group.rows is None else q.index_select(0, group.rows)
        # SDPA sees batch=kv_heads, "heads"=sequences and the kv head's group_size query heads as the
        # query length: every query head shares its kv head's keys with no repeat and no GQA path.
        queries = queries.view(n, kv_heads, group_size, head_dim).transpose(0, 1)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.mask, scale=scale)
        if group.rows is None:
            out_by_kv_head.copy_(attended.transpose(0, 1))
        else:
            out_by_kv_head.index_copy_(0, group.rows, attended.transpose(0, 1))


# Every layer of a step attends with the same batch, so its grouping (and masks) is built once per step
# and kept with that batch: held weakly, so that a freed batch can never be mistaken for a new one, and
# swapped as one tuple, so that engines stepping in two threads never read each other's groups.
_GroupsKey = tuple[int | None, torch.dtype]  # (sliding window, query dtype)
_memo: tuple[weakref.ReferenceType[AttentionBatch], dict[_GroupsKey, tuple[_DecodeGroup, ...]]] | None = None


def _decode_groups(
    batch: AttentionBatch, sliding_window: int | None, dtype: torch.dtype, k_cache: torch.Tensor
) -> tuple[_DecodeGroup, ...]:
    global _memo
    memo = _memo
    if memo is None or memo[0]() is not batch:
        memo = _memo = (weakref.ref(batch), {})
    key = (sliding_window, dtype)
    groups = memo[1].get(key)
    if groups is None:
        groups = memo[1][key] = _build_decode_groups(batch, sliding_window, dtype, k_cache)
    return groups


def _build_decode_groups(
    batch: AttentionBatch, sliding_window: int | None, dtype: torch.dtype, k_cache: torch.Tensor
) -> tuple[_DecodeGroup, ...]:
    device = k_cache.device
    kv_heads, _, block_size, head_dim = k_cache.shape
    lens = batch.decode_context_lens.tolist()  # the step's one host sync on an accelerator
    order = sorted(range(len(lens)), key=lens.__getitem__)
    sorted_lens = [lens[i] for i in order]

    cost_bytes = _GROUP_COST_BYTES_CPU if device.type == "cpu" else _GROUP_COST_BYTES_ACCELERATOR
    token_bytes = 2 * kv_heads * head_dim * k_cache.element_size()
    group_cost = max(1, cost_bytes // token_bytes)
    ends = _split_by_length(sorted_lens, group_cost)
    while len(ends) > _MAX_DECODE_GROUPS:
        group_cost *= 2
        ends = _split_by_length(sorted_lens, group_cost)

    groups: list[_DecodeGroup] = []
    start = 0
    for end in ends:
        context_len = sorted_lens[end - 1]
        num_blocks = -(-context_len // block_size)
        if len(ends) == 1:
            # One group: keep the batch's own order, so no row gather or scatter is needed.
            rows, group_lens = None, lens
            tables = batch.decode_block_tables
        else:
            rows = torch.tensor(order[start:end], dtype=torch.long, device=device)
            group_lens = sorted_lens[start:end]
            tables = batch.decode_block_tables.index_select(0, rows)
        mask = _decode_mask(group_lens, context_len, sliding_window, dtype, device)
        block_ids = tables[:, :num_blocks].reshape(-1)
        groups.append(_DecodeGroup(rows, block_ids, end - start, context_len, mask))
        start = end
    return tuple(groups)


def _decode_mask(
    lens: list[int], context_len: int, sliding_window: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Additive mask hiding each row's padding and what lies outside its window; None if nothing is."""
    window_hides = sliding_window is not None and sliding_window < context_len
    if not window_hides and min(lens) == context_len:
        return None
    key_pos = torch.arange(context_len, device=device)
    row_lens = torch.tensor(lens, device=device)[:, None]
    hidden = key_pos >= row_lens
    if sliding_window is not None:
        hidden |= key_pos < row_lens - sliding_window
    # Float, in the queries' dtype: SDPA would otherwise convert a bool mask in every layer's call.
    mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
    return mask[None, :, None, :]


def _split_by_length(lens: list[int], group_cost: int) -> list[int]:
    """Splits ascending ``lens`` into consecutive groups; returns each group's end index.

    Minimises ``sum(group size * group's longest length) + group_cost * groups``:
    the padded tokens read plus each call's fixed cost. The dynamic program
    ``best[j] = group_cost + j * x + min_i(best[i] - i * x)`` with ``x = lens[j - 1]``
    takes the minimum over lines of slope ``-i`` added in order and queried at
    non-decreasing ``x`` (the monotone convex-hull trick), so the split is
    optimal in O(len(lens)) even for large batches.
    """
    n = len(lens)
    best = [0] * (n + 1)
    cut = [0] * (n + 1)  # start of the last group of the best split of lens[:j]
    hull = [0]  # group starts whose lines can still be the minimum, slopes decreasing
    head = 0

    def at(i: int, x: int) -> int:
        return best[i] - i * x

    for j in range(1, n + 1):
        x = lens[j - 1]
        # x never decreases, so a line beaten by the next one at x stays beaten.
        while head + 1 < len(hull) and at(hull[head + 1], x) <= at(hull[head], x):
            head += 1
        i = hull[head]
        best[j] = at(i, x) + j * x + group_cost
        cut[j] = i
        # Drop the last line when the new one overtakes the one before it no later than it does.
        while len(hull) - head >= 2:
            a, b = hull[-2], hull[-1]
            if (best[j] - best[a]) * (b - a) > (best[b] - best[a]) * (j - a):
                break
            hull.pop()
        hull.append(j)

    ends = []
    j = n
    while j:
        ends.append(j)
        j = cut[j]
    return ends[::-1]


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
        keys = _gather_context(kv_cache[0], span.block_table, span.context_len)
        values = _gather_context(kv_cache[1], span.block_table, span.context_len)
        key_pos = torch.arange(span.context_len, device=q.device)
        query_pos = torch.arange(prefix_len, span.context_len, device=q.device)[:, None]
        mask = key_pos <= query_pos
        if sliding_window is not None:
            mask &= key_pos > query_pos - sliding_window
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One sequence's first ``context_len`` cached vectors, [1, kv_heads, L, head_dim].

    With the head-major layout the gathered blocks of each kv head are already
    one contiguous run, returned as a view without another copy.
    """
    kv_heads, head_dim = cache.shape[0], cache.shape[3]
    blocks = cache.index_select(1, block_table)  # [kv_heads, blocks, block_size, head_dim]
    return blocks.view(kv_heads, -1, head_dim)[None, :, :context_len]
