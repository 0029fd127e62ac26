"""Deterministic random payloads: every rank can rebuild what a peer sent, element by element."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8]


def payload(
    seed: int,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
        # keep it away from zero so an unwritten (zeroed) buffer can never pass
        x = x + torch.where(x >= 0, 0.5, -0.5)
        return x.to(dtype)
    hi = 127 if dtype in (torch.int8, torch.uint8) else 1 << 30
    return torch.randint(1, hi, shape, generator=g, dtype=torch.int64, device=device).to(dtype)


def seed_of(src: int, dst: int, index: int, salt: int = 0) -> int:
    return ((salt * 1009 + src) * 1009 + dst) * 100003 + index


def poisoned(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A receive buffer that no valid payload can equal (payloads are never zero)."""
    return torch.zeros(shape, dtype=dtype)


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype, what
    if not torch.equal(got.view(-1), want.view(-1)):
        bad = (got.view(-1) != want.view(-1)).nonzero()
        raise AssertionError(
            f"{what}: {bad.numel()} of {got.numel()} elements differ, first at {bad[0].item()}"
        )
