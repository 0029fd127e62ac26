"""The queueing layer over a fake transport, on asyncio and trio (anyio's pytest plugin)."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import anyio
import numpy as np
import pytest
import torch

import aeplb
from aeplb import Communicator

from .fakes import FakeTransport

pytestmark = pytest.mark.anyio


def make(**kwargs: object) -> tuple[Communicator, FakeTransport]:
    transport = FakeTransport()
    return Communicator(transport, check_peers=False, **kwargs), transport  # type: ignore[arg-type]


async def test_execute_runs_queued_ops_and_clears_queue() -> None:
    comm, fake = make()
    buf = torch.zeros(4)
    comm.add_send(torch.ones(4), 1)
    comm.add_recv(buf, 1)
    assert comm.pending == 2
    stats = await comm.execute()
    assert comm.pending == 0
    assert torch.equal(buf, torch.full((4,), 7.0))
    assert (stats.bytes_sent, stats.bytes_received, stats.num_sends, stats.num_recvs) == (
        16,
        16,
        1,
        1,
    )
    assert stats.seconds >= stats.transfer_seconds >= 0
    await comm.aclose()
    assert fake.closed


async def test_batches_run_in_order_on_one_thread() -> None:
    comm, fake = make()
    for i in range(20):
        comm.add_send(torch.full((i + 1,), float(i)), 1)
        await comm.execute()
    assert [b[0] for b in fake.batches] == list(range(1, 21))
    assert len(fake.threads) == 1
    assert threading.get_ident() not in fake.threads
    await comm.aclose()


async def test_loop_keeps_running_while_transfer_blocks() -> None:
    comm, fake = make()
    fake.gate.clear()
    comm.add_recv(torch.zeros(3), 1)
    ticks = 0
    async with anyio.create_task_group() as tg:

        async def release_later() -> None:
            nonlocal ticks
            for _ in range(20):
                await anyio.sleep(0.005)
                ticks += 1
            fake.gate.set()

        tg.start_soon(release_later)
        await comm.execute()
    assert ticks == 20
    await comm.aclose()


async def test_second_concurrent_execute_raises_busy() -> None:
    comm, fake = make()
    fake.gate.clear()
    comm.add_send(torch.ones(2), 1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(comm.execute)
        await anyio.sleep(0.01)
        with pytest.raises(aeplb.BusyCommunicatorError, match="already in progress"):
            await comm.execute()
        fake.gate.set()
    assert len(fake.batches) == 1
    await comm.aclose()


async def test_cancelled_execute_keeps_tensors_alive_and_runs_in_order() -> None:
    comm, fake = make()
    fake.gate.clear()
    buf = torch.zeros(1000)
    ref = weakref.ref(buf)
    comm.add_recv(buf, 1)
    with anyio.move_on_after(0.02) as scope:
        await comm.execute()
    assert scope.cancelled_caught
    del buf
    gc.collect()
    assert ref() is not None, "an in-flight tensor must stay alive"
    stats = comm.statistics()
    assert stats.in_flight == 1
    await anyio.sleep(0.02)
    assert comm.statistics().in_flight_seconds >= 0.02
    # the next batch queues behind the cancelled one; not "busy"
    comm.add_send(torch.ones(1), 1)
    fake.gate.set()
    await comm.execute()
    gc.collect()
    assert ref() is None, "the tensor is released once the batch is done"
    assert len(fake.batches) == 2
    assert comm.statistics().batches_completed == 2
    await comm.aclose()


async def test_backend_failure_breaks_communicator() -> None:
    comm, fake = make()
    fake.fail_with = RuntimeError("Connection closed by peer [127.0.0.1]:1234")
    comm.add_send(torch.ones(2), 1)
    with pytest.raises(aeplb.BrokenCommunicatorError, match="Connection closed") as info:
        await comm.execute()
    assert isinstance(info.value.__cause__, RuntimeError)
    stats = comm.statistics()
    assert stats.broken
    assert stats.batches_failed == 1
    assert isinstance(stats.last_error, aeplb.BrokenCommunicatorError)
    with pytest.raises(aeplb.BrokenCommunicatorError):
        comm.add_send(torch.ones(2), 1)
    with pytest.raises(aeplb.BrokenCommunicatorError):
        await comm.execute()
    await comm.aclose()


async def test_backend_timeout_is_transfer_timeout_error() -> None:
    comm, fake = make()
    fake.fail_with = TimeoutError("gloo timed out")
    comm.add_send(torch.ones(2), 1)
    with pytest.raises(aeplb.TransferTimeoutError) as info:
        await comm.execute(timeout=5)
    assert isinstance(info.value, TimeoutError)
    assert comm.statistics().broken
    await comm.aclose()


async def test_stuck_worker_is_abandoned_at_deadline() -> None:
    import aeplb._communicator as mod

    comm, fake = make()
    fake.gate.clear()
    comm.add_send(torch.ones(2), 1)
    old, mod._GRACE_SECONDS = mod._GRACE_SECONDS, 0.05
    try:
        start = time.monotonic()
        with pytest.raises(aeplb.TransferTimeoutError, match="deadline"):
            await comm.execute(timeout=0.1)
        assert time.monotonic() - start < 1.0
    finally:
        mod._GRACE_SECONDS = old
        fake.gate.set()
    assert comm.statistics().broken
    await comm.aclose()


async def test_self_pairs_validated_at_execute_queue_kept() -> None:
    comm, _ = make()
    comm.add_send(torch.ones(3), 0)
    with pytest.raises(aeplb.InvalidTransferError, match="1 send"):
        await comm.execute()
    assert comm.pending == 1
    assert comm.clear() == 1
    comm.add_send(torch.ones(3), 0)
    comm.add_recv(torch.zeros(3, dtype=torch.int32), 0)
    with pytest.raises(aeplb.InvalidTransferError, match="matching dtype"):
        await comm.execute()
    assert comm.pending == 2
    await comm.aclose()


async def test_op_table_taken_at_queueing_matches_the_tensors() -> None:
    transport = FakeTransport(rank=1, world_size=4)
    comm = Communicator(transport, check_peers=False)
    tensors = [
        (torch.ones(5, dtype=torch.float16), 0, "send"),
        (torch.ones(3), 1, "send"),  # self-transfers stay out of the table
        (torch.zeros(2, 7, dtype=torch.int64), 3, "recv"),
        (torch.zeros(3), 1, "recv"),
        (torch.ones(11, dtype=torch.uint8)[2:], 2, "send"),  # a view at an offset
        (torch.zeros(0), 0, "recv"),
    ]
    for t, peer, verb in tensors:
        (comm.add_send if verb == "send" else comm.add_recv)(t, peer)
    assert comm.pending == 6
    stats = await comm.execute()
    (queued, read), *_ = transport.tables
    assert isinstance(queued, np.ndarray) and isinstance(read, np.ndarray)
    assert queued.shape == (4, 6) and np.array_equal(queued, read)
    assert (stats.num_sends, stats.num_recvs) == (2, 2)
    assert (stats.bytes_sent, stats.bytes_received, stats.bytes_copied) == (10 + 9, 112, 12)
    await comm.aclose()


async def test_op_table_rows_agree_on_the_first_and_later_ops_of_a_dtype() -> None:
    """The first op of a dtype takes the full path, later ones the inline one: same rows."""
    transport = FakeTransport(rank=0, world_size=3)
    comm = Communicator(transport, check_peers=False)
    dtypes = [torch.bool, torch.complex64, torch.bfloat16, torch.int16, torch.float64]
    dtypes += [getattr(torch, "float8_e5m2", torch.uint8)]
    shapes = [(3, 5), (7,), (2, 1, 4)]
    for i, dtype in enumerate(dtypes):
        for j, shape in enumerate(shapes):
            t = torch.ones(shape, dtype=torch.float32).to(dtype)
            (comm.add_send if (i + j) % 2 else comm.add_recv)(t, 1 + j % 2)
    b = comm.batch()
    async with b as batch:
        batch.add_send(torch.ones(4, dtype=torch.int16), 2)
    await comm.execute()
    tables = transport.tables
    assert len(tables) == 2
    for queued, read in tables:
        assert np.array_equal(queued, read)
    assert tables[0][0].shape == (1, 6)  # the batch block ran first
    assert tables[1][0].shape == (len(dtypes) * len(shapes), 6)
    assert b.stats is not None and b.stats.bytes_sent == 8
    await comm.aclose()


def test_prepared_batch_ops_table_and_subset_agree() -> None:
    from aeplb._ops import Op, OpKind, PreparedBatch, op_table

    empty = PreparedBatch()
    assert empty.table.shape == (0, 6) and empty.ops == []
    tensors = [torch.ones(3), torch.zeros(4, dtype=torch.int8), torch.ones(2, 2)]
    ops = [Op(OpKind.SEND, tensors[0], 1), Op(OpKind.RECV, tensors[1], 2)]
    ops.append(Op(OpKind.SEND, tensors[2], 2))
    batch = PreparedBatch.of(ops)
    assert np.array_equal(batch.table, op_table(ops))
    part = batch.subset(np.array([2, 0]))
    assert part.tensors == [tensors[2], tensors[0]]
    assert [(op.kind, op.peer) for op in part.ops] == [(OpKind.SEND, 2), (OpKind.SEND, 1)]
    assert np.array_equal(part.table, op_table(part.ops))


async def test_closed_and_idempotent_close() -> None:
    comm, _ = make()
    comm.add_send(torch.ones(1), 1)
    async with comm:
        pass
    assert comm.statistics().closed
    assert comm.pending == 0, "closing discards queued ops"
    await comm.aclose()
    with pytest.raises(aeplb.ClosedCommunicatorError):
        comm.add_recv(torch.ones(1), 1)
    with pytest.raises(aeplb.ClosedCommunicatorError):
        await comm.execute()
    with pytest.raises(aeplb.ClosedCommunicatorError):
        comm.set_stream(None)
    assert "closed" in repr(comm)


async def test_batch_discards_on_error_and_stats_on_success() -> None:
    comm, fake = make()
    with pytest.raises(KeyError):
        async with comm.batch() as b:
            b.add_send(torch.ones(5), 1)
            raise KeyError
    assert fake.batches == []
    async with comm.batch(timeout=10) as b:
        b.add_recv(torch.zeros(5), 1)
    assert b.stats is not None
    assert b.stats.bytes_received == 20
    await comm.aclose()


async def test_set_stream_is_forwarded() -> None:
    comm, fake = make()
    comm.set_stream(None)
    comm.blocking().set_stream(None)
    assert fake.streams == [None, None]
    await comm.aclose()


async def test_statistics_accumulate() -> None:
    comm, _ = make()
    for _ in range(3):
        comm.add_send(torch.ones(10, dtype=torch.float64), 1)
        comm.add_recv(torch.ones(5, dtype=torch.float64), 1)
        await comm.execute()
    s = comm.statistics()
    assert (s.batches_completed, s.bytes_sent, s.bytes_received, s.in_flight) == (3, 240, 120, 0)
    assert s.last_error is None
    assert (s.backend, s.rank, s.world_size) == ("fake", 0, 2)
    with pytest.raises(AttributeError):
        s.bytes_sent = 0  # type: ignore[misc]
    await comm.aclose()


def test_blocking_facade_from_a_plain_thread() -> None:
    comm, fake = make()
    legacy = comm.blocking()
    buf = torch.zeros(2)
    legacy.add_send(torch.ones(2), 1)
    legacy.add_recv(buf, 1)
    stats = legacy.execute()
    assert stats.num_recvs == 1
    assert torch.equal(buf, torch.full((2,), 7.0))
    assert legacy.communicator is comm
    legacy.close()
    assert fake.closed


def test_exception_hierarchy() -> None:
    assert issubclass(aeplb.InvalidTransferError, ValueError)
    assert issubclass(aeplb.TransferTimeoutError, TimeoutError)
    assert issubclass(aeplb.TransferTimeoutError, aeplb.TransferError)
    assert issubclass(aeplb.PeerMismatchError, aeplb.TransferError)
    assert issubclass(aeplb.BackendUnavailableError, RuntimeError)
    for name in aeplb.__all__:
        obj = getattr(aeplb, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, aeplb.AEPLBError)


def test_create_without_process_group_says_what_to_do() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(aeplb.BackendUnavailableError, match="init_process_group"):
        aeplb.create_communicator()


def test_enqueue_on_caller_needs_a_cuda_transport_and_no_manifest() -> None:
    with pytest.raises(aeplb.InvalidTransferError, match="CUDA transport"):
        Communicator(FakeTransport(), check_peers=False, enqueue_on="caller")
    with pytest.raises(aeplb.InvalidTransferError, match="'worker' or 'caller'"):
        Communicator(FakeTransport(), check_peers=False, enqueue_on="main")


def test_manifest_depends_on_each_peer_list_not_on_how_peers_interleave() -> None:
    """Ops queued peer by peer (the usual order, which skips a sort) or interleaved give one
    manifest; swapping two ops of one peer's list changes that peer's digest only."""
    from aeplb import _manifest
    from aeplb._ops import Op, OpKind, op_table

    rng = np.random.default_rng(7)
    dtypes = [torch.float32, torch.bfloat16, torch.uint8]
    lists = {
        (kind, peer): [
            Op(kind, torch.ones(3 + 5 * i, dtype=dtypes[i % 3]), peer)
            for i in range(int(rng.integers(2, 20)))
        ]
        for peer in (0, 2, 3)
        for kind in (OpKind.SEND, OpKind.RECV)
    }
    grouped = [op for ops in lists.values() for op in ops]
    # interleave the groups at random, each group's own order kept
    left = {key: list(ops) for key, ops in lists.items()}
    interleaved = []
    while left:
        key = list(left)[int(rng.integers(len(left)))]
        interleaved.append(left[key].pop(0))
        if not left[key]:
            del left[key]
    assert interleaved != grouped
    a = _manifest.build(op_table(grouped), 4)
    assert torch.equal(a, _manifest.build(op_table(interleaved), 4))
    assert a[1].abs().sum() == 0  # nothing with rank 1
    first, second, *rest = lists[(OpKind.RECV, 2)]
    swapped = [op for key, ops in lists.items() if key != (OpKind.RECV, 2) for op in ops]
    c = _manifest.build(op_table([*swapped, second, first, *rest]), 4)
    assert not torch.equal(a[2], c[2])  # the receive digest for rank 2 differs
    assert torch.equal(a[[0, 3]], c[[0, 3]])
