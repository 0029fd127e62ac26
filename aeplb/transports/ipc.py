"""Copy-engine transport: ranks on one node move data with CUDA IPC, running no kernel.

Each receiver tells each sender, through a shared-memory mailbox, where its receive buffers
are (the allocation's IPC handle, sent once per allocation and cached by the sender, plus an
offset) and records an interprocess "ready" event on its stream. The sender waits for that
event on its copy stream, copies straight into the receiver's memory with asynchronous
device-to-device memcpy (the copy engines, over NVLink), records an interprocess "done"
event and says so through the mailbox; the receiver's stream waits for that event. The host
never synchronizes a stream and no SM runs transfer code. Ranks on other nodes go through
NCCL in the same batch.

The receiver's descriptors carry byte counts, so a sender never writes past a buffer even
with ``check_peers=False``: op lists that do not pair up raise PeerMismatchError on both
sides instead.
"""

from __future__ import annotations

import bisect
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import _cuda, _manifest
from .._exceptions import BackendUnavailableError, InvalidTransferError, PeerMismatchError
from .._ops import IS_RECV, NBYTES, PEER, PTR, PreparedBatch
from . import _node
from ._cudabase import CudaTransport
from ._libcuda import IPC_HANDLE_BYTES, Allocation, CUDAError, Driver
from ._mailbox import Mailbox
from ._packing import WireOp

_GATHER, _DESC, _DONE = 0, 1, 2
_CAPACITIES = (64 << 10, 1 << 20, 4 << 10)
_OK, _MISMATCH = 0, 1
# Mappings of one peer's allocations kept open; older ones are closed first.
_MAX_MAPPINGS_PER_PEER = 4096
# How long close() waits for queued copies before leaving them (a failed peer).
_CLOSE_WAIT_S = 10.0


class _Allocations:
    """The allocations of one receiver that one sender has a mapping of.

    The receiver keeps one of these per sender and the sender one per receiver, and both
    update it with the same calls in the same order (the receiver's descriptor rows), so
    they agree on which handles the sender already holds without a round trip.
    """

    def __init__(self) -> None:
        self.entries: dict[int, list[int]] = {}  # buffer id -> [base, size, last batch]

    def touch(self, buffer_id: int, base: int, size: int, batch: int) -> tuple[bool, list[int]]:
        """Notes a use; returns (is it new, buffer ids dropped to make room)."""
        entry = self.entries.get(buffer_id)
        if entry is not None:
            entry[2] = batch
            return False, []
        # A new allocation over an old one's range means the old one was freed there.
        dropped = [
            bid for bid, (b, n, _) in self.entries.items() if b < base + size and base < b + n
        ]
        for bid in dropped:
            del self.entries[bid]
        if len(self.entries) >= _MAX_MAPPINGS_PER_PEER:
            idle = [bid for bid, e in self.entries.items() if e[2] != batch]
            if idle:
                oldest = min(idle, key=lambda bid: self.entries[bid][2])
                del self.entries[oldest]
                dropped.append(oldest)
        self.entries[buffer_id] = [base, size, batch]
        return True, dropped


@dataclass
class _Peer:
    """Another rank on this node."""

    rank: int  # within the group
    index: int  # within the node's mailbox
    ready: torch.cuda.Event
    done: torch.cuda.Event
    theirs: _Allocations = field(default_factory=_Allocations)  # mapped here
    mine: _Allocations = field(default_factory=_Allocations)  # mapped there
    mapped: dict[int, int] = field(default_factory=dict)  # their buffer id -> pointer here


@dataclass
class Node:
    """What :func:`connect` set up: the mailbox, events and peers of this node."""

    mailbox: Mailbox
    ready: torch.cuda.Event
    done: torch.cuda.Event
    peers: dict[int, _Peer]  # by group rank


def connect(
    group: dist.ProcessGroup, rank: int, world_size: int, device: torch.device
) -> Node | None:
    """Sets up IPC with the other ranks on this node; collective over ``group``.

    Returns None when this rank has no other rank on its node. Raises
    BackendUnavailableError, identically on every rank, when any rank cannot use IPC.
    """
    problem = ""
    probe = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    ready = done = None
    mine: dict[str, Any] = {}
    try:
        driver = Driver.get()
        with torch.cuda.device(device):
            driver.use_primary_context(device.index or 0)
            alloc = driver.allocation(probe.data_ptr())
            if not alloc.ipc_capable:
                raise BackendUnavailableError(
                    "this process's CUDA memory cannot be shared by IPC handle (is "
                    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True set?)"
                )
            mine["probe"] = driver.ipc_handle(alloc.base)
            ready = torch.cuda.Event(interprocess=True)  # type: ignore[no-untyped-call]
            done = torch.cuda.Event(interprocess=True)  # type: ignore[no-untyped-call]
            ready.record()
            done.record()
            mine["events"] = (ready.ipc_handle(), done.ipc_handle())  # type: ignore[no-untyped-call]
    except (BackendUnavailableError, CUDAError, RuntimeError) as exc:
        problem = f"rank {rank}: {exc}"
    gathered = _node.gather((_node.identity(), mine, problem), group, device)
    _raise_problems([p for _, _, p in gathered])
    infos = [who for who, _, _ in gathered]
    local = [r for r in range(world_size) if infos[r]["node"] == infos[rank]["node"]]
    # Opening every local peer's probe proves IPC and peer access work between us; every
    # rank takes part in the mailbox's gathers, alone on its node or not.
    try:
        for r in local:
            if r != rank:
                driver.ipc_close(driver.ipc_open(gathered[r][1]["probe"]))
    except CUDAError as exc:
        problem = f"rank {rank}: {exc}"
    mailbox, problems = _node.open_mailbox(
        rank, infos, _CAPACITIES, lambda p: _node.gather(p, group, device), problem
    )
    _raise_problems(problems)
    del probe
    if mailbox is None:
        return None
    assert ready is not None and done is not None
    peers = {}
    for r in local:
        if r == rank:
            continue
        ready_handle, done_handle = gathered[r][1]["events"]
        peers[r] = _Peer(
            rank=r,
            index=local.index(r),
            ready=_open_event(device, ready_handle),
            done=_open_event(device, done_handle),
        )
    return Node(mailbox, ready, done, peers)


def _open_event(device: torch.device, handle: bytes) -> torch.cuda.Event:
    event: torch.cuda.Event = torch.cuda.Event.from_ipc_handle(device, handle)  # type: ignore[no-untyped-call]
    return event


def _raise_problems(problems: list[str]) -> None:
    problems = [p for p in problems if p]
    if problems:
        raise BackendUnavailableError(
            "backend='ipc' cannot run on this group: " + "; ".join(problems[:4])
        )


# -- descriptors: what a receiver tells a sender ---------------------------------------

# Every DESC message starts with the sender's manifest (empty unless checked in band).
_MANIFEST_HEAD = struct.Struct("<q")


def _with_manifest(manifest: bytes, desc: bytes) -> bytes:
    return _MANIFEST_HEAD.pack(len(manifest)) + manifest + desc


def _split_manifest(data: bytes) -> tuple[bytes, bytes]:
    (n,) = _MANIFEST_HEAD.unpack_from(data)
    start = _MANIFEST_HEAD.size
    return data[start : start + n], data[start + n :]


_DESC_HEAD = struct.Struct("<qq")  # ops, new allocations
_NEW = struct.Struct(f"<qqq{IPC_HANDLE_BYTES}s")  # buffer id, base, size, handle


def _encode(ops: np.ndarray, new: list[tuple[int, int, int, bytes]]) -> bytes:
    parts = [_DESC_HEAD.pack(len(ops), len(new)), ops.tobytes()]
    parts.extend(_NEW.pack(*entry) for entry in new)
    return b"".join(parts)


def _refusal(reason: str) -> bytes:
    """A descriptor saying this rank cannot receive by IPC in this batch, and why."""
    return _DESC_HEAD.pack(-1, 0) + reason.encode()


def _decode(
    data: bytes,
) -> tuple[str | None, np.ndarray, list[tuple[int, int, int, bytes]]]:
    """(refusal or None, [ops, 3] table, new allocations)."""
    n_ops, n_new = _DESC_HEAD.unpack_from(data)
    pos = _DESC_HEAD.size
    if n_ops < 0:
        return data[pos:].decode(errors="replace"), np.zeros((0, 3), dtype=np.int64), []
    ops = np.frombuffer(data, dtype=np.int64, count=3 * n_ops, offset=pos).reshape(n_ops, 3)
    pos += ops.nbytes
    new = [_NEW.unpack_from(data, pos + i * _NEW.size) for i in range(n_new)]
    return None, ops, new


class IPCTransport(CudaTransport):
    name = "ipc"
    can_enqueue_on_caller = False

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        node: Node | None,
        remote: CudaTransport | None,
    ) -> None:
        super().__init__(rank, world_size, device, coalesce=False)
        self._node = node
        self._peers = node.peers if node is not None else {}
        self._is_local = np.zeros(world_size, dtype=bool)  # by group rank
        self._is_local[list(self._peers)] = True
        self._remote = remote
        self._gather = None
        if node is not None:
            indices = {r: peer.index for r, peer in self._peers.items()}
            self._gather = _node.NodeGather(node.mailbox, _GATHER, rank, indices, world_size)
        self._driver = Driver.get()
        self._copy_stream: torch.cuda.Stream | None = None
        self._batches = 0
        # my allocations: buffer id -> IPC handle (exported once)
        self._handles: dict[int, bytes] = {}
        # seconds spent in each phase of the last batch, for benchmarks
        self.phases: dict[str, float] = {}
        self._held: list[torch.Tensor] = []  # receive buffers of failed batches
        # one driver call per peer for all its copies, where the driver has it (12.8+)
        self._copy_batch = self._driver.has_copy_batch

    @property
    def posts_on_group(self) -> bool:  # type: ignore[override]
        return self._remote is not None  # ranks on other nodes: NCCL on the caller's group

    @property
    def checks_in_band(self) -> bool:  # type: ignore[override]
        # The descriptor exchange reaches every rank only when no rank is on another node.
        return self._remote is None

    @property
    def local_ranks(self) -> list[int]:
        """Group ranks this rank reaches by IPC (other than itself)."""
        return sorted(self._peers)

    def enter_thread(self) -> None:
        super().enter_thread()
        self._driver.use_primary_context(self.device.index or 0)

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        if self._remote is not None:
            return self._remote.all_gather(local, deadline)
        if self._gather is None:  # alone in the group
            return local.unsqueeze(0).clone()
        return self._gather.all_gather(local, deadline)

    def gather_into(self, mine: torch.Tensor, out: torch.Tensor) -> None:  # pragma: no cover
        raise AssertionError("all_gather goes through the mailbox or the remote transport")

    def post_group(self, ops: list[WireOp]) -> None:  # pragma: no cover
        raise AssertionError("network ops go through IPC or the remote transport")

    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        try:
            self._run(batch, ready, deadline)
        except (TimeoutError, OSError, RuntimeError):
            # A peer's copy engine may still be writing into these buffers, and nothing
            # here can stop it: keep them from the caching allocator until close().
            received = batch.table[:, IS_RECV].tolist()
            self._held.extend(t for t, r in zip(batch.tensors, received, strict=True) if r)
            raise

    def _run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        t0 = time.perf_counter()
        self.enter_thread()
        self._batches += 1
        stream = self.stream()
        if self._copy_stream is None:
            # one stream: spreading copies over several measured no faster on H200
            self._copy_stream = _cuda.new_stream(self.device)
        copy_stream = self._copy_stream
        table = batch.table
        peer_of = table[:, PEER]
        is_recv = table[:, IS_RECV].astype(bool)
        remote = np.flatnonzero(~self._is_local[peer_of])
        recvs: dict[int, np.ndarray] = {}  # table rows of the receives, by peer
        sends: dict[int, np.ndarray] = {}  # indices of the sends, by peer
        for r in self._peers:
            mask = peer_of == r
            recvs[r] = table[mask & is_recv]
            sends[r] = np.flatnonzero(mask & ~is_recv)
        t_split = time.perf_counter()
        node = self._node
        problems: list[str] = []
        rejected: list[str] = []
        manifest = b"" if batch.manifest is None else batch.manifest.numpy().tobytes()
        with torch.cuda.stream(stream):
            self.wait_ready(ready, stream)
            if node is not None:
                node.ready.record(stream)
                copy_stream.wait_event(node.ready)
                descs = {
                    peer.index: _with_manifest(
                        manifest, self._describe(peer, recvs[peer.rank], rejected)
                    )
                    for peer in self._peers.values()
                }
        t1 = time.perf_counter()
        t2 = t3 = t1
        indices = [peer.index for peer in self._peers.values()]
        theirs: dict[int, bytes] = {}
        if node is not None:
            theirs = node.mailbox.exchange(_DESC, descs, indices, deadline)
            t2 = time.perf_counter()
        split = {index: _split_manifest(message) for index, message in theirs.items()}
        # Applied before the manifest check: the receivers already counted these mappings.
        tables = {
            peer.index: self._receive(peer, split[peer.index][1]) for peer in self._peers.values()
        }
        if batch.manifest is not None:
            # Raises on every rank alike, before any data moves (self-copies included).
            self._check_manifests(batch.manifest, {i: m for i, (m, _) in split.items()})
        t_check = time.perf_counter()
        with torch.cuda.stream(stream):
            self.self_copies(batch)
            if len(remote):
                assert self._remote is not None
                self._remote.launch(batch.subset(remote), stream)
        if node is not None:
            replies = self._send_all(node, table, sends, tables, problems)
            t3 = time.perf_counter()
            # every pair replies, so a mismatch is reported on both of its ranks
            statuses = node.mailbox.exchange(_DONE, replies, indices, deadline)
            stream.wait_stream(copy_stream)
            for peer in self._peers.values():
                reply = statuses[peer.index]
                if reply[0] != _OK:
                    problems.append(reply[1:].decode(errors="replace"))
                elif len(recvs[peer.rank]):
                    stream.wait_event(peer.done)
        t4 = time.perf_counter()
        finished = _cuda.new_event()
        finished.record(stream)
        self.wait(finished, deadline)
        t5 = time.perf_counter()
        self.phases = {
            "split": t_split - t0,
            "describe": t1 - t_split,
            "exchange": t2 - t1,
            "apply_check": t_check - t2,
            "enqueue_copies": t3 - t_check,
            "replies": t4 - t3,
            "gpu_wait": t5 - t4,
        }
        if rejected:
            raise InvalidTransferError(rejected[0])
        if problems:
            raise PeerMismatchError(
                f"send/recv lists do not pair up (seen on rank {self.rank}): "
                + "; ".join(problems[:8])
                + ". Pairs that matched were transferred; others were not touched. Each "
                "add_send(t, dst) needs a matching add_recv on dst, queued in the same "
                "order with the same size."
            )

    def _check_manifests(self, local: torch.Tensor, manifests: dict[int, bytes]) -> None:
        """The communicator's manifest check, on the peers' manifests (by mailbox index)
        that came with their descriptors.

        The descriptors were applied first, so the mirrored caches stay in step when this
        raises.
        """
        mine = local.numpy()
        rows = np.empty((self.world_size, *mine.shape), dtype=mine.dtype)
        rows[self.rank] = mine
        for peer in self._peers.values():
            theirs = manifests[peer.index]
            rows[peer.rank] = np.frombuffer(theirs, dtype=mine.dtype).reshape(mine.shape)
        _manifest.check_rows(rows, self.rank)

    def _describe(self, peer: _Peer, rows: np.ndarray, rejected: list[str]) -> bytes:
        """Where ``peer`` should write what it sends here: (buffer id, offset, bytes) per op.

        ``rows`` are the op-table rows of the receives from ``peer``, in queue order.
        """
        out = np.zeros((len(rows), 3), dtype=np.int64)
        live = np.flatnonzero(rows[:, NBYTES] > 0)
        if not len(live):
            return _encode(out, [])
        ptrs = rows[live, PTR]
        owner, allocs = self._owners(ptrs)
        capable = np.array([a.ipc_capable for a in allocs], dtype=bool)
        refused = np.flatnonzero(~capable[owner])
        if len(refused):
            rejected.append(
                f"add_recv: tensor {int(live[refused[0]])} from rank {peer.rank} lies in "
                "memory that CUDA IPC cannot share (PYTORCH_CUDA_ALLOC_CONF="
                "expandable_segments:True or a custom allocator); receive into "
                "tensors from the default CUDA caching allocator or use "
                "backend='nccl'. Nothing moved from that rank."
            )
            return _refusal(rejected[-1])
        ids = np.array([a.buffer_id for a in allocs], dtype=np.int64)
        bases = np.array([a.base for a in allocs], dtype=np.int64)
        out[live, 0] = ids[owner]
        out[live, 1] = ptrs - bases[owner]
        out[live, 2] = rows[live, NBYTES]
        # The cache is updated in the order of first use, which the sender replays.
        new: list[tuple[int, int, int, bytes]] = []
        for k in _first_uses(owner):
            alloc = allocs[k]
            if peer.mine.touch(alloc.buffer_id, alloc.base, alloc.size, self._batches)[0]:
                new.append((alloc.buffer_id, alloc.base, alloc.size, self._handle(alloc)))
        return _encode(out, new)

    def _owners(self, ptrs: np.ndarray) -> tuple[np.ndarray, list[Allocation]]:
        """The allocation each (live) pointer lies in, as an index into the returned list.

        The tensors are alive, so the addresses from one that lies inside an allocation up
        to that allocation's end belong to it: one driver query per allocation.
        """
        order = np.argsort(ptrs, kind="stable")
        by_address = ptrs[order].tolist()
        owner_by_address = np.empty(len(ptrs), dtype=np.int64)
        allocs: list[Allocation] = []
        i = 0
        while i < len(by_address):
            alloc = self._driver.allocation(by_address[i])
            j = bisect.bisect_left(by_address, alloc.base + alloc.size, i + 1)
            owner_by_address[i:j] = len(allocs)
            allocs.append(alloc)
            i = j
        owner = np.empty_like(owner_by_address)
        owner[order] = owner_by_address
        return owner, allocs

    def _source_owners(self, srcs: np.ndarray) -> np.ndarray:
        return self._owners(srcs)[0]

    def _handle(self, alloc: Allocation) -> bytes:
        handle = self._handles.get(alloc.buffer_id)
        if handle is None:
            if len(self._handles) >= _MAX_MAPPINGS_PER_PEER:
                self._handles.clear()  # only a cache: a handle can be fetched again
            handle = self._handles[alloc.buffer_id] = self._driver.ipc_handle(alloc.base)
        return handle

    def _apply(
        self, peer: _Peer, table: np.ndarray, new: list[tuple[int, int, int, bytes]]
    ) -> None:
        """Mirrors the receiver's cache updates: opens new mappings, closes dropped ones."""
        announced = {bid: (base, size, handle) for bid, base, size, handle in new}
        for bid in _first_uses(table[table[:, 2] > 0, 0]):
            if bid in peer.theirs.entries:
                peer.theirs.touch(bid, 0, 0, self._batches)
                continue
            if bid not in announced:
                raise RuntimeError(
                    f"rank {peer.rank} referred to allocation {bid} without its handle; "
                    "the IPC caches of the two ranks disagree"
                )
            base, size, handle = announced[bid]
            _, dropped = peer.theirs.touch(bid, base, size, self._batches)
            for old in dropped:
                self._driver.ipc_close(peer.mapped.pop(old))
            peer.mapped[bid] = self._driver.ipc_open(handle)

    def _receive(self, peer: _Peer, desc: bytes) -> tuple[str | None, np.ndarray]:
        """Decodes a peer's descriptor and applies its cache updates: (refusal, table)."""
        refusal, table, new = _decode(desc)
        if refusal is None:
            self._apply(peer, table, new)
        return refusal, table

    def _send_all(
        self,
        node: Node,
        table: np.ndarray,
        sends: dict[int, np.ndarray],
        descs: dict[int, tuple[str | None, np.ndarray]],
        problems: list[str],
    ) -> dict[int, bytes]:
        """Queues the copies the peers' descriptors ask for; returns the replies owed."""
        copy_stream = self._copy_stream
        assert copy_stream is not None
        replies: dict[int, bytes] = {}
        for peer in self._peers.values():
            refusal, theirs = descs[peer.index]
            mine = sends[peer.rank]
            if refusal is not None:
                problem = f"rank {peer.rank} cannot receive by IPC: {refusal}"
                problems.append(problem)
                replies[peer.index] = bytes([_MISMATCH]) + problem.encode()
                continue
            sizes = table[mine, NBYTES]
            if len(mine) != len(theirs) or not np.array_equal(sizes, theirs[:, 2]):
                problem = (
                    f"rank {self.rank} sends {len(mine)} tensor(s) ({int(sizes.sum())} bytes) "
                    f"to rank {peer.rank}, which expects {len(theirs)} "
                    f"({int(theirs[:, 2].sum())} bytes)"
                )
                problems.append(problem)
                replies[peer.index] = bytes([_MISMATCH]) + problem.encode()
                continue
            replies[peer.index] = bytes([_OK])
            live = np.flatnonzero(sizes > 0)
            if not len(live):
                continue
            bids, inverse = np.unique(theirs[live, 0], return_inverse=True)
            mapped = np.array([peer.mapped[b] for b in bids.tolist()], dtype=np.int64)
            srcs = table[mine[live], PTR]
            dsts, srcs, lengths = _merged(
                mapped[inverse] + theirs[live, 1],
                srcs,
                sizes[live],
                theirs[live, 0],
                partial(self._source_owners, srcs),
            )
            copy_stream.wait_event(peer.ready)
            handle = copy_stream.cuda_stream
            if self._copy_batch and len(dsts) > 1:
                # one call: the driver spaces the copies out less than separate calls do
                # (48 x 14.7 MB on H200: 371 against 324 GB/s, benchmarks/copy_floor.py)
                self._driver.copy_batch_async(dsts, srcs, lengths, handle)
            else:
                for dst, src, nbytes in zip(
                    dsts.tolist(), srcs.tolist(), lengths.tolist(), strict=True
                ):
                    self._driver.copy_async(dst, src, nbytes, handle)
        node.done.record(copy_stream)
        return replies

    def abort(self) -> None:
        if self._remote is not None:
            self._remote.abort()

    def close(self) -> None:
        self.enter_thread()
        deadline = time.monotonic() + _CLOSE_WAIT_S
        for stream in [self.stream()] + ([self._copy_stream] if self._copy_stream else []):
            queued = _cuda.new_event()
            queued.record(stream)
            try:
                _cuda.wait_event(queued, deadline)
            except TimeoutError:
                # Still waiting on a peer that failed: unmapping now could fault its
                # copies. Leave the mappings and held buffers to process exit.
                return
        for peer in self._peers.values():
            for ptr in peer.mapped.values():
                try:
                    self._driver.ipc_close(ptr)
                except CUDAError:
                    pass
            peer.mapped.clear()
        if self._node is not None:
            self._node.mailbox.close()
        if self._remote is not None:
            self._remote.close()
        self._held.clear()


def _first_uses(values: np.ndarray) -> list[int]:
    """The distinct values in order of first appearance."""
    distinct, first = np.unique(values, return_index=True)
    return [int(v) for v in distinct[np.argsort(first)]]


def _merged(
    dsts: np.ndarray,
    srcs: np.ndarray,
    lengths: np.ndarray,
    bids: np.ndarray,
    source_allocations: Callable[[], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joins copies whose source and destination both continue the previous one's.

    Only within one allocation on each side (the same destination buffer id, the same
    source allocation as ``source_allocations()`` numbers them, asked only when some copy
    continues another): a copy may not span two allocations, even back to back ones.
    """
    if len(dsts) < 2:
        return dsts, srcs, lengths
    ends = lengths[:-1]
    joins = (dsts[1:] == dsts[:-1] + ends) & (srcs[1:] == srcs[:-1] + ends)
    joins &= bids[1:] == bids[:-1]
    if joins.any():
        owners = source_allocations()
        joins &= owners[1:] == owners[:-1]
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    return dsts[starts], srcs[starts], np.add.reduceat(lengths, starts)
