"""Gloo transport: CPU tensors go straight over Gloo; CUDA tensors are staged.

Every tensor travels as pieces of ``chunk_bytes`` (the same cut on every rank, whatever
the device), matched by a per-peer sequence number used as the Gloo tag. CUDA pieces pass
through a pinned host pool allocated once: each (peer, direction) lane owns a few slots
and runs on its own thread, so the device-host copies of some pieces overlap others on the
wire, and a slow peer can never starve another peer's lane (no cross-peer deadlock). A lane
posts its pieces over every stripe from that one thread: Gloo moves the bytes on its own
threads, and each Python thread that wakes takes the GIL from the event loop's thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Protocol, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore

from .. import _cuda
from .._exceptions import InvalidTransferError
from .._ops import OpKind, PreparedBatch
from ._base import Transport
from ._streams import Piece, byte_streams


class Channel(Protocol):
    """A group pieces travel on: the communicator's own, or a stripe made for it."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int, /) -> dist.Work: ...
    def recv(self, tensors: list[torch.Tensor], src: int, tag: int, /) -> dist.Work: ...


DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_STAGING_BYTES = 256 << 20
_MAX_SLOTS_PER_STRIPE = 4


def _remaining(deadline: float | None) -> timedelta | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed before the transfer finished")
    return timedelta(seconds=left)


def wait_work(work: dist.Work, deadline: float | None) -> None:
    """Waits for a Gloo work item, turning Gloo's timeout into TimeoutError."""
    left = _remaining(deadline)
    try:
        ok = work.wait() if left is None else work.wait(left)
    except RuntimeError as exc:
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise TimeoutError(str(exc)) from exc
        raise
    if ok is False:
        raise TimeoutError("the deadline passed before the transfer finished")


def _reap(
    inflight: collections.deque[tuple[dist.Work, int | None]],
    free: list[int],
    deadline: float | None,
) -> None:
    """Frees the slots of the sends at the front of ``inflight`` that have finished."""
    while inflight and inflight[0][0].is_completed():
        work, slot = inflight.popleft()
        wait_work(work, deadline)  # raises the send's error, if it failed
        if slot is not None:
            free.append(slot)


def _stream_pieces(batch: PreparedBatch, chunk: int) -> dict[tuple[OpKind, int], list[Piece]]:
    """Cuts each (direction, peer) byte stream into pieces of ``chunk`` bytes.

    The cut depends only on the stream's length, so both peers agree on it whatever the
    tensors' sizes or devices.
    """
    return {(s.kind, s.peer): s.pieces(chunk) for s in byte_streams(batch)}


def _direct(piece: Piece) -> torch.Tensor | None:
    """The piece's one host view, which Gloo sends or receives in place; else None."""
    return piece.view if piece.view is not None and not piece.view.is_cuda else None


class GlooTransport(Transport):
    name = "gloo"

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        *,
        device: torch.device | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        stripes: list[Channel] | None = None,
    ) -> None:
        super().__init__(rank, world_size)
        for name, value in (("chunk_bytes", chunk_bytes), ("staging_bytes", staging_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidTransferError(f"{name} must be a positive int, got {value!r}")
        self._groups: list[Channel] = [cast(Channel, group), *(stripes or [])]
        lanes = 2 * max(world_size - 1, 1)
        self._slots_per_lane = min(
            staging_bytes // (lanes * chunk_bytes), _MAX_SLOTS_PER_STRIPE * len(self._groups)
        )
        if self._slots_per_lane < 1:
            raise InvalidTransferError(
                f"staging_bytes={staging_bytes} cannot give each of the {lanes} "
                f"(peer, direction) lanes one {chunk_bytes}-byte slot; raise staging_bytes to "
                f"at least {lanes * chunk_bytes} or lower chunk_bytes (same on every rank)"
            )
        self._group = group
        self._chunk = chunk_bytes
        self._device = device if device is None or device.type == "cuda" else None
        self._pool: torch.Tensor | None = None
        self._lanes: ThreadPoolExecutor | None = None
        self._d2h: torch.cuda.Stream | None = None
        self._h2d: torch.cuda.Stream | None = None
        self._user_stream: torch.cuda.Stream | None = None
        self._cuda_lock = threading.Lock()

    # -- caller thread -----------------------------------------------------------------

    def check_tensor(self, tensor: torch.Tensor, verb: str) -> None:
        if tensor.device.type == "cpu":
            return
        if tensor.device.type == "cuda":
            with self._cuda_lock:
                if self._device is None:
                    self._device = _cuda.resolve_device(tensor.device)
            _cuda.check_cuda_tensor(tensor, self._device, verb, self.name)
            return
        raise InvalidTransferError(
            f"{verb}: the gloo backend moves CPU tensors (and CUDA tensors through pinned "
            f"staging), got one on {tensor.device}; move it to the CPU or a CUDA device"
        )

    def capture_ready(self) -> object | None:
        if self._device is None:
            return None
        return _cuda.record_ready(self._device)

    def set_stream(self, stream: object | None) -> None:
        if stream is not None and self._device is None:
            if not isinstance(stream, torch.cuda.Stream):
                raise InvalidTransferError(
                    f"set_stream: expected a torch.cuda.Stream or None, got {type(stream)}"
                )
            self._device = stream.device
        if self._device is not None:
            self._user_stream = _cuda.check_stream(stream, self._device)

    @property
    def staging_bytes(self) -> int:
        """Pinned host memory held for staging (0 until the first CUDA batch)."""
        return 0 if self._pool is None else self._pool.numel()

    # -- worker thread ------------------------------------------------------------------

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        work = dist.all_gather(out, local, group=self._group, async_op=True)
        assert work is not None
        wait_work(work, deadline)
        return torch.stack(out)

    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        on_cuda = any(t.is_cuda for t in batch.all_tensors())
        if not on_cuda:
            for src, dst in batch.copies:
                dst.view(-1).copy_(src.view(-1))
            self._run_direct(batch, deadline)
            return
        self._ensure_cuda()
        assert self._d2h is not None and self._h2d is not None
        d2h, h2d = self._streams()
        if isinstance(ready, torch.cuda.Event):
            d2h.wait_event(ready)
            h2d.wait_event(ready)
        copies_done = None
        if batch.copies:
            with torch.cuda.stream(h2d):
                for src, dst in batch.copies:
                    dst.view(-1).copy_(src.view(-1), non_blocking=True)
                copies_done = _cuda.new_event()
                copies_done.record(h2d)
        self._run_lanes(batch, deadline)
        if copies_done is not None:
            _cuda.wait_event(copies_done, deadline)

    def _run_direct(self, batch: PreparedBatch, deadline: float | None) -> None:
        works: list[dist.Work] = []
        scatters: list[tuple[torch.Tensor, Piece]] = []
        for (kind, peer), pieces in _stream_pieces(batch, self._chunk).items():
            for tag, piece in enumerate(pieces):
                if piece.view is not None:
                    buf = piece.view
                else:  # small tensors travel together
                    buf = torch.empty(piece.nbytes, dtype=torch.uint8)
                    if kind is OpKind.SEND:
                        piece.gather(buf, same_device=True)
                    else:
                        scatters.append((buf, piece))
                works.append(self._post(kind, buf, peer, tag))
        for work in works:
            wait_work(work, deadline)
        for buf, piece in scatters:
            piece.scatter(buf, same_device=True)

    def _post(self, kind: OpKind, buf: torch.Tensor, peer: int, tag: int) -> dist.Work:
        # Piece i of a (peer, direction) stream travels on stripe i % K: each stripe is its
        # own Gloo group with its own connections, so K pieces are on the wire at once.
        group = self._groups[tag % len(self._groups)]
        if kind is OpKind.SEND:
            return group.send([buf], peer, tag)
        return group.recv([buf], peer, tag)

    def _streams(self) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        assert self._d2h is not None and self._h2d is not None
        if self._user_stream is not None:
            return self._user_stream, self._user_stream
        return self._d2h, self._h2d

    def _ensure_cuda(self) -> None:
        if self._pool is not None:
            return
        assert self._device is not None
        device = self._device
        torch.cuda.set_device(device)
        lanes = 2 * max(self.world_size - 1, 1)
        # Pinned once, reused by every batch: pageable per-call buffers are what make
        # the reference staged path slow.
        self._pool = torch.empty(
            lanes * self._slots_per_lane * self._chunk, dtype=torch.uint8, pin_memory=True
        )
        self._d2h = _cuda.new_stream(device)
        self._h2d = _cuda.new_stream(device)
        self._lanes = ThreadPoolExecutor(
            max_workers=lanes,
            thread_name_prefix="aeplb-gloo-lane",
            initializer=torch.cuda.set_device,
            initargs=(device,),
        )

    def _lane_slots(self, lane: int) -> list[torch.Tensor]:
        assert self._pool is not None
        base = lane * self._slots_per_lane * self._chunk
        return [
            self._pool[base + i * self._chunk : base + (i + 1) * self._chunk]
            for i in range(self._slots_per_lane)
        ]

    def _run_lanes(self, batch: PreparedBatch, deadline: float | None) -> None:
        assert self._lanes is not None
        futures: list[Future[None]] = []
        for (kind, peer), pieces in _stream_pieces(batch, self._chunk).items():
            other = peer if peer < self.rank else peer - 1
            lane = 2 * other + (0 if kind is OpKind.SEND else 1)
            work: Callable[..., None] = self._send_lane if kind is OpKind.SEND else self._recv_lane
            futures.append(self._lanes.submit(work, peer, pieces, self._lane_slots(lane), deadline))
        errors: list[BaseException] = []
        for future in futures:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0) + 1.0
            try:
                future.result(timeout=left)
            except FutureTimeout:  # a distinct class before Python 3.11
                errors.append(TimeoutError("a staging lane did not finish before the deadline"))
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _send_lane(
        self,
        peer: int,
        pieces: list[Piece],
        slots: list[torch.Tensor],
        deadline: float | None,
    ) -> None:
        d2h, _ = self._streams()
        free = list(range(len(slots)))
        copying: collections.deque[tuple[int, int, torch.cuda.Event]] = collections.deque()
        inflight: collections.deque[tuple[dist.Work, int | None]] = collections.deque()
        tag = 0  # the next piece to start
        while tag < len(pieces) or copying:
            _reap(inflight, free, deadline)
            # every free slot takes the next piece: the copies run back to back on the
            # copy stream while earlier pieces are on the wire
            while tag < len(pieces):
                direct = _direct(pieces[tag])
                if direct is not None:
                    inflight.append((self._post(OpKind.SEND, direct, peer, tag), None))
                elif free:
                    into = free.pop()
                    with torch.cuda.stream(d2h):
                        pieces[tag].gather(
                            slots[into][: pieces[tag].nbytes], same_device=False, non_blocking=True
                        )
                        copied = _cuda.new_event()
                        copied.record(d2h)
                    copying.append((tag, into, copied))
                else:
                    break
                tag += 1
            if copying:
                first, into, copied = copying.popleft()
                _cuda.wait_event(copied, deadline)
                buf = slots[into][: pieces[first].nbytes]
                inflight.append((self._post(OpKind.SEND, buf, peer, first), into))
            elif inflight:  # every slot holds a piece on the wire
                work, slot = inflight.popleft()
                wait_work(work, deadline)
                if slot is not None:
                    free.append(slot)
        for work, _ in inflight:
            wait_work(work, deadline)

    def _recv_lane(
        self,
        peer: int,
        pieces: list[Piece],
        slots: list[torch.Tensor],
        deadline: float | None,
    ) -> None:
        _, h2d = self._streams()
        free = list(range(len(slots)))
        posted: collections.deque[tuple[dist.Work, int | None, int]] = collections.deque()
        landing: collections.deque[tuple[torch.cuda.Event, int]] = collections.deque()
        tag = 0  # the next piece to post
        while tag < len(pieces) or posted:
            while landing and landing[0][0].query():  # type: ignore[no-untyped-call]
                free.append(landing.popleft()[1])
            while tag < len(pieces):
                direct = _direct(pieces[tag])
                if direct is not None:
                    posted.append((self._post(OpKind.RECV, direct, peer, tag), None, tag))
                elif free:
                    into = free.pop()
                    buf = slots[into][: pieces[tag].nbytes]
                    posted.append((self._post(OpKind.RECV, buf, peer, tag), into, tag))
                else:
                    break
                tag += 1
            if posted:
                work, slot, first = posted.popleft()
                wait_work(work, deadline)
                if slot is not None:
                    piece = pieces[first]
                    buf = slots[slot][: piece.nbytes]
                    with torch.cuda.stream(h2d):
                        piece.scatter(buf, same_device=False, non_blocking=True)
                        landed = _cuda.new_event()
                        landed.record(h2d)
                    landing.append((landed, slot))
            else:  # every slot is still being copied to the device
                landed, done = landing.popleft()
                _cuda.wait_event(landed, deadline)
                free.append(done)
        for landed, _ in landing:
            _cuda.wait_event(landed, deadline)

    def close(self) -> None:
        if self._lanes is not None:
            self._lanes.shutdown(wait=True)
            self._lanes = None
        self._pool = None
        del self._groups[1:]  # the stripes are this transport's own: their sockets close


# Stripe sets made so far per group name. Every member creates its communicators on a
# group in the same order (creation is collective), so the count names a set alike on all.
_STRIPE_SETS: collections.Counter[str] = collections.Counter()


def make_stripes(group: dist.ProcessGroup, rank: int, world_size: int, count: int) -> list[Channel]:
    """``count`` Gloo groups of ``group``'s members, for one communicator alone.

    They are not registered with torch.distributed, so dropping them closes their
    connections: ``dist.new_group`` groups would stay open until the process exits, and
    destroying one lets a later group reuse its name, and with it the stale addresses its
    peers left in the store.
    """
    if count < 1:
        return []
    name = group.group_name
    serial = _STRIPE_SETS[name]
    _STRIPE_SETS[name] += 1
    # the store every rank reached at init_process_group: no public accessor returns it
    store = dist.distributed_c10d._get_default_store()
    return [
        cast(
            Channel,
            dist.ProcessGroupGloo(
                PrefixStore(f"aeplb/stripes/{name}/{serial}/{k}/", store),
                rank,
                world_size,
                timedelta(minutes=30),  # torch's default for Gloo groups
            ),
        )
        for k in range(count)
    ]
