from __future__ import annotations

import enum
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ._exceptions import InvalidTransferError
from ._runtime import gil_slices


class OpKind(enum.Enum):
    SEND = "send"
    RECV = "recv"


class Op:
    """One network send or receive, as transports that work op by op see it."""

    __slots__ = ("kind", "peer", "tensor")

    def __init__(self, kind: OpKind, tensor: torch.Tensor, peer: int) -> None:
        self.kind = kind
        self.tensor = tensor
        self.peer = peer

    def __repr__(self) -> str:
        return f"Op({self.kind.name}, {tuple(self.tensor.shape)} {self.tensor.dtype}, {self.peer})"


def check_op(kind: OpKind, tensor: object, peer: object, world_size: int) -> int:
    """Validates one op as it is queued and returns its peer as an int; the message names
    the argument and the fix."""
    if (
        isinstance(tensor, torch.Tensor)
        and tensor.layout is torch.strided
        and tensor.is_contiguous()
        and _plain_memory(tensor) is None
        and type(peer) is int
        and 0 <= peer < world_size
    ):
        return peer
    verb = "add_send" if kind is OpKind.SEND else "add_recv"
    rank_arg = "dst_rank" if kind is OpKind.SEND else "src_rank"
    if not isinstance(tensor, torch.Tensor):
        raise InvalidTransferError(
            f"{verb}: tensor must be a torch.Tensor, got {type(tensor).__name__}"
        )
    problem = _plain_memory(tensor)
    if problem is not None:
        raise InvalidTransferError(f"{verb}: tensor {problem}")
    if tensor.layout is not torch.strided:
        raise InvalidTransferError(
            f"{verb}: tensor has layout {tensor.layout}; pass a dense (strided) tensor"
        )
    if not tensor.is_contiguous():
        raise InvalidTransferError(
            f"{verb}: tensor of shape {tuple(tensor.shape)} is not contiguous; "
            "pass tensor.contiguous() (and copy received data back yourself) or a contiguous view"
        )
    if not isinstance(peer, int) or isinstance(peer, bool):
        raise InvalidTransferError(
            f"{verb}: {rank_arg} must be an int rank within the group, got {peer!r}"
        )
    if not 0 <= peer < world_size:
        raise InvalidTransferError(
            f"{verb}: {rank_arg}={peer} is out of range for a group of {world_size} ranks; "
            f"ranks are group ranks in [0, {world_size})"
        )
    return int(peer)  # an int subclass (numpy ints are not)


def _plain_memory(tensor: torch.Tensor) -> str | None:
    """Why the tensor's memory does not hold its values as they read, or None.

    Transports move memory: a view whose values are computed on read (conjugate or
    negative bits) would move the wrong values, and nested or quantized tensors have no
    flat memory to move (a byte view of a quantized tensor crashes the process).
    """
    if tensor.is_nested:
        return "is a nested tensor; move its components (tensor.unbind()) one by one"
    if tensor.is_quantized:
        return (
            "is quantized; move tensor.int_repr() and the scales and zero points as "
            "separate tensors"
        )
    if tensor.is_conj():
        return "is a conjugate view (is_conj()); pass tensor.resolve_conj()"
    if tensor.is_neg():
        return "is a negative view (is_neg()); pass tensor.resolve_neg()"
    return None


# Columns of an op table: one int64 row per network op, computed once per batch so the
# manifest and the transports work on arrays instead of asking each tensor again.
PEER, IS_RECV, DTYPE, NUMEL, NBYTES, PTR = range(6)
_TABLE_COLUMNS = 6

_DTYPE_CODES: dict[torch.dtype, int] = {}
_DTYPES: dict[int, torch.dtype] = {}
# dtype -> (code, bytes per element), for queueing: two lookups in one
DTYPE_INFO: dict[torch.dtype, tuple[int, int]] = {}


def dtype_code(dtype: torch.dtype) -> int:
    code = _DTYPE_CODES.get(dtype)
    if code is None:  # the same on every rank: a hash of the dtype's name
        code = _DTYPE_CODES[dtype] = zlib.crc32(str(dtype).encode())
        _DTYPES[code] = dtype
        if not dtype.is_complex:  # only complex tensors can be conjugate views: full checks
            DTYPE_INFO[dtype] = (code, dtype.itemsize)
    return code


def dtype_of(code: int) -> torch.dtype:
    """The dtype of a code this process made with :func:`dtype_code`."""
    return _DTYPES[code]


def op_table(ops: list[Op]) -> np.ndarray:
    """The [ops, 6] int64 table of ``ops`` (columns PEER ... PTR), as a queue takes it."""
    return PreparedBatch.of(ops).table


class OpQueue:
    """Queued ops, sorted as they arrive into network ops and self-transfers.

    A network op is kept as its tensor and its op-table row, taken while the caller queues
    it (the tensor is at hand then), so ``execute()`` runs no per-op Python on the caller's
    thread and an ``ipc`` batch never builds per-op objects at all.
    """

    __slots__ = ("received", "rows", "self_recvs", "self_sends", "sends", "sent", "tensors")

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []  # network ops, in queue order
        self.rows: list[int] = []  # their op table, flattened
        self.self_sends: list[torch.Tensor] = []
        self.self_recvs: list[torch.Tensor] = []
        self.sent = self.received = self.sends = 0

    def __len__(self) -> int:
        return len(self.tensors) + len(self.self_sends) + len(self.self_recvs)

    def add(self, kind: OpKind, t: torch.Tensor, peer: int, rank: int) -> None:
        """Queues a checked op (see :func:`check_op`).

        ``Communicator._enqueue`` does the same inline for the usual op; keep them alike.
        """
        if peer == rank:
            (self.self_sends if kind is OpKind.SEND else self.self_recvs).append(t)
            return
        nbytes = t.nbytes
        is_recv = kind is OpKind.RECV
        self.tensors.append(t)
        self.rows.extend((peer, is_recv, dtype_code(t.dtype), t.numel(), nbytes, t.data_ptr()))
        if is_recv:
            self.received += nbytes
        else:
            self.sent += nbytes
            self.sends += 1


# Ints converted per call: np.fromiter holds the GIL throughout (14 ms for 100,000 ops,
# which the event loop's thread waited out), so long tables are built in slices.
_TABLE_SLICE = 60_000


def _flat_table(rows: list[int]) -> np.ndarray:
    # fromiter: a third faster than np.array on a long list of ints
    if len(rows) <= _TABLE_SLICE:
        return np.fromiter(rows, dtype=np.int64, count=len(rows))
    out = np.empty(len(rows), dtype=np.int64)
    for i in gil_slices(len(rows), _TABLE_SLICE):
        part = rows[i : i + _TABLE_SLICE]
        out[i : i + len(part)] = np.fromiter(part, dtype=np.int64, count=len(part))
    return out


@dataclass
class PreparedBatch:
    """A batch split into network ops and local copies, with byte counts."""

    tensors: list[torch.Tensor] = field(default_factory=list)  # network ops', in queue order
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0
    num_sends: int = 0
    num_recvs: int = 0
    # this rank's manifest, for a transport that exchanges it itself (checks_in_band)
    manifest: torch.Tensor | None = None
    # the op table flattened, as queued (OpQueue.rows)
    rows: list[int] | None = field(default=None, repr=False)
    _table: np.ndarray | None = field(default=None, repr=False)
    _ops: list[Op] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, ops: list[Op]) -> PreparedBatch:
        """A batch of network ops only."""
        queue = OpQueue()
        for op in ops:
            queue.add(op.kind, op.tensor, op.peer, rank=-1)  # no rank: none is a self-transfer
        return cls(tensors=queue.tensors, rows=queue.rows, _ops=list(ops))

    @property
    def table(self) -> np.ndarray:
        """The [ops, 6] op table, built on first use (on the worker, not the caller)."""
        if self._table is None:
            rows = self.rows or []
            self._table = _flat_table(rows).reshape(-1, _TABLE_COLUMNS)
        return self._table

    @property
    def ops(self) -> list[Op]:
        """The network ops, built on first use from the tensors and the table."""
        if self._ops is None:
            table = self.table
            kinds = (OpKind.SEND, OpKind.RECV)
            self._ops = [
                Op(kinds[is_recv], t, peer)
                for t, peer, is_recv in zip(
                    self.tensors, table[:, PEER].tolist(), table[:, IS_RECV].tolist(), strict=True
                )
            ]
        return self._ops

    def subset(self, indices: np.ndarray) -> PreparedBatch:
        """The network ops at ``indices`` (table rows), as a batch of their own."""
        return PreparedBatch(
            tensors=[self.tensors[i] for i in indices.tolist()], _table=self.table[indices]
        )

    def all_tensors(self) -> list[torch.Tensor]:
        out = list(self.tensors)
        for src, dst in self.copies:
            out.extend((src, dst))
        return out


def prepare(queue: OpQueue, rank: int) -> PreparedBatch:
    """Pairs self-sends with self-receives in queue order; the rest are network ops."""
    self_sends, self_recvs = queue.self_sends, queue.self_recvs
    if len(self_sends) != len(self_recvs):
        raise InvalidTransferError(
            f"rank {rank} queued {len(self_sends)} send(s) to itself but {len(self_recvs)} "
            "receive(s) from itself; self-sends pair with self-receives in queue order, "
            "so queue one add_recv(tensor, own_rank) per add_send(tensor, own_rank)"
        )
    copies = list(zip(self_sends, self_recvs, strict=True))
    for i, (s, r) in enumerate(copies):
        if s.dtype != r.dtype or s.numel() != r.numel():
            raise InvalidTransferError(
                f"self-transfer #{i} on rank {rank}: send is {s.dtype} x {s.numel()} but the "
                f"paired receive is {r.dtype} x {r.numel()}; the i-th self-send pairs with the "
                "i-th self-receive, so queue them with matching dtype and element count"
            )
    return PreparedBatch(
        tensors=queue.tensors,
        copies=copies,
        bytes_sent=queue.sent,
        bytes_received=queue.received,
        bytes_copied=sum(s.nbytes for s in self_sends),
        num_sends=queue.sends,
        num_recvs=len(queue.tensors) - queue.sends,
        rows=queue.rows,
    )


def group_chunks(ops: list[Op], world_size: int, max_ops: int | None) -> list[list[Op]]:
    """Splits ops into NCCL groups of at most about ``max_ops`` ops.

    Chunk k holds the k-th run of each (peer, direction) list, so a chunk on one rank only
    ever waits for ops that its peers have posted in the same or an earlier chunk: chunking
    cannot deadlock, whatever each rank's mix of peers.
    """
    if max_ops is None or len(ops) <= max_ops:
        return [ops] if ops else []
    per = max(1, max_ops // (2 * max(world_size - 1, 1)))
    seq: defaultdict[tuple[OpKind, int], int] = defaultdict(int)
    chunks: defaultdict[int, list[Op]] = defaultdict(list)
    for op in ops:
        index = seq[(op.kind, op.peer)]
        seq[(op.kind, op.peer)] += 1
        chunks[index // per].append(op)
    return [chunks[k] for k in sorted(chunks)]


def read_write_overlap(batch: PreparedBatch) -> str | None:
    """What a batch both reads and writes, as a message; None when nothing is.

    Sends (and self-copy sources) are read while receives (and self-copy destinations)
    are written, concurrently and in no set order, so memory in both gives wrong data:
    a swap through one tensor came out wrong in a quarter of the batches. Array work on
    the op table, a few microseconds per hundred ops.
    """
    table = batch.table
    ptr, nbytes, is_recv = table[:, PTR], table[:, NBYTES], table[:, IS_RECV].astype(bool)
    live = nbytes > 0
    reads, writes = np.flatnonzero(live & ~is_recv), np.flatnonzero(live & is_recv)
    r_lo, r_hi = ptr[reads], ptr[reads] + nbytes[reads]
    w_lo, w_hi = ptr[writes], ptr[writes] + nbytes[writes]
    if batch.copies:
        pairs = [(s, d) for s, d in batch.copies if s.nbytes]
        src = np.array([[s.data_ptr(), s.nbytes] for s, _ in pairs], dtype=np.int64)
        dst = np.array([[d.data_ptr(), d.nbytes] for _, d in pairs], dtype=np.int64)
        if len(pairs):
            r_lo, r_hi = np.append(r_lo, src[:, 0]), np.append(r_hi, src.sum(axis=1))
            w_lo, w_hi = np.append(w_lo, dst[:, 0]), np.append(w_hi, dst.sum(axis=1))
    if not len(r_lo) or not len(w_lo):
        return None
    order = np.argsort(w_lo, kind="stable")
    # the furthest end of any write that starts at or before each sorted write
    reach = np.maximum.accumulate(w_hi[order])
    last = np.searchsorted(w_lo[order], r_hi, side="left") - 1
    hit = np.flatnonzero((last >= 0) & (reach[np.maximum(last, 0)] > r_lo))
    if not len(hit):
        return None
    i = int(hit[0])
    j = int(np.flatnonzero((w_lo < r_hi[i]) & (w_hi > r_lo[i]))[0])
    return (
        f"this batch reads and writes the same memory: {_describe(table, reads, i, 'send')} "
        f"overlaps {_describe(table, writes, j, 'receive')}. Sends and receives run at "
        "the same time, so a swap through one tensor gives wrong data; send a copy "
        "(add_send(t.clone(), peer)) or receive into another tensor. Nothing moved"
    )


def _describe(table: np.ndarray, rows: np.ndarray, k: int, what: str) -> str:
    if k >= len(rows):  # past the network ops: a self-copy
        side = "source" if what == "send" else "destination"
        return f"the {side} of self-copy #{k - len(rows)}"
    row = table[rows[k]]
    verb, prep = ("add_send", "to") if what == "send" else ("add_recv", "from")
    return f"{verb} #{k} ({row[NBYTES]} bytes {prep} rank {row[PEER]})"
