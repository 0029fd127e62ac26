"""The communicator over real Gloo ranks (spawned processes on loopback)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch
import torch.distributed as dist

import aeplb

from .multirank import RankPool
from .payloads import DTYPES, assert_same, payload, poisoned, seed_of
from .ticker import Ticker

SHAPES = [(1,), (7, 3), (64, 129), (2, 3, 5, 7)]


# -- rank functions (module level so spawned ranks can import them) --------------------


async def exchange_all_pairs(
    rank: int, world: int, salt: int, options: dict[str, Any] | None = None
) -> dict[str, float]:
    """Every rank sends every dtype x shape to every rank (itself included)."""
    async with aeplb.create_communicator("gloo", timeout=60, **(options or {})) as comm:
        expected = []
        for peer in range(world):
            for i, (dtype, shape) in enumerate((d, s) for d in DTYPES for s in SHAPES):
                comm.add_send(payload(seed_of(rank, peer, i, salt), shape, dtype), peer)
                buf = poisoned(shape, dtype)
                comm.add_recv(buf, peer)
                expected.append((buf, seed_of(peer, rank, i, salt), shape, dtype))
        stats = await comm.execute()
        for buf, seed, shape, dtype in expected:
            assert_same(buf, payload(seed, shape, dtype), f"from seed {seed}")
        assert comm.pending == 0
        per_peer = sum(payload(0, s, d).nbytes for d in DTYPES for s in SHAPES)
        assert stats.bytes_sent == per_peer * (world - 1)
        assert stats.bytes_received == per_peer * (world - 1)
        assert stats.bytes_copied == per_peer
        assert stats.num_copies == len(DTYPES) * len(SHAPES)
        return {"seconds": stats.seconds, "check": stats.check_seconds}


async def exchange_ring(rank: int, world: int, rounds: int) -> int:
    async with aeplb.create_communicator("gloo", timeout=60) as comm:
        for r in range(rounds):
            nxt, prv = (rank + 1) % world, (rank - 1) % world
            out = payload(seed_of(rank, nxt, r), (1000 + r,))
            buf = poisoned((1000 + r,))
            comm.add_send(out, nxt)
            comm.add_recv(buf, prv)
            await comm.execute()
            assert_same(buf, payload(seed_of(prv, rank, r), (1000 + r,)), f"round {r}")
        return comm.statistics().batches_completed


def _open_files() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


async def striped_open_close(rank: int, world: int, rounds: int) -> list[int]:
    """Opens, uses and closes striped communicators; returns open files after each."""
    peer = 1 - rank
    files = []
    for r in range(rounds):
        async with aeplb.create_communicator("gloo", stripes=4, chunk_bytes=1 << 10) as comm:
            buf = poisoned((5000,))
            comm.add_send(payload(seed_of(rank, peer, r), (5000,)), peer)
            comm.add_recv(buf, peer)
            await comm.execute()  # 20 KB in 1 KiB pieces: every stripe carries some
            assert_same(buf, payload(seed_of(peer, rank, r), (5000,)), f"round {r}")
        files.append(_open_files())
    return files


async def exchange_in_subgroups(rank: int, world: int) -> list[int]:
    evens = dist.new_group([0, 2])
    odds = dist.new_group([1, 3])
    group = evens if rank % 2 == 0 else odds
    async with aeplb.create_communicator("gloo", group=group, timeout=60) as comm:
        me = dist.get_rank(group)
        other = 1 - me
        assert (comm.rank, comm.world_size) == (me, 2)
        out = payload(seed_of(rank, 7, 0), (333,), torch.bfloat16)
        buf = poisoned((333,), torch.bfloat16)
        comm.add_send(out, other)  # a group rank, not a global one
        comm.add_recv(buf, other)
        await comm.execute()
        partner = dist.get_global_rank(group, other)
        assert_same(buf, payload(seed_of(partner, 7, 0), (333,), torch.bfloat16))
        with pytest.raises(aeplb.InvalidTransferError, match="out of range"):
            comm.add_send(out, 2)
        return [me, partner]


async def empty_batches(rank: int, world: int) -> list[int]:
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        for _ in range(3):
            stats = await comm.execute()
            assert stats.bytes_moved == 0 and stats.num_sends == 0
        async with comm.batch() as b:
            pass
        assert b.stats is not None and b.stats.bytes_moved == 0
        return [comm.statistics().batches_completed]


class Boom(Exception):
    pass


async def batch_context(rank: int, world: int) -> None:
    peer = 1 - rank
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        comm.add_send(payload(1, (5,)), peer)  # pending ops stay apart from the block's
        with pytest.raises(Boom):
            async with comm.batch() as b:
                b.add_send(payload(seed_of(rank, peer, 99), (10,)), peer)
                b.add_recv(poisoned((10,)), peer)
                assert b.pending == 2
                raise Boom
        assert comm.pending == 1
        comm.clear()
        buf = poisoned((50,), torch.float64)
        async with comm.batch() as b:
            b.add_recv(buf, peer)
            b.add_send(payload(seed_of(rank, peer, 1), (50,), torch.float64), peer)
        assert b.stats is not None and b.stats.bytes_received == 400
        assert_same(buf, payload(seed_of(peer, rank, 1), (50,), torch.float64))


def blocking_facade(rank: int, world: int) -> float:
    """Code written for the synchronous four-method interface, run unchanged."""
    comm = aeplb.create_communicator("gloo", timeout=30)
    legacy = comm.blocking()
    legacy.set_stream(None)
    peer = 1 - rank
    bufs = []
    for i in range(4):
        legacy.add_send(payload(seed_of(rank, peer, i), (100, i + 1)), peer)
        buf = poisoned((100, i + 1))
        legacy.add_recv(buf, peer)
        bufs.append(buf)
    stats = legacy.execute()
    for i, buf in enumerate(bufs):
        assert_same(buf, payload(seed_of(peer, rank, i), (100, i + 1)))
    legacy.close()
    with pytest.raises(aeplb.ClosedCommunicatorError):
        legacy.add_send(bufs[0], peer)
    return stats.seconds


async def self_sends(rank: int, world: int) -> None:
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        a, b = payload(seed_of(rank, rank, 0), (9, 9)), payload(seed_of(rank, rank, 1), (81,))
        got_a, got_b = poisoned((81,)), poisoned((9, 9))
        comm.add_send(a, rank)
        comm.add_recv(got_a, rank)  # reshaped: element count and dtype are what must match
        comm.add_send(b, rank)
        comm.add_recv(got_b, rank)
        stats = await comm.execute()
        assert_same(got_a, a)
        assert_same(got_b, b)
        assert stats.bytes_copied == 2 * 81 * 4 and stats.bytes_moved == 0


async def self_send_mismatch(rank: int, world: int) -> str:
    """A rank whose self-pairs do not match rejects its batch; its peers learn at once."""
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        if rank == 0:
            comm.add_send(payload(1, (4,)), 0)
            comm.add_recv(poisoned((4,), torch.float64), 0)
            with pytest.raises(aeplb.InvalidTransferError, match="self-transfer #0") as info:
                await comm.execute()
            assert comm.pending == 2, "the queue must be left as it was"
            comm.clear()
        else:
            with pytest.raises(aeplb.PeerMismatchError, match="rejected") as info:
                await comm.execute()
        # still usable afterwards
        peer = (rank + 1) % world
        buf = poisoned((3,))
        comm.add_send(payload(seed_of(rank, peer, 5), (3,)), peer)
        comm.add_recv(buf, (rank - 1) % world)
        await comm.execute()
        assert_same(buf, payload(seed_of((rank - 1) % world, rank, 5), (3,)))
        return str(info.value)


async def bad_inputs(rank: int, world: int) -> None:
    comm = aeplb.create_communicator("gloo", timeout=30)
    t = payload(1, (4, 4))
    cases = [
        (lambda: comm.add_send([1, 2], 0), "must be a torch.Tensor"),
        (lambda: comm.add_send(t.t(), 0), "not contiguous"),
        (lambda: comm.add_recv(t, world), "out of range"),
        (lambda: comm.add_recv(t, -1), "out of range"),
        (lambda: comm.add_send(t, True), "must be an int"),
        (lambda: comm.add_send(t, "1"), "must be an int"),
        (lambda: comm.add_send(torch.empty(3, device="meta"), 0), "moves CPU tensors"),
        (lambda: comm.add_send(t.to_sparse(), 0), "dense"),
    ]
    for call, message in cases:
        with pytest.raises(aeplb.InvalidTransferError, match=message):
            call()
        assert comm.pending == 0, "a rejected op must not be queued"
    with pytest.raises(aeplb.InvalidTransferError, match="timeout"):
        await comm.execute(timeout=-1)
    with pytest.raises(TypeError, match="unknown option"):
        aeplb.create_communicator("gloo", frobnicate=True)
    with pytest.raises(aeplb.InvalidTransferError, match="backend must be one of"):
        aeplb.create_communicator("mpi")
    await comm.aclose()
    await comm.aclose()  # idempotent
    for call in (lambda: comm.add_send(t, 0), lambda: comm.add_recv(t, 0), comm.blocking):
        with pytest.raises(aeplb.ClosedCommunicatorError, match="closed"):
            call()
    with pytest.raises(aeplb.ClosedCommunicatorError):
        await comm.execute()


async def mismatched_lists(rank: int, world: int, case: str) -> str:
    """Op lists that do not pair up end in PeerMismatchError on every rank, then recover."""
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        peer = 1 - rank
        if case == "count":
            n = 2 if rank == 0 else 1
            for _ in range(n):
                (comm.add_send if rank == 0 else comm.add_recv)(payload(3, (8,)), peer)
        elif case == "size":
            (comm.add_send if rank == 0 else comm.add_recv)(payload(3, (8 + rank,)), peer)
        elif case == "dtype":
            dtype = torch.float32 if rank == 0 else torch.int32
            (comm.add_send if rank == 0 else comm.add_recv)(payload(3, (8,), dtype), peer)
        elif case == "order":
            shapes = [(8,), (16,)] if rank == 0 else [(16,), (8,)]
            for s in shapes:
                (comm.add_send if rank == 0 else comm.add_recv)(payload(3, s), peer)
        elif case == "missing-recv" and rank == 0:
            comm.add_send(payload(3, (8,)), peer)
        with pytest.raises(aeplb.PeerMismatchError) as info:
            await comm.execute()
        assert comm.pending == 0
        assert not comm.statistics().broken
        buf = poisoned((4,))
        comm.add_send(payload(seed_of(rank, peer, 0), (4,)), peer)
        comm.add_recv(buf, peer)
        await comm.execute()
        assert_same(buf, payload(seed_of(peer, rank, 0), (4,)))
        return str(info.value)


async def silent_peer(rank: int, world: int) -> float:
    """Rank 1 never executes: rank 0 must fail at its deadline, not hang."""
    comm = aeplb.create_communicator("gloo", timeout=1.5)
    if rank == 1:
        await anyio.sleep(4)
        await comm.aclose()
        return 0.0
    comm.add_send(payload(1, (10,)), 1)
    start = time.monotonic()
    with pytest.raises(aeplb.TransferTimeoutError):
        await comm.execute()
    elapsed = time.monotonic() - start
    stats = comm.statistics()
    assert stats.broken and isinstance(stats.last_error, aeplb.TransferTimeoutError)
    with pytest.raises(aeplb.BrokenCommunicatorError) as info:
        comm.add_send(payload(1, (10,)), 1)
    assert isinstance(info.value.__cause__, aeplb.TransferTimeoutError)
    await comm.aclose()
    return elapsed


async def warmed_up(rank: int, world: int, warm_up: bool) -> dict[str, Any]:
    """The warm-up at creation is not counted as a batch, and the first batch works."""
    comm = aeplb.create_communicator("gloo", timeout=30, warm_up=warm_up)
    before = comm.statistics()
    peer = (rank + 1) % world
    src = (rank - 1) % world
    buf = poisoned((33,))
    comm.add_send(payload(seed_of(rank, peer, 0), (33,)), peer)
    comm.add_recv(buf, src)
    stats = await comm.execute()
    assert_same(buf, payload(seed_of(src, rank, 0), (33,)))
    after = comm.statistics()
    await comm.aclose()
    return {
        "before": (before.batches_completed, before.bytes_sent, before.bytes_received),
        "after": (after.batches_completed, after.bytes_sent, after.bytes_received),
        "sent": stats.bytes_sent,
    }


def peer_gone_at_creation(rank: int, world: int) -> str:
    """Rank 1 exits instead of creating the communicator: rank 0's creation fails clearly."""
    if rank == 1:
        os._exit(0)
    with pytest.raises(aeplb.BackendUnavailableError) as info:
        aeplb.create_communicator("gloo", timeout=5)
    return str(info.value)


async def cancel_midway(rank: int, world: int, how: str) -> dict[str, float]:
    """Cancelling the awaiting task leaves the batch running and the communicator usable."""
    peer = 1 - rank
    n = 16 << 20  # 64 MB each way
    async with aeplb.create_communicator("gloo", timeout=60) as comm:
        big_out = payload(seed_of(rank, peer, 0), (n,))
        big_in = poisoned((n,))
        comm.add_send(big_out, peer)
        comm.add_recv(big_in, peer)
        cancelled = False
        if rank == 0 and how == "move_on_after":
            with anyio.move_on_after(0.005) as scope:
                await comm.execute()
            cancelled = scope.cancelled_caught
        elif rank == 0 and how == "asyncio.timeout":
            import asyncio

            try:
                async with asyncio.timeout(0.005):
                    await comm.execute()
            except TimeoutError:
                cancelled = True
        elif rank == 0 and how == "task.cancel":
            import asyncio

            task = asyncio.ensure_future(comm.execute())
            await asyncio.sleep(0.005)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled = True
        else:
            await comm.execute()
        del big_out  # the batch holds its own reference while it runs
        in_flight = comm.statistics().in_flight
        # the next batch runs after the abandoned one on every rank
        buf = poisoned((1000,), torch.int64)
        comm.add_send(payload(seed_of(rank, peer, 1), (1000,), torch.int64), peer)
        comm.add_recv(buf, peer)
        await comm.execute()
        assert_same(buf, payload(seed_of(peer, rank, 1), (1000,), torch.int64))
        assert_same(big_in, payload(seed_of(peer, rank, 0), (n,)), "cancelled batch's data")
        stats = comm.statistics()
        assert stats.batches_completed == 2 and stats.in_flight == 0
        return {"cancelled": float(cancelled), "in_flight_after_cancel": float(in_flight)}


async def manifests_through_shared_memory(rank: int, world: int, apart: bool) -> dict[str, Any]:
    """Where every rank is on this node, the manifests go through a shared-memory mailbox
    (unless ``apart``: each rank then claims a node of its own); either way a mismatch
    raises on every rank, the communicator recovers, and data arrives intact."""
    from aeplb.transports import _node

    real = _node.node_key
    if apart:
        _node.node_key = lambda: f"node-of-rank-{rank}"
    try:
        comm = aeplb.create_communicator("gloo", timeout=30)
    finally:
        _node.node_key = real  # the rank process runs later tests too
    async with comm:
        shared = comm._gather is not None
        nxt = (rank + 1) % world
        prv = (rank - 1) % world
        comm.add_send(payload(3, (8 + (rank == 0),)), nxt)  # rank 0 sends one too many
        comm.add_recv(poisoned((8,)), prv)
        with pytest.raises(aeplb.PeerMismatchError) as info:
            await comm.execute()
        checks = []
        for i in range(5):
            buf = poisoned((1000 + i,))
            comm.add_send(payload(seed_of(rank, nxt, i), (1000 + i,)), nxt)
            comm.add_recv(buf, prv)
            stats = await comm.execute()
            assert_same(buf, payload(seed_of(prv, rank, i), (1000 + i,)))
            checks.append(stats.check_seconds)
    return {"shared": shared, "error": str(info.value), "check_ms": 1e3 * min(checks)}


async def busy_execute(rank: int, world: int) -> None:
    """Rank 0 calls execute() again while its first batch waits for rank 1, which joins
    half a second late: the first batch cannot have ended, however the host schedules."""
    peer = 1 - rank
    async with aeplb.create_communicator("gloo", timeout=60) as comm:
        buf = poisoned((4 << 20,))
        comm.add_send(payload(seed_of(rank, peer, 0), (4 << 20,)), peer)
        comm.add_recv(buf, peer)
        errors = []

        async def second() -> None:
            await anyio.lowlevel.checkpoint()
            try:
                await comm.execute()
            except aeplb.BusyCommunicatorError as exc:
                errors.append(exc)

        if rank == 1:
            await anyio.sleep(0.5)
            await comm.execute()
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(comm.execute)
                tg.start_soon(second)
            assert len(errors) == 1, "a second concurrent execute() must raise"
        assert_same(buf, payload(seed_of(peer, rank, 0), (4 << 20,)))


async def loop_stall(rank: int, world: int, nbytes: int) -> dict[str, float]:
    """A 1 ms ticker keeps running while a large transfer is in flight."""
    peer = 1 - rank
    n = nbytes // 4
    async with aeplb.create_communicator("gloo", timeout=120) as comm:
        out = payload(seed_of(rank, peer, 0), (n,))
        buf = poisoned((n,))
        comm.add_send(out, peer)
        comm.add_recv(buf, peer)
        ticker = Ticker()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await anyio.sleep(0.01)
            stats = await comm.execute()
            ticker.done = True
        assert_same(buf, payload(seed_of(peer, rank, 0), (n,)))
        return {
            "transfer_s": stats.seconds,
            "max_stall_s": max(ticker.stalls),
            "ticks": len(ticker.stalls),
        }


# -- tests ---------------------------------------------------------------------------


def test_all_pairs_every_dtype_and_shape_2_ranks(world2: RankPool, anyio_backend: str) -> None:
    world2.run(exchange_all_pairs, 1, backend=anyio_backend)


def test_all_pairs_every_dtype_and_shape_4_ranks(world4: RankPool, anyio_backend: str) -> None:
    results = world4.run(exchange_all_pairs, 2, backend=anyio_backend)
    print("manifest check seconds by rank:", [round(r["check"], 5) for r in results])


def test_all_pairs_on_uvloop(world2: RankPool) -> None:
    pytest.importorskip("uvloop")
    world2.run(exchange_all_pairs, 3, backend="uvloop")


def test_many_stripes_to_many_peers_fit_the_default_staging(world4: RankPool) -> None:
    # 3 peers x 2 directions x 8 stripes: 48 lanes, too many for 8 MiB pieces in 256 MiB
    # of pinned staging; the default piece size shrinks so that each lane gets its slot
    world4.run(exchange_all_pairs, 3, {"stripes": 8}, backend="asyncio")


def test_ring_4_ranks(world4: RankPool, anyio_backend: str) -> None:
    assert world4.run(exchange_ring, 5, backend=anyio_backend) == [5] * 4


def test_subgroups_use_group_ranks(world4: RankPool) -> None:
    assert world4.run(exchange_in_subgroups, backend="trio") == [[0, 2], [0, 3], [1, 0], [1, 1]]


def test_empty_batches(world2: RankPool, anyio_backend: str) -> None:
    assert world2.run(empty_batches, backend=anyio_backend) == [[4], [4]]


def test_batch_context_executes_on_exit_and_discards_on_error(
    world2: RankPool, anyio_backend: str
) -> None:
    world2.run(batch_context, backend=anyio_backend)


def test_blocking_facade(world2: RankPool) -> None:
    world2.run(blocking_facade)


def test_self_sends_are_local_copies(world2: RankPool, anyio_backend: str) -> None:
    world2.run(self_sends, backend=anyio_backend)


def test_self_send_mismatch_rejected_everywhere(world4: RankPool) -> None:
    messages = world4.run(self_send_mismatch, backend="asyncio")
    assert "dtype" in messages[0] or "float" in messages[0]
    assert all("rank(s) [0] rejected" in m for m in messages[1:])


def test_bad_inputs(world2: RankPool, anyio_backend: str) -> None:
    world2.run(bad_inputs, backend=anyio_backend)


@pytest.mark.parametrize("case", ["count", "size", "dtype", "order", "missing-recv"])
def test_mismatched_lists_raise_on_every_rank(world2: RankPool, case: str) -> None:
    messages = world2.run(mismatched_lists, case, backend="asyncio", timeout=60)
    assert messages[0] == messages[1].replace("seen on rank 1", "seen on rank 0")
    assert "rank 0 sends" in messages[0]


@pytest.mark.parametrize("warm_up", [True, False])
def test_warm_up_is_uncounted_and_the_first_batch_works(world4: RankPool, warm_up: bool) -> None:
    for result in world4.run(warmed_up, warm_up, backend="asyncio"):
        assert result["before"] == (0, 0, 0)
        nbytes = payload(0, (33,)).nbytes
        assert result["after"] == (1, nbytes, nbytes)
        assert result["sent"] == nbytes


@pytest.mark.parametrize("apart", [False, True])
def test_manifests_through_shared_memory_on_one_node(world4: RankPool, apart: bool) -> None:
    results = world4.run(manifests_through_shared_memory, apart, backend="asyncio")
    for rank, r in enumerate(results):
        print(f"apart={apart} rank {rank}: check {r['check_ms']:.3f} ms")
        assert r["shared"] is (not apart)
        assert "rank 0 sends 1 tensor(s) (36 bytes) to rank 1" in r["error"], r["error"]


def test_peer_gone_at_creation_is_a_clear_error(world2: RankPool) -> None:
    results = world2.run(peer_gone_at_creation, timeout=60, allow_dead=True)
    assert results[1] is None
    assert "first exchange with every peer failed on rank 0" in results[0]
    assert "every rank of the group must create the communicator" in results[0]


def test_silent_peer_hits_the_deadline(world2: RankPool, anyio_backend: str) -> None:
    elapsed, _ = world2.run(silent_peer, backend=anyio_backend, pg_timeout=30)
    assert 1.4 <= elapsed < 1.5 + 2.5, elapsed


@pytest.mark.parametrize("how", ["move_on_after", "asyncio.timeout", "task.cancel"])
def test_cancellation_keeps_communicator_usable(world2: RankPool, how: str) -> None:
    backends = ["asyncio", "trio"] if how == "move_on_after" else ["asyncio"]
    for backend in backends:
        result = world2.run(cancel_midway, how, backend=backend)
        assert result[0]["cancelled"] == 1.0, "the transfer finished before the cancel"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_closing_destroys_the_stripe_groups(world2: RankPool) -> None:
    # each striped communicator makes 3 Gloo groups of its own, each with its own sockets
    for files in world2.run(striped_open_close, 6, backend="asyncio"):
        assert files[-1] <= files[0] + 2, f"open files after each round: {files}"


def test_concurrent_execute_is_an_error(world2: RankPool, anyio_backend: str) -> None:
    world2.run(busy_execute, backend=anyio_backend)


def test_event_loop_keeps_ticking_during_256mb_transfer(
    world2: RankPool, anyio_backend: str
) -> None:
    results = world2.run(loop_stall, 256 << 20, backend=anyio_backend, timeout=120)
    for rank, r in enumerate(results):
        print(
            f"{anyio_backend} rank {rank}: 256 MB each way in {r['transfer_s'] * 1e3:.0f} ms, "
            f"longest loop stall {r['max_stall_s'] * 1e3:.2f} ms over {r['ticks']} ticks"
        )
        assert r["ticks"] > 10
        # A blocking transfer would stall the loop for the whole transfer. The margin allows
        # for the OS descheduling the loop thread when 2 ranks share 2 cores (a 56 ms stall
        # against a 258 ms transfer was seen once in CI).
        assert r["max_stall_s"] < r["transfer_s"] / 3, r
