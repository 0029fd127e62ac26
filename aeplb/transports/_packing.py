"""Coalesced, pipelined NCCL batches.

All the sends to one peer form one byte stream (the tensors in queue order), and so do the
receives from one peer. Each stream is cut into chunks of ``chunk_bytes``, the same cut on
both sides since the peers agree on the stream's length. Chunk k of every stream travels in
NCCL group k, so group k only waits for ops the peers post in their group k: no deadlock.

A chunk that lies inside one tensor (or inside tensors that sit back to back in memory)
goes straight from and into that memory. Any other chunk is packed into a device staging
slot on a pack stream, and unpacked from one on an unpack stream; CUDA events order the
three streams, so packing chunk k+1 and unpacking chunk k-1 overlap sending chunk k, and
the host never waits.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _cuda
from .._exceptions import InvalidTransferError
from .._ops import Op, OpKind

# From the 2x H200 runs (benchmarks/results): NCCL p2p pays ~0.15 ms per group and only
# nears the link rate for messages of hundreds of MB, so pieces are large.
DEFAULT_CHUNK_BYTES = 256 << 20
DEFAULT_STAGING_BYTES = 1 << 30

# (kind, buffer, peer): the buffer is a flat uint8 view
WireOp = tuple[OpKind, torch.Tensor, int]


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.view(-1)  # queued tensors are contiguous
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def merge_adjacent(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Merges byte views that sit back to back in one allocation (no copy)."""
    out: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    end = -1
    for v in views:
        n = v.numel()
        if n == 0:
            continue
        ptr = v.data_ptr()
        if run and ptr == end and _same_allocation(run[0], v):
            run.append(v)
        else:
            if run:
                out.append(_join(run))
            run = [v]
        end = ptr + n
    if run:
        out.append(_join(run))
    return out


def _same_allocation(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _join(run: list[torch.Tensor]) -> torch.Tensor:
    if len(run) == 1:
        return run[0]
    first = run[0]
    merged = torch.empty(0, dtype=torch.uint8, device=first.device)
    merged.set_(
        first.untyped_storage(), first.storage_offset(), (sum(v.numel() for v in run),), (1,)
    )
    return merged


def byte_slice(segments: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    """The views covering bytes [start, stop) of the concatenated segments."""
    out: list[torch.Tensor] = []
    pos = 0
    for seg in segments:
        n = seg.numel()
        end = pos + n
        if end > start and pos < stop:
            lo, hi = max(start - pos, 0), min(stop, end) - pos
            out.append(seg if lo == 0 and hi == n else seg[lo:hi])
        if end >= stop:
            break
        pos = end
    return out


# Up to this many views, unpack with one device-to-device memcpy each: copy engines, no SMs
# taken from the NCCL kernel running beside them. Past it, the launch count matters more,
# and batched kernels do the whole piece.
_MEMCPY_VIEWS = 64


def _gather(views: list[torch.Tensor], buf: torch.Tensor) -> None:
    # One kernel: on H200 it packs 256 MB in 0.13 ms against 0.44 ms for per-tensor
    # memcpys, and the first piece's packing is not hidden behind any transfer
    # (benchmarks/trace_batch.py; results/2026-11-30-h200x2-host-path/run-9).
    torch.cat(views, out=buf)


def _scatter(buf: torch.Tensor, views: list[torch.Tensor]) -> None:
    if len(views) > _MEMCPY_VIEWS:
        torch._foreach_copy_(views, list(torch.split(buf, [v.numel() for v in views])))
        return
    pos = 0
    for v in views:
        v.copy_(buf[pos : pos + v.numel()], non_blocking=True)
        pos += v.numel()


@dataclass
class _Lane:
    kind: OpKind
    peer: int
    segments: list[torch.Tensor]
    nbytes: int
    slots: list[torch.Tensor]
    # events marking when each slot may be reused (None: free)
    reusable: list[torch.cuda.Event | None]


class Packer:
    """Runs one batch's network ops as coalesced, pipelined NCCL groups."""

    def __init__(self, device: torch.device, chunk_bytes: int, staging_bytes: int) -> None:
        for name, value in (("chunk_bytes", chunk_bytes), ("staging_bytes", staging_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidTransferError(f"{name} must be a positive int, got {value!r}")
        if staging_bytes < chunk_bytes:
            raise InvalidTransferError(
                f"staging_bytes={staging_bytes} must hold at least one chunk of "
                f"chunk_bytes={chunk_bytes}"
            )
        self.device = device
        self.chunk = chunk_bytes
        self.staging_limit = staging_bytes
        self._pool: torch.Tensor | None = None
        self._pack: torch.cuda.Stream | None = None
        self._unpack: torch.cuda.Stream | None = None

    @property
    def staging_bytes(self) -> int:
        """Device memory held for staging (0 until a batch needed it)."""
        return 0 if self._pool is None else self._pool.numel()

    def run(
        self,
        ops: list[Op],
        stream: torch.cuda.Stream,
        post_group: Callable[[list[WireOp]], None],
    ) -> None:
        lanes = self._lanes(ops)
        if not lanes:
            return
        staged = [lane for lane in lanes if len(lane.segments) > 1]
        if staged:
            self._give_slots(staged)
            assert self._pack is not None
            # packing starts after the caller's work, which the comm stream already waited for
            begin = _cuda.new_event()
            begin.record(stream)
            self._pack.wait_event(begin)
        chunks = max((lane.nbytes + self.chunk - 1) // self.chunk for lane in lanes)
        unpacked: list[torch.cuda.Event] = []
        for k in range(chunks):
            group: list[WireOp] = []
            pending_unpacks: list[tuple[_Lane, torch.Tensor, list[torch.Tensor], int]] = []
            for lane in lanes:
                start = k * self.chunk
                if start >= lane.nbytes:
                    continue
                stop = min(start + self.chunk, lane.nbytes)
                views = byte_slice(lane.segments, start, stop)
                if len(views) == 1:
                    group.append((lane.kind, views[0], lane.peer))
                    continue
                slot_index = k % len(lane.slots)
                buf = lane.slots[slot_index][: stop - start]
                if lane.kind is OpKind.SEND:
                    self._pack_into(lane, slot_index, buf, views, stream)
                else:
                    # the slot's previous chunk must be unpacked before NCCL overwrites it
                    reuse = lane.reusable[slot_index]
                    if reuse is not None:
                        stream.wait_event(reuse)
                    pending_unpacks.append((lane, buf, views, slot_index))
                group.append((lane.kind, buf, lane.peer))
            post_group(group)
            sent = _cuda.new_event()
            sent.record(stream)
            for lane in lanes:
                if lane.slots and lane.kind is OpKind.SEND and k * self.chunk < lane.nbytes:
                    lane.reusable[k % len(lane.slots)] = sent
            for lane, buf, views, slot_index in pending_unpacks:
                assert self._unpack is not None
                self._unpack.wait_event(sent)
                with torch.cuda.stream(self._unpack):
                    _scatter(buf, views)
                    done = _cuda.new_event()
                    done.record(self._unpack)
                lane.reusable[slot_index] = done
                unpacked.append(done)
        if unpacked:  # one unpack stream: its last event covers every unpack
            stream.wait_event(unpacked[-1])

    def _pack_into(
        self,
        lane: _Lane,
        slot_index: int,
        buf: torch.Tensor,
        views: list[torch.Tensor],
        stream: torch.cuda.Stream,
    ) -> None:
        assert self._pack is not None
        reuse = lane.reusable[slot_index]
        if reuse is not None:
            self._pack.wait_event(reuse)
        with torch.cuda.stream(self._pack):
            _gather(views, buf)
            packed = _cuda.new_event()
            packed.record(self._pack)
        stream.wait_event(packed)

    def _lanes(self, ops: list[Op]) -> list[_Lane]:
        grouped: dict[tuple[OpKind, int], list[torch.Tensor]] = collections.defaultdict(list)
        for op in ops:
            grouped[(op.kind, op.peer)].append(as_bytes(op.tensor))
        lanes = []
        for (kind, peer), views in grouped.items():
            segments = merge_adjacent(views)
            nbytes = sum(s.numel() for s in segments)
            if nbytes:
                lanes.append(_Lane(kind, peer, segments, nbytes, [], []))
        return lanes

    def _give_slots(self, staged: list[_Lane]) -> None:
        total_slots = self.staging_limit // self.chunk
        if total_slots < len(staged):
            raise InvalidTransferError(
                f"this batch needs staging for {len(staged)} (peer, direction) streams but "
                f"staging_bytes={self.staging_limit} holds {total_slots} chunk(s) of "
                f"{self.chunk} bytes; raise staging_bytes or lower chunk_bytes (same on every "
                "rank)"
            )
        if self._pool is None:
            # Allocated once and reused: per-call staging buffers are an OOM hazard.
            self._pool = torch.empty(
                total_slots * self.chunk, dtype=torch.uint8, device=self.device
            )
            self._pack = _cuda.new_stream(self.device)
            self._unpack = _cuda.new_stream(self.device)
        per_lane = min(total_slots // len(staged), 3)
        index = 0
        for lane in staged:
            lane.slots = [
                self._pool[(index + i) * self.chunk : (index + i + 1) * self.chunk]
                for i in range(per_lane)
            ]
            lane.reusable = [None] * per_lane
            index += per_lane
