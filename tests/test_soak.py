"""Soak: many batches of random shapes, dtypes and peers over real Gloo ranks.

Every received byte is checked, the communicator's counters are reconciled with what was
queued, and each rank's resident memory is measured after a warm-up and at the end: it must
stay flat. The full run (>= 10,000 batches per world size) is marked slow and runs with
``nox -s soak`` (``pytest -m slow tests/test_soak.py``); a short run of a few hundred
batches runs with the rest of the CPU suite.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import aeplb

from .test_faults import ForkedPool

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
CHUNK_BYTES = 1 << 20  # small pieces: large tensors split, small ones travel together
RSS_MARGIN = 48 << 20  # growth allowed between the warm-up and the end


@pytest.fixture(scope="module")
def pools() -> Iterator[dict[int, ForkedPool]]:
    made = {n: ForkedPool(n, preload=(__name__,)) for n in (2, 4)}
    yield made
    for pool in made.values():
        pool.kill()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _numel(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.7:
        return rng.randint(1, 1024)
    if r < 0.95:
        return rng.randint(1025, 64 << 10)
    return rng.randint(64 << 10, 512 << 10)


def _shape(rng: random.Random, numel: int) -> tuple[int, ...]:
    """A 1-3 dimensional shape with exactly ``numel`` elements."""
    dims = [numel]
    for _ in range(rng.randint(0, 2)):
        divisors = [d for d in (2, 3, 4, 5, 8) if dims[-1] % d == 0]
        if divisors:
            d = rng.choice(divisors)
            dims[-1] //= d
            dims.append(d)
    return tuple(dims)


def _plan(
    rng: random.Random, world: int
) -> dict[tuple[int, int], list[tuple[tuple[int, ...], torch.dtype]]]:
    """The whole batch, the same on every rank: tensors per (src, dst), self-pairs included."""
    plan = {}
    for src in range(world):
        for dst in range(world):
            if rng.random() < 0.5:
                plan[(src, dst)] = [
                    (_shape(rng, _numel(rng)), rng.choice(DTYPES)) for _ in range(rng.randint(1, 3))
                ]
    return plan


def _content(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random bytes, none zero, so that an unwritten (zeroed) buffer never passes."""
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)  # bool bytes must be 0 or 1
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(1, 256, (nbytes,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).view(shape)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


async def soak(rank: int, world: int, seed: int, batches: int) -> dict[str, Any]:
    shared, own = random.Random(seed), random.Random(seed * 31 + rank)
    want = {"sent": 0, "received": 0, "copied": 0}
    checked = 0
    rss_warm = 0
    started = time.monotonic()
    async with aeplb.create_communicator("gloo", timeout=60, chunk_bytes=CHUNK_BYTES) as comm:
        for i in range(batches):
            if i == min(200, batches // 10):
                rss_warm = _rss()
            plan = _plan(shared, world)
            recvs: list[tuple[torch.Tensor, int, tuple[int, ...], torch.dtype]] = []
            ops: dict[tuple[str, int], list[Any]] = {}
            for (src, dst), tensors in plan.items():
                for k, (shape, dtype) in enumerate(tensors):
                    s = hash((seed, i, src, dst, k)) & 0x7FFFFFFF
                    if src == rank:
                        ops.setdefault(("send", dst), []).append(_content(s, shape, dtype))
                    if dst == rank:
                        recvs.append((torch.zeros(shape, dtype=dtype), s, shape, dtype))
                        ops.setdefault(("recv", src), []).append(recvs[-1][0])
                        nbytes = recvs[-1][0].nbytes
                        want["copied" if src == rank else "received"] += nbytes
                    if src == rank and dst != rank:
                        want["sent"] += ops[("send", dst)][-1].nbytes
            # Any interleaving of the per-(direction, peer) lists pairs up: shuffle it.
            queues = [list(v) for v in ops.values()]
            keys = list(ops)
            order = [j for j, q in enumerate(queues) for _ in q]
            own.shuffle(order)
            if own.random() < 0.3:
                async with comm.batch() as b:
                    for j in order:
                        kind, peer = keys[j]
                        (b.add_send if kind == "send" else b.add_recv)(queues[j].pop(0), peer)
            else:
                for j in order:
                    kind, peer = keys[j]
                    (comm.add_send if kind == "send" else comm.add_recv)(queues[j].pop(0), peer)
                await comm.execute()
            for buf, s, shape, dtype in recvs:
                if not torch.equal(_raw(buf), _raw(_content(s, shape, dtype))):
                    raise AssertionError(f"batch {i}: {dtype} {shape} (seed {s}) arrived wrong")
                checked += buf.nbytes
        stats = comm.statistics()
        rss_end = _rss()
    assert stats.batches_completed == batches and stats.batches_failed == 0, stats
    got = {"sent": stats.bytes_sent, "received": stats.bytes_received, "copied": stats.bytes_copied}
    assert got == want, (got, want)
    return {
        "batches": batches,
        "bytes_checked": checked,
        "bytes_moved": stats.bytes_sent + stats.bytes_received,
        "rss_warm_mb": rss_warm / 2**20,
        "rss_end_mb": rss_end / 2**20,
        "seconds": time.monotonic() - started,
    }


def _check(results: list[dict[str, Any]], label: str) -> None:
    for rank, r in enumerate(results):
        growth = (r["rss_end_mb"] - r["rss_warm_mb"]) * 2**20
        print(
            f"\n{label} rank {rank}: {r['batches']} batches, {r['bytes_checked'] / 1e6:.1f} MB "
            f"checked, {r['bytes_moved'] / 1e6:.1f} MB over the wire in {r['seconds']:.1f} s; "
            f"RSS {r['rss_warm_mb']:.0f} -> {r['rss_end_mb']:.0f} MB"
        )
        assert growth < RSS_MARGIN, f"rank {rank}: RSS grew by {growth / 2**20:.0f} MB"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("world", "batches", "backend"), [(2, 300, "asyncio"), (4, 120, "trio")])
def test_soak_short(pools: dict[int, ForkedPool], world: int, batches: int, backend: str) -> None:
    results = pools[world].run(soak, 1, batches, backend=backend, timeout=110)
    _check(results, f"short soak, {world} ranks")


def _selected_slow(config: pytest.Config) -> bool:
    return "slow" in str(config.getoption("markexpr") or "")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("world", "backend"), [(2, "asyncio"), (4, "trio")])
def test_soak_full(
    pools: dict[int, ForkedPool], world: int, backend: str, request: pytest.FixtureRequest
) -> None:
    if not _selected_slow(request.config):
        pytest.skip("the full soak runs with -m slow (nox -s soak)")
    batches = int(os.environ.get("AEPLB_SOAK_BATCHES", "10000"))
    results = pools[world].run(soak, 2, batches, backend=backend, timeout=1700)
    _check(results, f"full soak, {world} ranks")
