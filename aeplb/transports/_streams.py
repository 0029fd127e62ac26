"""A batch's ops as byte streams, one per (direction, peer), read off the op table.

The sends to one peer form one byte stream (the tensors in queue order), and so do the
receives from one peer; transports cut each stream into pieces, the same cut on both sides
since the peers agree on the stream's length. Finding a piece's tensors, whether they sit
back to back in memory and whether they share a dtype is array work on the op table, so a
batch of thousands of tensors runs no per-tensor Python here: a long Python loop on the
worker would hold the GIL from the event loop's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._ops import DTYPE, IS_RECV, NBYTES, NUMEL, PEER, PTR, OpKind, PreparedBatch, dtype_of
from .._runtime import gil_slices

# Up to this many whole tensors, a piece is packed through one byte view per tensor (cheap
# at this count, and torch.cat's kernel is the fastest gather); past it, through calls
# that take the tensors as they are, so no Python runs per tensor.
FEW = 64
# torch._chunk_cat gathers small tensors as fast as torch.cat but large ones 3.5 x slower
# (H200: 1000 x 64 KiB in 0.33 ms, 48 x 14.7 MB in 1.16 ms against 0.33 ms): past this
# average size, a piece is gathered through byte views and torch.cat after all.
SMALL = 1 << 20

# Tensors per call of a many-tensor kernel: parsing the list and wrapping what comes back
# hold the GIL (about 1.6 us per tensor on CPU), so one call over 100,000 tensors kept the
# event loop's thread waiting 160 ms. Between slices the worker lets go of the GIL.
SLICE = 1024

# A many-tensor copy: (tensors, their part of a typed buffer)
_Kernel = Callable[[tuple[torch.Tensor, ...], torch.Tensor], None]

_chunk_cat = getattr(torch, "_chunk_cat", None)  # torch >= 2.4

# Dtypes that cat, _chunk_cat, copy_ and _foreach_copy_ handle on CPU and CUDA alike.
# Any other (float4, sub-byte ints, bits, uint16 and wider) moves as bytes: torch has
# no such kernels for several of them ("cat_serial_kernel not implemented").
TYPED_DTYPES = frozenset(
    {
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    }
)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.view(-1)  # queued tensors are contiguous
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


@dataclass
class Piece:
    """Bytes of a stream: one view of them all, or the parts to pack into a buffer."""

    nbytes: int
    view: torch.Tensor | None = None  # a uint8 view of the whole piece: nothing to pack
    head: torch.Tensor | None = None  # the end of a tensor the piece starts inside (uint8)
    whole: tuple[torch.Tensor, ...] = ()  # tensors wholly inside the piece, in order
    tail: torch.Tensor | None = None  # the start of a tensor the piece ends inside (uint8)
    dtype: torch.dtype | None = None  # the whole tensors' dtype, when they share one
    numels: np.ndarray | None = None  # the whole tensors' element counts, with dtype

    def gather(self, buf: torch.Tensor, *, same_device: bool, non_blocking: bool = False) -> None:
        """Copies the piece into ``buf`` (uint8, ``nbytes`` long) on the current stream;
        ``same_device`` says that every tensor of the piece is on ``buf``'s device."""
        if self.view is not None:
            buf.copy_(self.view, non_blocking=non_blocking)
            return
        lo, hi = self._whole_range()
        if self.head is not None:
            buf[:lo].copy_(self.head, non_blocking=non_blocking)
        if self.whole:
            _gather_whole(self, buf[lo:hi], same_device, non_blocking)
        if self.tail is not None:
            buf[hi:].copy_(self.tail, non_blocking=non_blocking)

    def scatter(self, buf: torch.Tensor, *, same_device: bool, non_blocking: bool = False) -> None:
        """Copies ``buf`` (uint8, ``nbytes`` long) into the piece on the current stream."""
        if self.view is not None:
            self.view.copy_(buf, non_blocking=non_blocking)
            return
        lo, hi = self._whole_range()
        if self.head is not None:
            self.head.copy_(buf[:lo], non_blocking=non_blocking)
        if self.whole:
            _scatter_whole(self, buf[lo:hi], same_device, non_blocking)
        if self.tail is not None:
            self.tail.copy_(buf[hi:], non_blocking=non_blocking)

    def _whole_range(self) -> tuple[int, int]:
        """Where the whole tensors lie in the piece: between the head and the tail."""
        lo = 0 if self.head is None else self.head.numel()
        return lo, self.nbytes - (0 if self.tail is None else self.tail.numel())


def _typed(piece: Piece, buf: torch.Tensor) -> torch.Tensor | None:
    """``buf`` as the whole tensors' one dtype, when the piece has many and it lines up."""
    dtype = piece.dtype
    if dtype is None or len(piece.whole) <= FEW or buf.data_ptr() % dtype.itemsize:
        return None
    return buf.view(dtype)


def _gather_whole(piece: Piece, buf: torch.Tensor, same_device: bool, non_blocking: bool) -> None:
    typed = _typed(piece, buf)
    small = buf.numel() <= SMALL * len(piece.whole)
    if typed is not None and same_device and small and _chunk_cat is not None:
        # _chunk_cat wants every tensor at least 1-D (a 0-d one crashed the process);
        # element counts tell: only a 1-element tensor can be 0-d
        flat = piece.numels is not None and bool((piece.numels > 1).all())
        _typed_slices(piece, typed, _chunk_cat_into if flat else _flatten_into)
    elif typed is not None and not same_device:
        _typed_slices(piece, typed, _foreach_copier(into_buffer=True, non_blocking=non_blocking))
    elif same_device:
        pos = 0
        for i in gil_slices(len(piece.whole), SLICE):
            views = [as_bytes(t) for t in piece.whole[i : i + SLICE]]
            size = sum(v.numel() for v in views)
            torch.cat(views, out=buf[pos : pos + size])
            pos += size
    else:
        pos = 0
        for t in piece.whole:
            view = as_bytes(t)
            buf[pos : pos + view.numel()].copy_(view, non_blocking=non_blocking)
            pos += view.numel()


def _chunk_cat_into(whole: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    assert _chunk_cat is not None
    _chunk_cat(whole, 0, 1, out=out.view(1, -1))


def _flatten_into(whole: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    out.copy_(torch._C._nn.flatten_dense_tensors(list(whole)))


def _foreach_copier(*, into_buffer: bool, non_blocking: bool) -> _Kernel:
    """Copies between tensors and their part of a buffer, viewed as the tensors' shapes."""

    def copy(whole: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        parts = torch._C._nn.unflatten_dense_tensors(out, list(whole))
        dst, src = (parts, list(whole)) if into_buffer else (list(whole), parts)
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)

    return copy


def _typed_slices(piece: Piece, typed: torch.Tensor, kernel: _Kernel) -> None:
    """Runs ``kernel(tensors, their part of typed)`` over the whole tensors, SLICE at a
    time (see gil_slices)."""
    assert piece.numels is not None
    whole = piece.whole
    ends = np.concatenate(([0], np.cumsum(piece.numels)))
    for i in gil_slices(len(whole), SLICE):
        j = min(i + SLICE, len(whole))
        kernel(whole[i:j], typed[int(ends[i]) : int(ends[j])])


def _scatter_whole(piece: Piece, buf: torch.Tensor, same_device: bool, non_blocking: bool) -> None:
    typed = _typed(piece, buf)
    if (
        typed is not None
        and same_device
        and typed.is_cuda
        and piece.numels is not None
        and all(t.ndim == 1 for t in piece.whole)
    ):
        # One kernel of 16-byte copies whatever the dtype: 1000 x 64 KiB of uint8 in
        # 0.13 ms on an H200, against 3.1 ms through _foreach_copy_, which goes element
        # by element. It wants out tensors shaped as the split, hence 1-D ones only.
        sizes = piece.numels.tolist()
        torch.split_with_sizes_copy(typed, sizes, 0, out=list(piece.whole))
        return
    if typed is not None:
        _typed_slices(piece, typed, _foreach_copier(into_buffer=False, non_blocking=non_blocking))
        return
    views = [as_bytes(t) for t in piece.whole]
    # a few: one memcpy each, on the copy engines, taking no SMs from the NCCL kernel
    # running beside them; past that the launches cost more than the SMs
    if len(views) > FEW and same_device:
        parts = list(torch.split(buf, [v.numel() for v in views]))
        for i in gil_slices(len(views), SLICE):
            torch._foreach_copy_(views[i : i + SLICE], parts[i : i + SLICE])
        return
    pos = 0
    for v in views:
        v.copy_(buf[pos : pos + v.numel()], non_blocking=non_blocking)
        pos += v.numel()


class ByteStream:
    """One (direction, peer)'s network ops as one byte stream, in queue order."""

    __slots__ = (
        "_begin",
        "_codes",
        "_end",
        "_gaps",
        "_kinds",
        "_numels",
        "_ptr",
        "_tensors",
        "kind",
        "nbytes",
        "peer",
    )

    def __init__(
        self, kind: OpKind, peer: int, tensors: list[torch.Tensor], rows: np.ndarray
    ) -> None:
        """``rows`` are the tensors' op-table rows; none of them is empty."""
        self.kind = kind
        self.peer = peer
        self._tensors = tensors
        sizes = rows[:, NBYTES]
        self._ptr = rows[:, PTR]
        self._end = np.cumsum(sizes)
        self._begin = self._end - sizes
        self.nbytes = int(self._end[-1])
        # running counts of breaks: tensors i..j sit back to back iff _gaps[i] == _gaps[j]
        gaps = self._ptr[1:] != self._ptr[:-1] + sizes[:-1]
        self._gaps = np.concatenate(([0], np.cumsum(gaps)))
        self._codes = rows[:, DTYPE]
        self._numels = rows[:, NUMEL]
        # running counts of dtype changes: tensors i..j share a dtype iff equal at i and j
        self._kinds = np.concatenate(([0], np.cumsum(self._codes[1:] != self._codes[:-1])))

    def __len__(self) -> int:
        return len(self._tensors)

    def pieces(self, size: int) -> list[Piece]:
        """The stream cut into pieces of ``size`` bytes (the last one may be shorter)."""
        return [self.piece(i, min(i + size, self.nbytes)) for i in range(0, self.nbytes, size)]

    def piece(self, start: int, stop: int) -> Piece:
        """Bytes [start, stop) of the stream (0 <= start < stop <= nbytes)."""
        i0 = int(np.searchsorted(self._end, start, side="right"))
        i1 = int(np.searchsorted(self._begin, stop, side="left"))
        first, last = self._tensors[i0], self._tensors[i1 - 1]
        lo = start - int(self._begin[i0])
        if i1 - i0 == 1:
            return Piece(stop - start, view=as_bytes(first)[lo : lo + stop - start])
        if self._gaps[i0] == self._gaps[i1 - 1]:
            view = _joined(first, last, int(self._ptr[i0]) + lo, stop - start)
            if view is not None:
                return Piece(stop - start, view=view)
        head = tail = None
        a, b = i0, i1
        if lo:
            head, a = as_bytes(first)[lo:], i0 + 1
        if stop < self._end[i1 - 1]:
            tail, b = as_bytes(last)[: stop - int(self._begin[i1 - 1])], i1 - 1
        dtype = numels = None
        if b > a and self._kinds[a] == self._kinds[b - 1]:
            dtype, numels = dtype_of(int(self._codes[a])), self._numels[a:b]
            if dtype not in TYPED_DTYPES:
                dtype = None  # moved as bytes
        return Piece(
            stop - start,
            head=head,
            whole=tuple(self._tensors[a:b]),
            tail=tail,
            dtype=dtype,
            numels=numels,
        )


def _joined(first: torch.Tensor, last: torch.Tensor, ptr: int, nbytes: int) -> torch.Tensor | None:
    """One uint8 view of ``nbytes`` at ``ptr``, spanning tensors that sit back to back from
    ``first`` to ``last``; None unless both lie in one storage (then all between do too).

    Back-to-back tensors may still be separate allocations (the caching allocator carves
    neighbouring blocks out of one segment), and no view may span two.
    """
    storage = first.untyped_storage()
    if storage.data_ptr() != last.untyped_storage().data_ptr():
        return None
    view = torch.empty(0, dtype=torch.uint8, device=first.device)
    return view.set_(storage, ptr - storage.data_ptr(), (nbytes,), (1,))


def byte_streams(batch: PreparedBatch) -> list[ByteStream]:
    """The batch's non-empty byte streams, in order of their first op."""
    table = batch.table
    live = np.flatnonzero(table[:, NBYTES] > 0)
    if not len(live):
        return []
    key = table[live, PEER] * 2 + table[live, IS_RECV]
    perm = np.argsort(key, kind="stable")
    order, keys = live[perm], key[perm]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    bounds = np.append(starts, len(order))
    streams = []
    tensors = batch.tensors
    # stable sort: each stream's first row is its first op, so sorting by it keeps
    # the streams in the order their first ops were queued
    for s in sorted(range(len(starts)), key=lambda i: int(order[starts[i]])):
        rows = order[bounds[s] : bounds[s + 1]]
        peer, is_recv = int(table[rows[0], PEER]), int(table[rows[0], IS_RECV])
        streams.append(
            ByteStream(
                OpKind.RECV if is_recv else OpKind.SEND,
                peer,
                [tensors[i] for i in rows.tolist()],
                table[rows],
            )
        )
    return streams
