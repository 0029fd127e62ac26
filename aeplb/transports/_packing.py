"""Coalesced, pipelined NCCL batches.

All the sends to one peer form one byte stream (the tensors in queue order), and so do the
receives from one peer. Each stream is cut into equal chunks of at most ``chunk_bytes``,
the same cut on both sides since the peers agree on the stream's length. Chunk k of every
stream travels in NCCL group k, so group k only waits for ops the peers post in their group
k: no deadlock.

A chunk that lies inside one tensor (or inside tensors that sit back to back in memory)
goes straight from and into that memory. Any other chunk is packed into a device staging
slot on a pack stream, and unpacked from one on an unpack stream; CUDA events order the
three streams, so packing chunk k+1 and unpacking chunk k-1 overlap sending chunk k where
a stream has more than one slot, and the host never waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import _cuda
from .._exceptions import InvalidTransferError
from .._ops import OpKind, PreparedBatch
from ._base import check_positive
from ._streams import ByteStream, Piece, byte_streams

# From the 2x H200 runs (benchmarks/results): NCCL p2p pays ~0.15 ms per group and only
# nears the link rate for messages of hundreds of MB, so pieces are large: fewer groups
# won over packing beside the wire (EPLB batch: 2 x 336 MiB with one slot per stream beat
# 3 x 256 MiB with two; a 2 GiB tensor moved at 0.72 x raw NCCL in 256 MiB pieces, 0.82 x
# in 512 MiB ones).
MAX_DEFAULT_CHUNK_BYTES = 512 << 20
DEFAULT_STAGING_BYTES = 1 << 30
_MiB = 1 << 20
_ALIGN = 4096

# (kind, buffer, peer): the buffer is a flat uint8 view
WireOp = tuple[OpKind, torch.Tensor, int]


@dataclass
class _Lane:
    stream: ByteStream
    pieces: list[Piece]  # chunk k of the stream is pieces[k]
    slots: list[torch.Tensor] = field(default_factory=list)
    # events marking when each slot may be reused (None: free)
    reusable: list[torch.cuda.Event | None] = field(default_factory=list)


def default_chunk_bytes(staging_bytes: int, world_size: int) -> int:
    """The chunk size that gives a slot to a stream to and from every peer at once.

    Depends only on values every rank shares, as the cut of a stream must.
    """
    lanes = 2 * max(world_size - 1, 1)
    per_slot = min(MAX_DEFAULT_CHUNK_BYTES, staging_bytes // lanes) // _MiB * _MiB
    return max(per_slot, min(_MiB, staging_bytes))


def piece_bytes(nbytes: int, chunk: int) -> int:
    """The size to cut a stream of ``nbytes`` into: as few pieces as ``chunk`` allows, of
    equal size (672 MiB in 512 MiB chunks goes as 2 x 336 MiB, not 512 + 160), aligned
    where that still fits the chunk."""
    count = -(-nbytes // chunk)
    size = -(-nbytes // count)
    aligned = -(-size // _ALIGN) * _ALIGN
    return aligned if aligned <= chunk else size


class Packer:
    """Runs one batch's network ops as coalesced, pipelined NCCL groups."""

    def __init__(
        self, device: torch.device, chunk_bytes: int | None, staging_bytes: int, world_size: int
    ) -> None:
        check_positive("staging_bytes", staging_bytes)
        if chunk_bytes is None:
            chunk_bytes = default_chunk_bytes(staging_bytes, world_size)
        check_positive("chunk_bytes", chunk_bytes)
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
        batch: PreparedBatch,
        stream: torch.cuda.Stream,
        post_group: Callable[[list[WireOp]], None],
    ) -> None:
        lanes = [_Lane(s, s.pieces(piece_bytes(s.nbytes, self.chunk))) for s in byte_streams(batch)]
        if not lanes:
            return
        staged = [lane for lane in lanes if any(p.view is None for p in lane.pieces)]
        if staged:
            self._give_slots(staged)
            assert self._pack is not None
            # packing starts after the caller's work, which the comm stream already waited for
            begin = _cuda.new_event()
            begin.record(stream)
            self._pack.wait_event(begin)
        chunks = max(len(lane.pieces) for lane in lanes)
        unpacked: list[torch.cuda.Event] = []
        for k in range(chunks):
            group: list[WireOp] = []
            pending_unpacks: list[tuple[_Lane, torch.Tensor, Piece, int]] = []
            for lane in lanes:
                if k >= len(lane.pieces):
                    continue
                piece, kind = lane.pieces[k], lane.stream.kind
                if piece.view is not None:
                    group.append((kind, piece.view, lane.stream.peer))
                    continue
                slot_index = k % len(lane.slots)
                buf = lane.slots[slot_index][: piece.nbytes]
                if kind is OpKind.SEND:
                    self._pack_into(lane, slot_index, buf, piece, stream)
                else:
                    # the slot's previous chunk must be unpacked before NCCL overwrites it
                    reuse = lane.reusable[slot_index]
                    if reuse is not None:
                        stream.wait_event(reuse)
                    pending_unpacks.append((lane, buf, piece, slot_index))
                group.append((kind, buf, lane.stream.peer))
            post_group(group)
            sent = _cuda.new_event()
            sent.record(stream)
            for lane in lanes:
                if lane.slots and lane.stream.kind is OpKind.SEND and k < len(lane.pieces):
                    lane.reusable[k % len(lane.slots)] = sent
            for lane, buf, piece, slot_index in pending_unpacks:
                assert self._unpack is not None
                self._unpack.wait_event(sent)
                with torch.cuda.stream(self._unpack):
                    piece.scatter(buf, same_device=True, non_blocking=True)
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
        piece: Piece,
        stream: torch.cuda.Stream,
    ) -> None:
        assert self._pack is not None
        reuse = lane.reusable[slot_index]
        if reuse is not None:
            self._pack.wait_event(reuse)
        with torch.cuda.stream(self._pack):
            piece.gather(buf, same_device=True, non_blocking=True)
            packed = _cuda.new_event()
            packed.record(self._pack)
        stream.wait_event(packed)

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
