"""Pure helpers of the NCCL coalescing engine (the engine itself runs in the GPU tests)."""

from __future__ import annotations

import torch

from aeplb.transports._packing import byte_slice, merge_adjacent


def test_merge_adjacent_views_of_one_allocation() -> None:
    base = torch.arange(1, 101, dtype=torch.uint8)
    a, b, c = base[0:10], base[10:30], base[50:60]
    merged = merge_adjacent([a, b, c])
    assert len(merged) == 2
    assert torch.equal(merged[0], base[0:30])
    assert merged[0].data_ptr() == base.data_ptr(), "merging must not copy"
    assert torch.equal(merged[1], c)


def test_merge_keeps_separate_allocations_apart() -> None:
    a = torch.ones(10, dtype=torch.uint8)
    b = torch.ones(10, dtype=torch.uint8)
    assert len(merge_adjacent([a, b, torch.empty(0, dtype=torch.uint8)])) == 2


def test_slice_covers_exact_byte_ranges() -> None:
    segs = [torch.arange(i * 10, i * 10 + n, dtype=torch.int64) for i, n in enumerate([3, 5, 2])]
    flat = torch.cat(segs)
    total = flat.numel()
    for start in range(total):
        for stop in range(start + 1, total + 1):
            got = torch.cat(byte_slice(segs, start, stop))
            assert torch.equal(got, flat[start:stop])
