"""The ipc backend's host-side parts, on CPU: descriptors, the mirrored allocation cache,
and the errors a machine without CUDA gives."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

import aeplb
from aeplb import _manifest
from aeplb._ops import Op, OpKind, op_table
from aeplb.transports._libcuda import Allocation
from aeplb.transports.ipc import (
    IPCTransport,
    _Allocations,
    _decode,
    _encode,
    _merged,
    _Peer,
    _refusal,
    _split_manifest,
    _with_manifest,
)

from .multirank import RankPool


def test_descriptors_round_trip() -> None:
    rng = random.Random(1)
    table = np.array(
        [
            [rng.randrange(1 << 40), rng.randrange(1 << 30), rng.randrange(1 << 30)]
            for _ in range(50)
        ],
        dtype=np.int64,
    )
    new = [
        (rng.randrange(1 << 40), rng.randrange(1 << 47), 1 << 21, rng.randbytes(64))
        for _ in range(7)
    ]
    refusal, got_table, got_new = _decode(_encode(table, new))
    assert refusal is None
    assert np.array_equal(got_table, table)
    assert got_new == new
    _, empty_table, empty_new = _decode(_encode(np.zeros((0, 3), dtype=np.int64), []))
    assert empty_table.shape == (0, 3) and empty_new == []
    refusal, no_table, no_new = _decode(_refusal("memory from expandable segments"))
    assert refusal == "memory from expandable segments"
    assert no_table.shape == (0, 3) and no_new == []


def test_copies_merge_only_where_both_sides_continue() -> None:
    copies = [  # dst, src, bytes, destination buffer id, source allocation
        (1000, 50, 10, 1, 7),
        (1010, 60, 5, 1, 7),
        (1015, 70, 5, 1, 7),  # source does not continue
        (2000, 75, 1, 1, 7),
        (2001, 76, 4, 1, 7),
        (2005, 80, 4, 2, 7),  # continues on both sides, but into another allocation
        (2009, 84, 4, 2, 8),  # ... and from another source allocation
    ]
    columns = [np.array([c[i] for c in copies], dtype=np.int64) for i in range(5)]
    asked = []

    def sources() -> np.ndarray:
        asked.append(1)
        return columns[4]

    dsts, srcs, lengths = _merged(*columns[:4], sources)
    assert list(zip(dsts.tolist(), srcs.tolist(), lengths.tolist(), strict=True)) == [
        (1000, 50, 15),
        (1015, 70, 5),
        (2000, 75, 5),
        (2005, 80, 4),
        (2009, 84, 4),
    ]
    assert asked == [1]
    # no copy continues another: the source allocations are never looked up
    apart = [np.array(v, dtype=np.int64) for v in ([0, 100], [0, 100], [10, 10], [1, 1])]
    assert [a.tolist() for a in _merged(*apart, sources)] == [[0, 100], [0, 100], [10, 10]]
    assert asked == [1]
    empty = np.zeros(0, dtype=np.int64)
    assert all(len(a) == 0 for a in _merged(empty, empty, empty, empty, sources))


def test_owners_query_once_per_allocation() -> None:
    a, b = torch.zeros(1000), torch.zeros(64)
    driver = _StandInDriver([a, b])
    transport, _ = _describer(driver)
    views = [a[500:], b, a[:10], b[3:], a[10:20]]
    ptrs = np.array([v.data_ptr() for v in views], dtype=np.int64)
    owner, allocs = transport._owners(ptrs)
    assert driver.queries == 2
    assert [allocs[k].base for k in owner.tolist()] == [
        a.data_ptr(),
        b.data_ptr(),
        a.data_ptr(),
        b.data_ptr(),
        a.data_ptr(),
    ]


def test_receiver_and_sender_caches_agree() -> None:
    """Both sides replay the same touches, so they evict the same entries."""
    rng = random.Random(2)
    receiver, sender = _Allocations(), _Allocations()
    next_id = 1
    live: list[tuple[int, int, int]] = []  # (id, base, size)
    for batch in range(1, 400):
        rows = []
        for _ in range(rng.randrange(1, 8)):
            if live and rng.random() < 0.6:
                rows.append(rng.choice(live))
            else:
                # a new allocation, sometimes over a freed one's addresses
                base = rng.randrange(0, 64) << 21
                size = rng.choice([1, 2, 3]) << 21
                live = [a for a in live if not (a[1] < base + size and base < a[1] + a[2])]
                entry = (next_id, base, size)
                next_id += 1
                live.append(entry)
                rows.append(entry)
        announced = {}
        for bid, base, size in rows:
            is_new, dropped_r = receiver.touch(bid, base, size, batch)
            if is_new:
                announced[bid] = (base, size)
            # the sender sees only ids, plus base and size of announced ones
            if bid in sender.entries:
                assert not sender.touch(bid, 0, 0, batch)[0]
            else:
                assert bid in announced, "the receiver skipped a handle the sender lacks"
                _, dropped_s = sender.touch(bid, *announced[bid], batch)
                assert dropped_s == dropped_r
        assert sender.entries.keys() == receiver.entries.keys()
    # stale ranges were dropped: what is cached never overlaps
    spans = sorted((b, b + n) for b, n, _ in receiver.entries.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from aeplb.transports import ipc

    monkeypatch.setattr(ipc, "_MAX_MAPPINGS_PER_PEER", 8)
    cache = _Allocations()
    for i in range(100):
        cache.touch(i + 1, i << 30, 1 << 20, batch=i)
        assert len(cache.entries) <= 8
    # entries used in the current batch are never the ones dropped
    for i in range(20):
        cache.touch(1000 + i, (1000 + i) << 30, 1 << 20, batch=500)
    assert len(cache.entries) == 20  # over the bound for one batch rather than drop a live one


async def ipc_without_cuda(rank: int, world: int) -> str:
    with pytest.raises(aeplb.BackendUnavailableError, match="needs CUDA") as info:
        aeplb.create_communicator("ipc")
    comm = aeplb.create_communicator("auto")
    assert comm.backend == "gloo"
    await comm.aclose()
    return str(info.value)


def test_ipc_on_a_machine_without_cuda(world2: RankPool) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    messages = world2.run(ipc_without_cuda, backend="asyncio")
    assert all("backend='ipc'" in m for m in messages)


class _StandInDriver:
    """Answers allocation queries from a table of CPU storages (the CUDA driver on GPUs)."""

    def __init__(self, storages: list[torch.Tensor], capable: bool = True) -> None:
        self.allocs = [
            Allocation(100 + n, t.data_ptr(), t.numel() * t.element_size(), capable)
            for n, t in enumerate(storages)
        ]
        self.queries = 0

    def allocation(self, ptr: int) -> Allocation:
        self.queries += 1
        return next(a for a in self.allocs if a.base <= ptr < a.base + a.size)

    def ipc_handle(self, base: int) -> bytes:
        return base.to_bytes(8, "little") * 8


def _describer(driver: _StandInDriver) -> tuple[IPCTransport, _Peer]:
    transport = object.__new__(IPCTransport)  # no CUDA here: only the host-side logic
    transport._driver = driver  # type: ignore[assignment]
    transport._batches = 1
    transport._handles = {}
    peer = _Peer(rank=1, index=1, ready=None, done=None)  # type: ignore[arg-type]
    return transport, peer


def test_describe_names_allocation_offset_and_size_per_receive() -> None:
    a, b, c = torch.zeros(1000), torch.zeros(500, dtype=torch.uint8), torch.zeros(64)
    driver = _StandInDriver([a, b, c])
    transport, peer = _describer(driver)
    views = [a[10:20], c, b[100:], a[:5], torch.zeros(0), a[500:], b[:7]]
    ops = [Op(OpKind.RECV, v, 1) for v in views]
    rejected: list[str] = []
    refusal, table, new = _decode(transport._describe(peer, op_table(ops), rejected))
    assert refusal is None and not rejected
    assert driver.queries == 3  # once per allocation, not per tensor
    expect = []
    for v in views:
        if v.numel() == 0:
            expect.append([0, 0, 0])
            continue
        alloc = next(x for x in driver.allocs if x.base <= v.data_ptr() < x.base + x.size)
        expect.append([alloc.buffer_id, v.data_ptr() - alloc.base, v.numel() * v.element_size()])
    assert table.tolist() == expect
    assert [entry[0] for entry in new] == [100, 102, 101]  # each handle once, in first use
    # the next batch names the same allocations without sending their handles again
    transport._batches = 2
    _, table2, new2 = _decode(transport._describe(peer, op_table(ops), rejected))
    assert table2.tolist() == expect and new2 == []


def test_describe_refuses_memory_ipc_cannot_share() -> None:
    a = torch.zeros(100)
    transport, peer = _describer(_StandInDriver([a], capable=False))
    rejected: list[str] = []
    ops = [Op(OpKind.RECV, a, 1)]
    refusal, table, new = _decode(transport._describe(peer, op_table(ops), rejected))
    assert refusal is not None and "expandable_segments" in refusal
    assert rejected == [refusal] and table.shape == (0, 3) and new == []
    assert peer.mine.entries == {}  # nothing noted as sent: the caches stay in step


def test_manifests_travel_with_the_descriptors() -> None:
    desc = _encode(np.arange(6, dtype=np.int64).reshape(2, 3), [])
    manifest = torch.arange(1, 15, dtype=torch.int64).numpy().tobytes()
    assert _split_manifest(_with_manifest(manifest, desc)) == (manifest, desc)
    assert _split_manifest(_with_manifest(b"", desc)) == (b"", desc)


def _checker(world: int, rank: int) -> IPCTransport:
    transport = object.__new__(IPCTransport)  # no CUDA here: only the host-side logic
    transport.rank, transport.world_size = rank, world
    transport._peers = {
        r: _Peer(rank=r, index=r, ready=None, done=None)  # type: ignore[arg-type]
        for r in range(world)
        if r != rank
    }
    return transport


def _ops(pairs: list[tuple[OpKind, int, int]]) -> list[Op]:
    return [Op(kind, torch.ones(n), peer) for kind, peer, n in pairs]


@pytest.mark.parametrize("bad", [False, True])
def test_in_band_manifest_check_agrees_on_every_rank(bad: bool) -> None:
    world = 3
    # rank r sends 10 + r elements to every other rank; rank 2 expects one element too few
    # from rank 0 when bad
    lists = {
        r: _ops(
            [(OpKind.SEND, p, 10 + r) for p in range(world) if p != r]
            + [
                (OpKind.RECV, p, 10 + p - (1 if bad and (r, p) == (2, 0) else 0))
                for p in range(world)
                if p != r
            ]
        )
        for r in range(world)
    }
    manifests = {r: _manifest.build(op_table(lists[r]), world) for r in range(world)}
    desc = _encode(np.zeros((0, 3), dtype=np.int64), [])
    messages = {r: _with_manifest(manifests[r].numpy().tobytes(), desc) for r in range(world)}
    for r in range(world):
        check = _checker(world, r)._check_manifests
        theirs = {p: _split_manifest(messages[p])[0] for p in range(world) if p != r}
        if bad:
            with pytest.raises(aeplb.PeerMismatchError, match="rank 0 sends 1 tensor"):
                check(manifests[r], theirs)
        else:
            check(manifests[r], theirs)
