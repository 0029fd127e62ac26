from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from .multirank import RankPool

_pools: dict[int, RankPool] = {}


def _pool(world_size: int) -> RankPool:
    if world_size not in _pools:
        _pools[world_size] = RankPool(world_size)
    return _pools[world_size]


@pytest.fixture(scope="session")
def world2() -> RankPool:
    return _pool(2)


@pytest.fixture(scope="session")
def world4() -> RankPool:
    return _pool(4)


@pytest.fixture(scope="module")
def one_rank_group() -> Iterator[None]:
    """A one-rank Gloo default group in this process (nothing else runs on it)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for pool in _pools.values():
        pool.kill()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def require_gpu(count: int = 1) -> None:
    """Skips without enough CUDA GPUs; with AEPLB_REQUIRE_GPU=1, fails instead."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have >= count:
        return
    reason = f"needs {count} CUDA GPU(s), found {have}"
    if os.environ.get("AEPLB_REQUIRE_GPU") == "1":
        pytest.fail(reason + " (AEPLB_REQUIRE_GPU=1)")
    pytest.skip(reason)
