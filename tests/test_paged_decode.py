"""The native in-place decode attention against the PyTorch gather-and-SDPA path it replaces."""

from __future__ import annotations

import random

import pytest
import torch

from services.engine import attention, native
from services.engine.attention_batch import AttentionBatch


def _decode_batch(lens: list[int], block_size: int, num_blocks: int, seed: int) -> AttentionBatch:
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks scattered over the cache, as after many allocations and frees
    tables = []
    for length in lens:
        tables.append([free.pop() for _ in range(-(-length // block_size))])
    width = max(len(t) for t in tables)
    slots = [
        t[(n - 1) // block_size] * block_size + (n - 1) % block_size
        for t, n in zip(tables, lens, strict=True)
    ]
    return AttentionBatch(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=len(lens),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_context_lens=torch.tensor(lens),
        max_decode_context_len=max(lens),
        prefills=(),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
def test_native_decode_matches_pytorch_path(dtype: torch.dtype, window: int | None) -> None:
    if native.paged_decode_kernel() is None:
        pytest.skip("the native kernel could not be built here (no C compiler?); the PyTorch path is in use")
    torch.manual_seed(0)
    kv_heads, heads, head_dim, block_size, num_blocks = 3, 9, 64, 16, 64
    lens = [1, 5, 16, 17, 40, 100, 33, 2]
    batch = _decode_batch(lens, block_size, num_blocks, seed=1)
    shape = (kv_heads, num_blocks, block_size, head_dim)
    cache = (torch.randn(shape).to(dtype), torch.randn(shape).to(dtype))
    q = torch.randn(len(lens), heads + 2 * kv_heads, head_dim).to(dtype)[
        :, :heads
    ]  # strided, as in the model

    by_native = torch.empty(q.shape, dtype=dtype)
    assert attention._decode_in_place(q, cache, batch, 0.125, window, by_native)
    by_torch = torch.empty(q.shape, dtype=dtype)
    attention._decode(q, cache, batch, 0.125, window, by_torch)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(by_native.float(), by_torch.float(), atol=tolerance, rtol=tolerance)


def test_native_decode_does_not_depend_on_the_batch() -> None:
    if native.paged_decode_kernel() is None:
        pytest.skip("the native kernel could not be built here (no C compiler?); the PyTorch path is in use")
    torch.manual_seed(1)
    lens = [30, 3, 64]
    batch = _decode_batch(lens, 16, 32, seed=2)
    cache = (torch.randn(2, 32, 16, 32), torch.randn(2, 32, 16, 32))
    q = torch.randn(3, 4, 32)
    together = torch.empty_like(q)
    attention._decode_in_place(q, cache, batch, 0.2, None, together)
    for row in range(3):
        single = AttentionBatch(
            slot_mapping=batch.slot_mapping[row : row + 1],
            num_decode_tokens=1,
            decode_block_tables=batch.decode_block_tables[row : row + 1],
            decode_context_lens=batch.decode_context_lens[row : row + 1],
            max_decode_context_len=lens[row],
            prefills=(),
        )
        alone = torch.empty_like(q[row : row + 1])
        attention._decode_in_place(q[row : row + 1], cache, single, 0.2, None, alone)
        assert torch.equal(alone[0], together[row])


def test_loading_the_kernel_leaves_the_process_floating_point_mode_alone() -> None:
    """The kernel is compiled with -ffast-math; linked with it, GCC's crtfastmath would switch
    the whole process to flush denormals to zero when the library loads (a sampler dividing by
    a denormal temperature then got NaN). A denormal must survive arithmetic after loading."""
    if native.paged_decode_kernel() is None:
        pytest.skip("the native kernel could not be built here (no C compiler?); nothing is loaded")
    denormal = torch.tensor([1e-45], dtype=torch.float32)
    assert (denormal * 2).item() > 0
    assert 5e-324 * 2 > 0  # Python's own float arithmetic, double precision
