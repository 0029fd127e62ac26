from __future__ import annotations

import collections
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, cast

import anyio
import torch

from . import _manifest
from ._checks import check_bool, check_timeout, set_up_timeout
from ._exceptions import (
    AEPLBError,
    BrokenCommunicatorError,
    BusyCommunicatorError,
    ClosedCommunicatorError,
    InvalidTransferError,
    PeerMismatchError,
    TransferTimeoutError,
    short_error,
)
from ._ops import (
    DTYPE_INFO,
    OpKind,
    OpQueue,
    PreparedBatch,
    check_op,
    prepare,
    read_write_overlap,
)
from ._runtime import Job, Worker, WorkerStopped
from ._stats import CommunicatorStatistics, TransferStats
from .transports._cudabase import CudaTransport
from .transports._node import NodeGather, node_gather

if TYPE_CHECKING:
    from ._batch import Batch
    from ._blocking import BlockingCommunicator
    from .transports._base import Transport

# How long past its deadline a batch may run before the awaiting side gives up on the
# worker thread itself (the transport's own deadline should have fired well before).
_GRACE_SECONDS = 2.0


@dataclass
class _Outcome:
    transfer_seconds: float
    check_seconds: float


@dataclass
class _Pending:
    job: Job[_Outcome]
    batch: PreparedBatch
    called_at: float
    deadline: float | None
    timeout: float | None
    rejected: InvalidTransferError | None = None


_STRIDED = torch.strided


class Communicator:
    """Queues point-to-point sends and receives and runs them as one awaitable batch.

    Create one with :func:`aeplb.create_communicator`. Queueing (``add_send``,
    ``add_recv``) is synchronous and validates at once; ``await execute()`` hands the batch
    to the communicator's own worker thread and returns when received data is in place,
    without blocking the event loop. Batches run in call order, one at a time.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float | None = None,
        check_peers: bool = True,
        enqueue_on: str = "worker",
    ) -> None:
        self._transport = transport
        # the manifests' all-gather where _share_node found every rank on this node
        self._gather: NodeGather | None = None
        # read by every add_send/add_recv: kept here to spare the lookups through transport
        self._rank, self._world_size = transport.rank, transport.world_size
        self._accepts = transport.accepts
        self._timeout = check_timeout(timeout, "create_communicator")
        self._check_peers = check_bool(check_peers, "check_peers")
        if enqueue_on not in ("worker", "caller"):
            raise InvalidTransferError(
                f"enqueue_on must be 'worker' or 'caller', got {enqueue_on!r}"
            )
        if enqueue_on == "caller":
            if not (isinstance(transport, CudaTransport) and transport.can_enqueue_on_caller):
                raise InvalidTransferError(
                    "enqueue_on='caller' needs a CUDA transport (nccl, pynccl), "
                    f"not {transport.name}"
                )
            if self._check_peers:
                raise InvalidTransferError(
                    "enqueue_on='caller' needs check_peers=False: the manifest exchange waits "
                    "on the network and would block the calling thread"
                )
        self._enqueue_on_caller = enqueue_on == "caller"
        self._queue = OpQueue()
        self._worker = Worker(f"aeplb-{transport.name}")
        self._lock = threading.Lock()
        self._in_flight: collections.deque[Job[_Outcome]] = collections.deque()
        self._awaiting = False
        self._closed = False
        self._broken: BaseException | None = None
        self._last_error: BaseException | None = None
        self._completed = 0
        self._failed = 0
        self._bytes = [0, 0, 0]  # sent, received, copied
        self._warned_blocking = False

    # -- properties -------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank within the communicator's group."""
        return self._transport.rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the communicator's group."""
        return self._transport.world_size

    @property
    def backend(self) -> str:
        """The transport's name: ``"gloo"``, ``"nccl"``, ``"pynccl"`` or ``"ipc"``."""
        return self._transport.name

    @property
    def timeout(self) -> float | None:
        """Default deadline in seconds for ``execute()``; None waits without one."""
        return self._timeout

    @property
    def pending(self) -> int:
        """Number of queued ops not yet executed."""
        return len(self._queue)

    # -- queueing ---------------------------------------------------------------------

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        """Queues sending ``tensor`` to ``dst_rank`` (a rank within the group).

        Its address and size are taken now: keep the tensor's storage as it is until the
        batch ends (no ``resize_``, ``set_`` or ``.data =`` on a queued tensor).

        Raises:
            InvalidTransferError: the tensor or rank is unusable; nothing was queued.
            ClosedCommunicatorError: the communicator was closed.
            BrokenCommunicatorError: an earlier failure made it unusable.
        """
        self._enqueue(self._queue, False, tensor, dst_rank)

    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None:
        """Queues receiving into ``tensor`` from ``src_rank`` (a rank within the group).

        Its address and size are taken now, as for ``add_send``.

        Raises:
            InvalidTransferError: the tensor or rank is unusable; nothing was queued.
            ClosedCommunicatorError: the communicator was closed.
            BrokenCommunicatorError: an earlier failure made it unusable.
        """
        self._enqueue(self._queue, True, tensor, src_rank)

    def clear(self) -> int:
        """Discards the queued ops and returns how many there were."""
        count = len(self._queue)
        self._queue = OpQueue()
        return count

    def batch(self, *, timeout: float | None = None) -> Batch:
        """Returns an async context manager that collects ops and executes them on exit.

        The block's ops are kept apart from ``pending`` ones. On normal exit they run as one
        batch (the stats are on ``b.stats``); if the block raises, they are discarded.
        """
        from ._batch import Batch

        check_timeout(timeout, "batch")  # now, not when the block's ops are about to run
        return Batch(self, timeout)

    def set_stream(self, stream: torch.cuda.Stream | None) -> None:
        """Runs later transfers on ``stream`` (CUDA transports); None picks the default."""
        self._check_usable()
        self._transport.set_stream(stream)

    def _enqueue(self, queue: OpQueue, is_recv: bool, tensor: object, peer: object) -> None:
        if self._closed or self._broken is not None:
            self._check_usable()
        # The usual op (a network op on a tensor the transport takes at a glance, of a
        # dtype seen before) is queued here, inline: the many-small benchmark queues 2000
        # per batch on the caller's thread, and each call or attribute read costs about
        # 0.1 us of its 1 to 2. Keep it alike with OpQueue.add. Conjugate views can only
        # be complex, and complex dtypes are not in DTYPE_INFO: they take the full checks.
        if (
            type(peer) is int
            and 0 <= peer < self._world_size
            and peer != self._rank
            and isinstance(tensor, torch.Tensor)
            and tensor.layout is _STRIDED
            and tensor.is_contiguous()
            and not tensor.is_nested
            and not tensor.is_neg()
            and self._accepts(tensor)
        ):
            info = DTYPE_INFO.get(tensor.dtype)
            if info is not None:
                numel = tensor.numel()
                nbytes = numel * info[1]
                queue.tensors.append(tensor)
                queue.rows.extend((peer, is_recv, info[0], numel, nbytes, tensor.data_ptr()))
                if is_recv:
                    queue.received += nbytes
                else:
                    queue.sent += nbytes
                    queue.sends += 1
                return
        # anything else: the full checks, whose messages say what was wrong
        kind = OpKind.RECV if is_recv else OpKind.SEND
        transport = self._transport
        rank = check_op(kind, tensor, peer, transport.world_size)
        checked = cast(torch.Tensor, tensor)
        if not transport.accepts(checked):
            transport.check_tensor(checked, "add_recv" if is_recv else "add_send")
        queue.add(kind, checked, rank, transport.rank)

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedCommunicatorError(
                "this communicator was closed; create a new one with aeplb.create_communicator()"
            )
        if self._broken is not None:
            raise BrokenCommunicatorError(
                f"this communicator is broken by an earlier failure ({self._broken}); "
                "create a new one (and for NCCL a new process group)"
            ) from self._broken

    # -- execution --------------------------------------------------------------------

    async def execute(self, timeout: float | None = None) -> TransferStats:
        """Runs every queued op as one batch and clears the queue.

        Args:
            timeout: Deadline in seconds for this batch; None uses the communicator's.

        Returns:
            What moved and how long it took.

        Raises:
            InvalidTransferError: the batch is invalid locally (e.g. self-sends without
                matching self-receives); the queue is left as it was.
            PeerMismatchError: op lists do not pair up across ranks; nothing moved, the
                queue is cleared and the communicator stays usable.
            TransferTimeoutError: the deadline passed; the communicator is now broken.
            BrokenCommunicatorError: a peer or the backend failed.
            BusyCommunicatorError: another ``execute()`` is still being awaited.
            ClosedCommunicatorError: the communicator was closed.

        If the awaiting task is cancelled, the batch keeps running on the worker thread and
        keeps its tensors alive until it ends; the destination tensors hold the received
        data once it does (undefined until then). Later batches run after it.
        """
        return await self._execute_ops(self._queue, timeout, from_queue=True)

    async def _execute_ops(
        self, ops: OpQueue, timeout: float | None, *, from_queue: bool = False
    ) -> TransferStats:
        pending = self._start(ops, timeout, from_queue=from_queue)
        try:
            await self._wait_async(pending)
        finally:
            self._awaiting = False
        return self._finish(pending)

    def _execute_blocking(self, timeout: float | None) -> TransferStats:
        return self._run_blocking(self._queue, timeout, from_queue=True)

    def _share_node(self) -> None:
        """Moves the manifests' all-gather to shared memory where every rank of the group
        runs on this node: a mailbox exchange takes tens of microseconds, an all-gather
        through Gloo or NCCL half a millisecond or more. Collective, at creation; the
        set-up goes through the transport's own all-gather, with the warm-up's deadline.
        """
        transport = self._transport
        if self.world_size == 1 or not self._check_peers or transport.checks_in_band:
            return  # no manifest, or one that travels in the transport's own messages
        timeout = self._set_up_timeout()
        deadline = None if timeout is None else time.monotonic() + timeout

        def gather(local: torch.Tensor) -> torch.Tensor:
            return transport.all_gather(local, deadline)

        def work() -> None:
            self._gather = node_gather(gather, self.rank, self.world_size)

        job = self._worker.submit(lambda: self._guarded(work))
        limit = None if timeout is None else timeout + _GRACE_SECONDS
        if not job.wait(limit):
            self._abandon(timeout, "setting up with the other ranks")
        job.result()

    def _set_up_timeout(self) -> float | None:
        return set_up_timeout(self._timeout)

    def _warm_up(self) -> None:
        """Runs one tiny batch with every peer and waits for it, uncounted.

        NCCL sets up its communicator and each peer's connections on first use, which
        made a first batch take 0.2 to 0.7 s on 2 GPUs (more on more ranks): long enough
        to miss a short deadline and break the communicator. Here it happens while the
        ranks create the communicator together.
        """
        rank, world = self.rank, self.world_size
        if world == 1:
            return
        device = self._transport.home_device()
        sends = torch.full((world,), rank + 1, dtype=torch.int32, device=device)
        recvs = torch.zeros(world, dtype=torch.int32, device=device)
        ops = OpQueue()
        for peer in range(world):
            if peer != rank:
                ops.add(OpKind.SEND, sends[peer : peer + 1], peer, rank)
                ops.add(OpKind.RECV, recvs[peer : peer + 1], peer, rank)
        self._run_blocking(ops, self._set_up_timeout(), counted=False)

    def _run_blocking(
        self,
        ops: OpQueue,
        timeout: float | None,
        *,
        from_queue: bool = False,
        counted: bool = True,
    ) -> TransferStats:
        pending = self._start(ops, timeout, from_queue=from_queue, counted=counted)
        try:
            limit = None
            if pending.deadline is not None:
                limit = max(pending.deadline - time.monotonic(), 0.0) + _GRACE_SECONDS
            # A done-callback, not job.wait(): it runs after _settle, so statistics() read
            # right after execute() returns (or raises) already counts this batch.
            settled = threading.Event()
            pending.job.add_done_callback(settled.set)
            if not settled.wait(limit):
                self._abandon(pending.timeout)
        finally:
            self._awaiting = False
        return self._finish(pending)

    async def _wait_async(self, pending: _Pending) -> None:
        if pending.deadline is None:
            await pending.job.wait_async()
            return
        limit = max(pending.deadline - time.monotonic(), 0.0) + _GRACE_SECONDS
        with anyio.move_on_after(limit):
            await pending.job.wait_async()
        if not pending.job.done():
            self._abandon(pending.timeout)

    def _abandon(self, timeout: float | None, what: str = "the batch") -> None:
        error = TransferTimeoutError(
            f"{what} did not finish within its {timeout} s deadline and the "
            f"{self.backend} backend did not return; the communicator is broken, create a new one"
        )
        with self._lock:
            self._last_error = error
        self._mark_broken(error)
        raise error

    def _start(
        self, ops: OpQueue, timeout: float | None, *, from_queue: bool, counted: bool = True
    ) -> _Pending:
        self._check_usable()
        if self._awaiting:
            raise BusyCommunicatorError(
                "execute() is already in progress on this communicator; await it before "
                "starting another batch (use one communicator per concurrent stream of batches)"
            )
        timeout = check_timeout(timeout, "execute") or self._timeout
        called_at = time.monotonic()
        deadline = None if timeout is None else called_at + timeout
        rejected: InvalidTransferError | None = None
        try:
            batch = prepare(ops, self.rank)
        except InvalidTransferError as exc:
            if not self._check_peers:
                raise
            # Tell the peers, through the manifest, so they fail now instead of at a deadline.
            rejected, batch = exc, PreparedBatch()
        ready = self._transport.capture_ready()
        status = _manifest.OK if rejected is None else _manifest.REJECTED
        try:
            if self._enqueue_on_caller:
                job = self._worker.submit(self._enqueue_here(batch, ready, deadline))
            else:
                job = self._worker.submit(lambda: self._run(batch, ready, deadline, status))
        except WorkerStopped as exc:  # closed from another thread since _check_usable
            raise ClosedCommunicatorError(
                "this communicator was closed while execute() was starting; nothing was sent"
            ) from exc
        with self._lock:
            self._in_flight.append(job)
        job.add_done_callback(lambda: self._settle(job, batch, counted))
        if from_queue and rejected is None:
            self._queue = OpQueue()
        self._awaiting = True
        return _Pending(job, batch, called_at, deadline, timeout, rejected)

    def _enqueue_here(
        self, batch: PreparedBatch, ready: object | None, deadline: float | None
    ) -> Callable[[], _Outcome]:
        """Enqueues the NCCL work on the calling thread; the worker only waits for it.

        For servers whose NCCL collectives run on the main thread: no NCCL call ever comes
        from another thread. Enqueueing takes host time on the caller (about 1.6 ms for 96
        ops with torch's NCCL); the wait does not.
        """
        transport = self._transport
        assert isinstance(transport, CudaTransport)
        started = time.monotonic()
        done: list[torch.cuda.Event] = []
        self._guarded(lambda: done.append(transport.enqueue(batch, ready)))

        def wait() -> _Outcome:
            self._guarded(lambda: transport.wait(done[0], deadline))
            return _Outcome(time.monotonic() - started, 0.0)

        return wait

    def _guarded(self, fn: Callable[[], None]) -> None:
        """Runs backend work, translating its failures and breaking the communicator."""
        try:
            fn()
        except AEPLBError:
            raise
        except TimeoutError as exc:
            error: AEPLBError = TransferTimeoutError(
                f"the batch missed its deadline on rank {self.rank}: {short_error(exc)}. A "
                "peer may be dead, stopped or not executing a matching batch; the "
                "communicator is broken, create a new one"
            )
            self._break(error, exc)
            raise error from exc
        except Exception as exc:
            error = BrokenCommunicatorError(
                f"the {self.backend} backend failed on rank {self.rank}: {short_error(exc)}. "
                "A peer may have died; the communicator is broken, create a new one"
            )
            self._break(error, exc)
            raise error from exc

    def _run(
        self, batch: PreparedBatch, ready: object | None, deadline: float | None, status: int
    ) -> _Outcome:
        """Runs on the worker thread."""
        if self._broken is not None:
            raise BrokenCommunicatorError(
                f"an earlier batch broke this communicator ({self._broken})"
            ) from self._broken
        started = time.monotonic()
        check_seconds = 0.0

        clash = read_write_overlap(batch)
        if clash is not None:
            status = _manifest.REJECTED

        def work() -> None:
            nonlocal check_seconds
            run = batch
            if self._check_peers:
                local = _manifest.build(batch.table, self.world_size, status)
                if self._transport.checks_in_band:
                    run = replace(batch, manifest=local)
                else:
                    gather = self._gather or self._transport
                    _manifest.check(local, lambda t: gather.all_gather(t, deadline), self.rank)
                check_seconds = time.monotonic() - started
            elif clash is not None:
                return  # no manifest to tell the peers with
            self._transport.run(run, ready, deadline)

        try:
            self._guarded(work)
        except PeerMismatchError:
            if clash is None:
                raise
        if clash is not None:  # the peers were told through the manifest: nothing moved
            raise InvalidTransferError(f"rank {self.rank}: {clash}")
        return _Outcome(time.monotonic() - started, check_seconds)

    def _break(self, error: AEPLBError, cause: BaseException) -> None:
        error.__cause__ = cause
        self._mark_broken(error)

    def _mark_broken(self, error: AEPLBError) -> None:
        with self._lock:
            first = self._broken is None
            if first:
                self._broken = error
        if first:
            self._transport.abandon()

    def _settle(self, job: Job[_Outcome], batch: PreparedBatch, counted: bool) -> None:
        """Runs on the worker thread when a job ends, awaited or not.

        Counts bytes here, not in ``_finish``: a batch whose awaiting task was cancelled
        still completes, and its bytes belong with it in ``batches_completed``.
        """
        with self._lock:
            self._in_flight.remove(job)
            if not counted:
                return
            try:
                job.result()
            except BaseException as exc:
                self._failed += 1
                self._last_error = exc
            else:
                self._completed += 1
                self._bytes[0] += batch.bytes_sent
                self._bytes[1] += batch.bytes_received
                self._bytes[2] += batch.bytes_copied

    def _finish(self, pending: _Pending) -> TransferStats:
        if pending.rejected is not None:
            raise pending.rejected  # the peers got a PeerMismatchError through the manifest
        outcome = pending.job.result()  # re-raises the worker's error
        batch = pending.batch
        finished = pending.job.finished_at or time.monotonic()
        return TransferStats(
            bytes_sent=batch.bytes_sent,
            bytes_received=batch.bytes_received,
            bytes_copied=batch.bytes_copied,
            num_sends=batch.num_sends,
            num_recvs=batch.num_recvs,
            num_copies=len(batch.copies),
            seconds=finished - pending.called_at,
            transfer_seconds=outcome.transfer_seconds,
            check_seconds=outcome.check_seconds,
        )

    # -- introspection and lifetime ---------------------------------------------------

    def statistics(self) -> CommunicatorStatistics:
        """Returns a snapshot of cumulative counters and health (never blocks)."""
        now = time.monotonic()
        with self._lock:
            oldest = self._in_flight[0].submitted_at if self._in_flight else now
            return CommunicatorStatistics(
                backend=self.backend,
                rank=self.rank,
                world_size=self.world_size,
                pending_ops=len(self._queue),
                batches_completed=self._completed,
                batches_failed=self._failed,
                bytes_sent=self._bytes[0],
                bytes_received=self._bytes[1],
                bytes_copied=self._bytes[2],
                in_flight=len(self._in_flight),
                in_flight_seconds=now - oldest,
                last_error=self._last_error,
                closed=self._closed,
                broken=self._broken is not None,
            )

    def blocking(self) -> BlockingCommunicator:
        """Returns a facade with the reference four-method interface; ``execute()`` blocks."""
        self._check_usable()
        from ._blocking import BlockingCommunicator

        return BlockingCommunicator(self)

    def _begin_close(self) -> Job[None] | None:
        if self._closed:
            return None
        self._closed = True
        self._queue = OpQueue()
        # the job holds the parts, not self, so __del__ can close through here too
        transport, gather = self._transport, self._gather
        job = self._worker.submit(lambda: _close_parts(transport, gather))
        self._worker.stop()
        return job if self._broken is None else None

    def __del__(self) -> None:
        # An unclosed communicator would keep its worker thread (and the transport's
        # sockets or CUDA resources) until the process exits.
        if getattr(self, "_closed", True):
            return  # closed, or __init__ failed before there was anything to release
        warnings.warn(
            f"unclosed {self!r}: call `await comm.aclose()` or use `async with comm`",
            ResourceWarning,
            source=self,
            stacklevel=2,
        )
        self._begin_close()

    def _close_blocking(self) -> None:
        job = self._begin_close()
        if job is not None:
            job.wait(self._timeout or 60.0)

    async def aclose(self) -> None:
        """Closes the communicator; queued ops are discarded.

        Batches already handed to the worker (including ones whose awaiting task was
        cancelled) finish first, unless the communicator is broken. Idempotent.
        """
        job = self._begin_close()
        if job is None:
            await anyio.lowlevel.checkpoint()
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout or 60.0):
            await job.wait_async()

    async def __aenter__(self) -> Communicator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return (
            f"<aeplb.Communicator backend={self.backend} rank={self.rank}/{self.world_size} "
            f"pending={self.pending} {state}>"
        )


def _close_parts(transport: Transport, gather: NodeGather | None) -> None:
    """Runs on the worker thread, after every batch handed to it."""
    try:
        transport.close()
    finally:
        if gather is not None:
            gather.close()
