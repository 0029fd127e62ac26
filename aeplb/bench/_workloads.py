from __future__ import annotations

from dataclasses import dataclass

import torch

MB = 1 << 20
# DeepSeek-V3 expert in fp8: gate, up (2048 x 7168) and down (7168 x 2048) projections.
DSV3_EXPERT = [(2048, 7168), (2048, 7168), (7168, 2048)]


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]  # tensors sent to (and received from) each peer
    dtype: torch.dtype

    @property
    def bytes_per_peer(self) -> int:
        size = torch.tensor([], dtype=self.dtype).element_size()
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n * size
        return total


def fp8() -> torch.dtype:
    return getattr(torch, "float8_e4m3fn", torch.uint8)


def eplb(experts: int, peers: int) -> Workload:
    per_peer = max(1, experts // max(peers, 1))
    return Workload("eplb", tuple(s for _ in range(per_peer) for s in DSV3_EXPERT), fp8())


def sweep(sizes_mb: list[int]) -> list[Workload]:
    return [Workload(f"sweep-{mb}MB", ((mb * MB,),), torch.uint8) for mb in sizes_mb]


def many_small(count: int = 1000, kib: int = 64) -> Workload:
    return Workload("many-small", tuple((kib * 1024,) for _ in range(count)), torch.uint8)


def fill(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int
) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    # random bytes, never all zero: data moved is checked after the first repetition
    raw = torch.randint(1, 255, shape, dtype=torch.uint8, device=device, generator=g)
    return raw.view(dtype) if dtype.itemsize == 1 else raw.to(dtype)
