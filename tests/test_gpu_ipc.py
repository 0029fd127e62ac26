"""The ipc (copy-engine) backend on real GPUs: what the shared transport tests do not cover.

Skipped without GPUs; AEPLB_REQUIRE_GPU=1 turns the skips into failures.
"""

from __future__ import annotations

import os
import random
import time

import anyio
import pytest
import torch

import aeplb

from .conftest import require_gpu
from .multirank import RankPool
from .payloads import seed_of
from .test_gpu_transports import PG, gpu_payload, poisoned, same_bytes, swap

pytestmark = pytest.mark.gpu


async def allocation_churn(rank: int, world: int) -> list[int]:
    """Fresh receive buffers every batch, freed segments and reused addresses."""
    peer = 1 - rank
    rng = random.Random(5)  # the same sizes on both ranks
    mapped: list[int] = []
    async with aeplb.create_communicator("ipc", timeout=60) as comm:
        for step in range(40):
            sizes = [rng.choice([1, 1000, 300_000, 3 << 20, 9 << 20]) for _ in range(6)]
            bufs = []
            for i, n in enumerate(sizes):
                comm.add_send(gpu_payload(seed_of(rank, peer, i, step), (n,), torch.bfloat16), peer)
                buf = poisoned((n,), torch.bfloat16)
                comm.add_recv(buf, peer)
                bufs.append(buf)
            await comm.execute()
            for i, (n, buf) in enumerate(zip(sizes, bufs, strict=True)):
                want = gpu_payload(seed_of(peer, rank, i, step), (n,), torch.bfloat16)
                same_bytes(buf, want, f"step {step} tensor {i}")
            del bufs
            if step % 4 == 3:
                torch.cuda.empty_cache()  # segments go back to the driver; addresses recur
            mapped.append(len(comm._transport._peers[peer].mapped))  # type: ignore[attr-defined]
    return mapped


async def mismatch_unchecked(rank: int, world: int) -> None:
    """check_peers=False: the descriptors still stop a write past a receive buffer."""
    peer = 1 - rank
    async with aeplb.create_communicator("ipc", timeout=60, check_peers=False) as comm:
        # same count, different sizes: rank 1's 50 elements sit before a canary
        backing = poisoned((100,), torch.float32)
        backing[50:] = 7.0
        if rank == 0:
            comm.add_send(gpu_payload(1, (100,), torch.float32), peer)
        else:
            comm.add_recv(backing[:50], peer)
        with pytest.raises(aeplb.PeerMismatchError, match="sends 1 tensor"):
            await comm.execute()
        assert torch.all(backing[50:] == 7.0) and torch.all(backing[:50] == 0)
        # different counts
        if rank == 0:
            comm.add_send(gpu_payload(2, (10,), torch.float32), peer)
            comm.add_send(gpu_payload(3, (10,), torch.float32), peer)
        else:
            comm.add_recv(backing[:10], peer)
        with pytest.raises(aeplb.PeerMismatchError):
            await comm.execute()
        assert torch.all(backing[:10] == 0)
        # and the communicator still works
        buf = poisoned((4096,), torch.float32)
        comm.add_send(gpu_payload(seed_of(rank, peer, 9), (4096,), torch.float32), peer)
        comm.add_recv(buf, peer)
        await comm.execute()
        same_bytes(buf, gpu_payload(seed_of(peer, rank, 9), (4096,), torch.float32))


async def mismatch_checked_in_band(rank: int, world: int) -> None:
    """check_peers=True: the manifests ride with the descriptors, not a separate gather.

    The failing batch announces a new allocation; the next batch into it still works, so
    the two ranks' handle caches stayed in step through the failure.
    """
    peer = 1 - rank
    n = 10_000_000  # 40 MB: an allocation of its own
    async with aeplb.create_communicator("ipc", timeout=60) as comm:
        transport = comm._transport
        assert transport.checks_in_band

        def no_gather(*args: object) -> None:
            raise AssertionError("the manifest went through a separate all-gather")

        transport.all_gather = no_gather  # type: ignore[method-assign, assignment]
        fresh = poisoned((n,), torch.float32)
        short = n - 1 if rank == 1 else n  # rank 1 expects one element too few
        comm.add_send(gpu_payload(seed_of(rank, peer, 1), (n,), torch.float32), peer)
        comm.add_recv(fresh[:short], peer)
        comm.add_send(gpu_payload(3, (5,), torch.float32), rank)  # a self-copy: not run
        mine = poisoned((5,), torch.float32)
        comm.add_recv(mine, rank)
        with pytest.raises(aeplb.PeerMismatchError, match="No data moved"):
            await comm.execute()
        assert not torch.any(fresh) and not torch.any(mine)
        comm.add_send(gpu_payload(seed_of(rank, peer, 2), (n,), torch.float32), peer)
        comm.add_recv(fresh, peer)
        comm.add_send(gpu_payload(3, (5,), torch.float32), rank)
        comm.add_recv(mine, rank)
        await comm.execute()
        same_bytes(fresh, gpu_payload(seed_of(peer, rank, 2), (n,), torch.float32))
        same_bytes(mine, gpu_payload(3, (5,), torch.float32))


async def adjacent_tensors_merge(rank: int, world: int, batched: bool) -> list[int]:
    """Slices that sit back to back on both sides go as one copy; data lands in order.

    ``batched=False`` takes the path of drivers without cuMemcpyBatchAsync (before CUDA
    12.8): one cuMemcpyDtoDAsync per copy.
    """
    peer = 1 - rank
    counted: list[int] = []
    async with aeplb.create_communicator("ipc", timeout=60) as comm:
        if not batched:
            comm._transport._copy_batch = False  # type: ignore[attr-defined]
        driver = comm._transport._driver  # type: ignore[attr-defined]
        batch_copy, one_copy = driver.copy_batch_async, driver.copy_async

        def count_batch(dsts: object, srcs: object, sizes: list[int], stream: int) -> None:
            counted.append(len(sizes))
            batch_copy(dsts, srcs, sizes, stream)

        def count_one(dst: int, src: int, n: int, stream: int) -> None:
            counted.append(1)
            one_copy(dst, src, n, stream)

        driver.copy_batch_async, driver.copy_async = count_batch, count_one
        try:
            for layout in ("slices", "separate"):
                counted.clear()
                if layout == "slices":
                    send = gpu_payload(seed_of(rank, peer, 1), (100, 4096), torch.bfloat16)
                    sends = list(send.unbind(0))
                    recv = poisoned((100, 4096), torch.bfloat16)
                    recvs = list(recv.unbind(0))
                else:  # small tensors from the caching allocator, one after another
                    sends = [
                        gpu_payload(seed_of(rank, peer, 2, i), (4096,), torch.bfloat16)
                        for i in range(100)
                    ]
                    recvs = [poisoned((4096,), torch.bfloat16) for _ in range(100)]
                # every other one reversed: these cannot join their neighbours
                order = list(range(50)) + list(range(99, 49, -1))
                for i in order:
                    comm.add_send(sends[i], peer)
                    comm.add_recv(recvs[i], peer)
                await comm.execute()
                wants = (
                    list(gpu_payload(seed_of(peer, rank, 1), (100, 4096), torch.bfloat16))
                    if layout == "slices"
                    else [
                        gpu_payload(seed_of(peer, rank, 2, i), (4096,), torch.bfloat16)
                        for i in range(100)
                    ]
                )
                for i, (got, want) in enumerate(zip(recvs, wants, strict=True)):
                    same_bytes(got, want, f"{layout} tensor {i}")
                if layout == "slices":
                    # the first 50 join into one copy; the reversed 50 stay apart
                    assert sum(counted) == 51, counted
                if not batched:
                    assert set(counted) == {1}, counted
        finally:
            driver.copy_batch_async, driver.copy_async = batch_copy, one_copy
    return counted


async def no_kernels(rank: int, world: int) -> list[str]:
    """The profiler sees copies on the GPU during execute(), and no kernel at all."""
    from torch.profiler import ProfilerActivity, profile

    peer = 1 - rank
    n = 64 << 20
    async with aeplb.create_communicator("ipc", timeout=60) as comm:
        sends = [gpu_payload(seed_of(rank, peer, i), (n,), torch.uint8) for i in range(3)]
        bufs = [poisoned((n,), torch.uint8) for _ in range(3)]
        for s, b in zip(sends, bufs, strict=True):
            comm.add_send(s, peer)
            comm.add_recv(b, peer)
        await comm.execute()  # warm: handles exchanged and mapped
        torch.cuda.synchronize()
        for s, b in zip(sends, bufs, strict=True):
            comm.add_send(s, peer)
            comm.add_recv(b, peer)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            await comm.execute()
            torch.cuda.synchronize()
        for i, b in enumerate(bufs):
            same_bytes(b, gpu_payload(seed_of(peer, rank, i), (n,), torch.uint8))
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert any("memcpy" in name.lower() for name in names), names
    kernels = [name for name in names if "memcpy" not in name.lower()]
    assert not kernels, f"kernels ran during an ipc transfer: {sorted(set(kernels))}"
    return sorted(set(names))


async def other_node(rank: int, world: int) -> list[int]:
    """Ranks that look like they sit on different nodes go through NCCL, same API."""
    from aeplb.transports import _node

    real = _node.node_key
    _node.node_key = lambda: f"node-of-rank-{rank}"
    try:
        comm = aeplb.create_communicator("ipc", timeout=60)
    finally:
        _node.node_key = real  # the rank process runs later tests too
    peer = 1 - rank
    async with comm:
        assert comm.backend == "ipc"
        local = comm._transport.local_ranks  # type: ignore[attr-defined]
        await swap(comm, rank, peer, [((777 + i,), torch.bfloat16) for i in range(5)])
    return list(local)


async def one_gpu_two_processes(rank: int, world: int) -> None:
    """Two processes on one GPU over a Gloo-only group: IPC needs no NCCL at all."""
    torch.cuda.set_device(0)  # earlier tests in this rank process may have picked another
    peer = 1 - rank
    async with aeplb.create_communicator("ipc", device="cuda:0", timeout=60) as comm:
        await swap(comm, rank, peer, [((50_000 + i,), torch.float32) for i in range(20)])


async def peer_exits(rank: int, world: int) -> float:
    """A peer process that is gone is noticed through the mailbox, long before the deadline."""
    comm = aeplb.create_communicator("ipc", timeout=30)
    if rank == 1:
        os._exit(0)
    comm.add_send(gpu_payload(1, (1 << 20,), torch.float32), 1)
    comm.add_recv(poisoned((1 << 20,), torch.float32), 1)
    start = time.monotonic()
    with pytest.raises(aeplb.BrokenCommunicatorError, match="exited"):
        await comm.execute()
    took = time.monotonic() - start
    with anyio.fail_after(15):
        await comm.aclose()
    return took


@pytest.fixture
def gpus2(world2: RankPool) -> RankPool:
    """Two ranks: on two GPUs where there are two, else both on one (IPC works either way)."""
    require_gpu(1)
    return world2


def test_allocation_churn_keeps_mappings_bounded(gpus2: RankPool) -> None:
    mapped = gpus2.run(allocation_churn, backend="asyncio", pg_backend=PG, timeout=240)
    for per_rank in mapped:
        print("MAPPED", per_rank)
        assert max(per_rank) <= 64, per_rank


def test_mismatch_without_manifest_writes_nothing(gpus2: RankPool) -> None:
    gpus2.run(mismatch_unchecked, backend="asyncio", pg_backend=PG)


def test_mismatch_is_checked_in_band(gpus2: RankPool) -> None:
    gpus2.run(mismatch_checked_in_band, backend="trio", pg_backend=PG)


@pytest.mark.parametrize("batched", [True, False])
def test_adjacent_tensors_merge_into_fewer_copies(gpus2: RankPool, batched: bool) -> None:
    counted = gpus2.run(adjacent_tensors_merge, batched, backend="asyncio", pg_backend=PG)
    print("COPIES FOR 100 SEPARATE SMALL TENSORS", counted)


def test_no_kernel_runs(gpus2: RankPool) -> None:
    names = gpus2.run(no_kernels, backend="asyncio", pg_backend=PG, timeout=180)
    print("CUDA ACTIVITY", names)


def test_peers_on_other_nodes_use_nccl(gpus2: RankPool) -> None:
    require_gpu(2)  # NCCL between the two
    assert gpus2.run(other_node, backend="trio", pg_backend=PG) == [[], []]


def test_a_peer_that_exits_breaks_the_communicator_fast(gpus2: RankPool) -> None:
    took = gpus2.run(peer_exits, backend="asyncio", pg_backend=PG, allow_dead=True, timeout=90)
    assert took[0] is not None and took[0] < 5, took


def test_two_processes_on_one_gpu(world2: RankPool) -> None:
    require_gpu(1)
    world2.run(one_gpu_two_processes, backend="asyncio", pg_backend="gloo")
