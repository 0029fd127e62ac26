"""Gloo transport: CPU tensors go straight over Gloo; CUDA tensors are staged.

Every tensor travels as pieces of ``chunk_bytes`` (the same cut on every rank, whatever
the device), matched by a per-peer sequence number used as the Gloo tag. CUDA pieces pass
through a pinned host pool allocated once: each (peer, direction, stripe) lane owns a few
slots and runs on its own thread, so a piece's device-to-host copy overlaps the previous
piece on the wire, and a slow peer can never starve another peer's lane (no cross-peer
deadlock). A thread per stripe, because Gloo writes to the socket on the thread that posts.

The event loop's thread needs the GIL every time it wakes, so nothing here holds it for
long: pieces are cut as the lanes reach them, not all up front (a few microseconds each,
but 168 of them for a 672 MiB batch kept the loop waiting a millisecond), and one lane at a
time issues copies, so the loop competes for the GIL with one thread doing torch work, not
sixteen.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial

import torch
import torch.distributed as dist

from .. import _cuda
from .._exceptions import BackendUnavailableError, InvalidTransferError
from .._ops import OpKind, PreparedBatch
from .._runtime import transfer_mode
from ._base import Transport, check_positive
from ._gloo_groups import Channel, private_groups, wait_work
from ._streams import ByteStream, Piece, as_bytes, byte_streams

MAX_DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_STAGING_BYTES = 256 << 20
_MAX_SLOTS_PER_LANE = 4
_MIN_DEFAULT_CHUNK_BYTES = 64 << 10


def default_chunk_bytes(staging_bytes: int, lanes: int) -> int:
    """The piece size that gives each of ``lanes`` lanes a staging slot (values every rank
    shares, as the cut of a stream must)."""
    per_lane = staging_bytes // lanes // _MIN_DEFAULT_CHUNK_BYTES * _MIN_DEFAULT_CHUNK_BYTES
    return min(MAX_DEFAULT_CHUNK_BYTES, max(per_lane, _MIN_DEFAULT_CHUNK_BYTES))


class _Cut:
    """A (direction, peer) byte stream in pieces of ``chunk`` bytes, each made when asked.

    The cut depends only on the stream's length, so both peers agree on it whatever the
    tensors' sizes or devices.
    """

    def __init__(self, stream: ByteStream, chunk: int) -> None:
        self.stream = stream
        self.chunk = chunk
        self.count = -(-stream.nbytes // chunk)

    def piece(self, tag: int) -> Piece:
        start = tag * self.chunk
        return self.stream.piece(start, min(start + self.chunk, self.stream.nbytes))


class _CopyWaits:
    """How a lane waits for its staging copies.

    Polling takes the GIL at every look, which with a dozen lanes keeps it from the event
    loop's thread; a blocking-sync event lets the waiting thread sleep in the driver and
    take the GIL once. But only copies that wait on nothing but other copies may be waited
    for that way, without a deadline: so the lane polls until the caller's work that the
    copies follow is done, and never once the caller's own stream carries them.
    """

    def __init__(
        self, ready: torch.cuda.Event | None, own_streams: bool, deadline: float | None
    ) -> None:
        self._ready = ready
        self._sleep = own_streams and ready is None
        self._own_streams = own_streams
        self._deadline = deadline

    def wait(self, copied: torch.cuda.Event) -> None:
        if not self._sleep and self._own_streams:
            assert self._ready is not None
            self._sleep = bool(self._ready.query())  # type: ignore[no-untyped-call]
        if self._sleep:
            copied.synchronize()
        else:
            _cuda.wait_event(copied, self._deadline)


def _in_transfer_mode(fn: Callable[..., None], *args: object) -> None:
    # the staging pool was made on the worker thread, in the transfer mode; a lane that
    # wrote into it outside that mode failed, and its peer's lane waited for it
    with transfer_mode():
        fn(*args)


def _direct(piece: Piece) -> torch.Tensor | None:
    """The piece's one host view, which Gloo sends or receives in place; else None."""
    return piece.view if piece.view is not None and not piece.view.is_cuda else None


class GlooTransport(Transport):
    name = "gloo"

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        stripes: int = 1,
        device: torch.device | None = None,
        chunk_bytes: int | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ) -> None:
        """Checks the options; ``connect()`` then makes the groups (collective)."""
        super().__init__(rank, world_size)
        check_positive("stripes", stripes)
        self._stripes = stripes
        self._groups: list[Channel] = []
        lanes = self._lane_count = 2 * max(world_size - 1, 1) * stripes
        check_positive("staging_bytes", staging_bytes)
        if chunk_bytes is None:
            chunk_bytes = default_chunk_bytes(staging_bytes, lanes)
        check_positive("chunk_bytes", chunk_bytes)
        self._slots_per_lane = min(staging_bytes // (lanes * chunk_bytes), _MAX_SLOTS_PER_LANE)
        if self._slots_per_lane < 1:
            raise InvalidTransferError(
                f"staging_bytes={staging_bytes} cannot give each of the {lanes} "
                f"(peer, direction) lanes one {chunk_bytes}-byte slot; raise staging_bytes to "
                f"at least {lanes * chunk_bytes} or lower chunk_bytes (same on every rank)"
            )
        self._chunk = chunk_bytes
        self._device: torch.device | None = None
        if device is not None and device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailableError(
                    f"device={device}: gloo stages CUDA tensors through host memory, but "
                    "torch.cuda.is_available() is False here; pass device='cpu' or None"
                )
            self._device = _cuda.resolve_device(device)  # "cuda" alone: the current device
        self._pool: torch.Tensor | None = None
        self._lanes: ThreadPoolExecutor | None = None
        self._d2h: torch.cuda.Stream | None = None
        self._h2d: torch.cuda.Stream | None = None
        self._user_stream: torch.cuda.Stream | None = None
        self._cuda_lock = threading.Lock()
        # held by a lane while it cuts a piece and queues its copy (see the module docstring)
        self._copy_lock = threading.Lock()

    def connect(self, group: dist.ProcessGroup, timeout: float | None) -> None:
        """Makes this transport's own groups of ``group``'s members (collective)."""
        self._groups = private_groups(group, self.rank, self.world_size, self._stripes, timeout)

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

    def accepts(self, tensor: torch.Tensor) -> bool:
        if tensor.is_cpu:
            return True
        device = self._device
        return device is not None and tensor.is_cuda and tensor.get_device() == device.index

    def home_device(self) -> torch.device:
        return torch.device("cpu") if self._device is None else self._device

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
        wait_work(self._groups[0].allgather([out], [local]), deadline)
        return torch.stack(out)

    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        on_cuda = any(t.is_cuda for t in batch.all_tensors())
        if not on_cuda:
            for src, dst in batch.copies:
                as_bytes(dst).copy_(as_bytes(src))
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
                    as_bytes(dst).copy_(as_bytes(src), non_blocking=True)
                copies_done = _cuda.new_event()
                copies_done.record(h2d)
        self._run_lanes(batch, ready if isinstance(ready, torch.cuda.Event) else None, deadline)
        if copies_done is not None:
            _cuda.wait_event(copies_done, deadline)

    def _run_direct(self, batch: PreparedBatch, deadline: float | None) -> None:
        works: list[dist.Work] = []
        scatters: list[tuple[torch.Tensor, Piece]] = []
        for stream in byte_streams(batch):
            kind, peer, cut = stream.kind, stream.peer, _Cut(stream, self._chunk)
            for tag in range(cut.count):
                piece = cut.piece(tag)  # posting releases the GIL between pieces
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
        lanes = self._lane_count
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

    def _run_lanes(
        self, batch: PreparedBatch, ready: torch.cuda.Event | None, deadline: float | None
    ) -> None:
        assert self._lanes is not None
        k = len(self._groups)
        futures: list[Future[None]] = []
        for stream in byte_streams(batch):
            kind, peer, cut = stream.kind, stream.peer, _Cut(stream, self._chunk)
            other = peer if peer < self.rank else peer - 1
            work: Callable[..., None] = self._send_lane if kind is OpKind.SEND else self._recv_lane
            for stripe in range(min(k, cut.count)):
                tags = range(stripe, cut.count, k)  # piece i travels on stripe i % k
                lane = (2 * other + (0 if kind is OpKind.SEND else 1)) * k + stripe
                slots = self._lane_slots(lane)
                waits = _CopyWaits(ready, self._user_stream is None, deadline)
                futures.append(
                    self._lanes.submit(
                        _in_transfer_mode, work, peer, cut, tags, slots, waits, deadline
                    )
                )
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

    def _queue_copy(self, stream: torch.cuda.Stream, copy: Callable[..., None]) -> torch.cuda.Event:
        """Queues ``copy(non_blocking=True)`` on ``stream``; returns an event after it."""
        with self._copy_lock, torch.cuda.stream(stream):
            copy(non_blocking=True)
            done = _cuda.new_event(blocking=True)
            done.record(stream)
        return done

    def _send_lane(
        self,
        peer: int,
        cut: _Cut,
        tags: range,
        slots: list[torch.Tensor],
        waits: _CopyWaits,
        deadline: float | None,
    ) -> None:
        d2h, _ = self._streams()
        free = list(range(len(slots)))
        inflight: collections.deque[tuple[dist.Work, int | None]] = collections.deque()
        for tag in tags:
            while not free:
                work, slot = inflight.popleft()
                wait_work(work, deadline)
                if slot is not None:
                    free.append(slot)
            with self._copy_lock:
                piece = cut.piece(tag)
            direct = _direct(piece)
            if direct is not None:
                inflight.append((self._post(OpKind.SEND, direct, peer, tag), None))
                continue
            slot = free.pop()
            buf = slots[slot][: piece.nbytes]
            copied = self._queue_copy(d2h, partial(piece.gather, buf, same_device=False))
            waits.wait(copied)
            inflight.append((self._post(OpKind.SEND, buf, peer, tag), slot))
        for work, _ in inflight:
            wait_work(work, deadline)

    def _recv_lane(
        self,
        peer: int,
        cut: _Cut,
        tags: range,
        slots: list[torch.Tensor],
        waits: _CopyWaits,
        deadline: float | None,
    ) -> None:
        _, h2d = self._streams()
        free = list(range(len(slots)))
        posted: collections.deque[tuple[dist.Work, int | None, Piece]] = collections.deque()
        upcoming = collections.deque(tags)

        def post_more() -> None:
            while upcoming and free:
                tag = upcoming.popleft()
                with self._copy_lock:
                    piece = cut.piece(tag)
                direct = _direct(piece)
                if direct is not None:
                    posted.append((self._post(OpKind.RECV, direct, peer, tag), None, piece))
                    continue
                slot = free.pop()
                buf = slots[slot][: piece.nbytes]
                posted.append((self._post(OpKind.RECV, buf, peer, tag), slot, piece))

        post_more()
        while posted:
            work, slot, piece = posted.popleft()
            wait_work(work, deadline)
            if slot is not None:
                buf = slots[slot][: piece.nbytes]
                landed = self._queue_copy(h2d, partial(piece.scatter, buf, same_device=False))
                waits.wait(landed)
                free.append(slot)
            post_more()

    def abandon(self) -> None:
        # Closing the groups' sockets ends a peer's pending send or receive with an error
        # at once; without it a peer that passed the manifest check after this rank gave
        # up waited for its own deadline, or for this process to exit. A group is torn
        # down once no work holds it, which a thread of its own may wait out.
        groups, self._groups = self._groups, []
        threading.Thread(target=groups.clear, name="aeplb-gloo-abandon", daemon=True).start()

    def close(self) -> None:
        if self._lanes is not None:
            self._lanes.shutdown(wait=True)
            self._lanes = None
        self._pool = None
        self._groups.clear()  # this transport's own: their sockets close
