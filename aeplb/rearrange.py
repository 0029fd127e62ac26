"""Runs a rearrangement plan over a model's expert weights, committing one layer at a time.

Each changed layer is one communicator batch received into staging buffers; the layer is then
committed with no await in between (weights, then placement rows), so nothing that runs on the
event loop or later in the caller's CUDA stream ever sees a torn layer.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import numpy as np
import torch

from ._checks import timeout_ok
from ._communicator import Communicator
from ._exceptions import InvalidTransferError
from ._onstreams import current_streams, in_thread, on_streams, to_device
from ._rearrange_args import Args, check_agreement, check_args
from ._runtime import transfer_mode
from .plan import LayerPlan, RearrangementPlan

if TYPE_CHECKING:
    from ._stats import TransferStats

__all__ = ["ExpectedBytes", "RearrangeStats", "expected_bytes", "rearrange_experts"]


# After a failure, how long past the transfer deadline to wait for a batch already in flight.
_DRAIN_GRACE = 5.0
_DRAIN_DEFAULT = 60.0


@dataclass(frozen=True)
class RearrangeStats:
    """What one :func:`rearrange_experts` call moved and how long it took.

    Attributes:
        layers: Number of layers in the placement.
        layers_changed: Layers that changed on some rank (each ran as one batch).
        bytes_sent: Bytes this rank sent to other ranks.
        bytes_received: Bytes this rank received from other ranks.
        bytes_copied_locally: Bytes written into slots from this rank's own data: local
            slot-to-slot copies plus extra replicas of a received expert.
        seconds: Wall time of the whole call.
        layer_seconds: Per changed layer, from its transfer's start to the end of its commit.
        transfer_seconds: Sum of the batches' ``TransferStats.seconds``.
    """

    layers: int
    layers_changed: int
    bytes_sent: int
    bytes_received: int
    bytes_copied_locally: int
    seconds: float
    layer_seconds: tuple[float, ...]
    transfer_seconds: float


class ExpectedBytes(NamedTuple):
    """Bytes a plan moves on one rank (see :func:`expected_bytes`)."""

    sent: int
    received: int
    copied_locally: int


def expected_bytes(
    plan: RearrangementPlan, expert_weights: Sequence[Sequence[torch.Tensor]]
) -> ExpectedBytes:
    """Bytes that :func:`rearrange_experts` will move for ``plan``, without moving anything."""
    sent = received = copied = 0
    for lp, tensors in zip(plan.layers, expert_weights, strict=True):
        size = sum(w.element_size() * w[0].numel() for w in tensors)
        sent += size * len(lp.sends)
        received += size * len(lp.recvs)
        copied += size * (len(lp.local_copies) + sum(len(r.dst_slots) - 1 for r in lp.recvs))
    return ExpectedBytes(sent, received, copied)


async def rearrange_experts(
    comm: Communicator,
    expert_weights: Sequence[Sequence[torch.Tensor]],
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    *,
    on_layer: Callable[[int], object] | None = None,
    on_progress: Callable[[int, int], object] | None = None,
    log2phy: torch.Tensor | None = None,
    logcnt: torch.Tensor | None = None,
    layers_in_flight: int = 2,
    timeout: float | None = None,
    check_placements: bool = True,
) -> RearrangeStats:
    """Moves expert weights from the live placement to a new one, layer by layer.

    Every rank of ``comm`` calls this with the same placements. Each changed layer runs as
    one ``comm.execute()``: sends read the live old weights, receives land in staging
    buffers. Once its batch is done, the layer is committed with no await in between: received
    experts and local copies are written into their slots, then ``old_phy2log[layer]`` (and
    ``log2phy[layer]``, ``logcnt[layer]`` if given) are updated in place, keeping their
    storage so captured CUDA graphs stay valid. CUDA copies are issued on the caller's
    current stream (captured when the call starts) in one uninterrupted sequence: kernels
    queued before it see the whole old layer, kernels queued after see the whole new one.
    Then ``on_layer(layer)`` is called. Up to ``layers_in_flight`` layers hold staging buffers;
    with more than one, layer l+1's transfer runs while layer l commits and ``on_layer(l)`` runs.
    Planning, staging allocation and host copies run in worker threads (CUDA work on the
    captured stream), so the event loop never waits for the GPU; the only work on the loop is
    queueing ops and the commit (on CPU tensors, a copy of the layer's changed slots).

    On failure or cancellation, committed layers stay new and every other layer stays
    exactly old, weights and placement rows alike; a transfer already in flight is waited for
    (shielded, bounded by the timeout) and not committed. The original exception propagates;
    cancellation propagates as the async library's own. What each rank can assume: ranks that
    stop at the same layer (``on_layer`` raising or cancelling at that layer on every rank, or
    a transfer error, which every rank sees for the same batch) end with the same layers
    committed, and a later call with the same target finishes the rest. Ranks cancelled at
    unrelated moments may end one layer apart, and a rank that stops alone leaves its peers
    waiting in their next batch until ``timeout``; a later call then raises (with
    ``check_placements``) instead of pairing the wrong experts.

    Args:
        comm: The communicator; it must have no queued ops.
        expert_weights: ``expert_weights[layer][k]``: a contiguous tensor whose dim 0 holds
            this rank's ``S = R / world_size`` slots (rank r owns slots [r*S, (r+1)*S)).
        old_phy2log: [L, R] integer placement in use; updated in place, row by row.
        new_phy2log: [L, R] placement to move to.
        on_layer: Called as ``on_layer(layer)`` after each commit; may be async.
        on_progress: Called as ``on_progress(done, L)`` once for each done = 1..L in order,
            when layers below ``done`` are finished (changed or not); may be async.
        log2phy: Optional [L, E, maxcnt] table, -1 padded; rows of committed layers are
            recomputed from the new placement, slots in ascending order.
        logcnt: Optional [L, E] replica counts; rows of committed layers are recomputed.
        layers_in_flight: Layers holding staging buffers at once (>= 1; 1 is sequential).
        timeout: Deadline in seconds for each layer's batch; None uses the communicator's.
        check_placements: First exchange with every peer (one small batch) a digest of both
            placements and whether the rank rejected its arguments, and raise on every rank
            if any rank's placements differ or any rank rejected: ranks never pair wrong
            experts, and a rank's bad argument stops them all before anything moves.

    Returns:
        A :class:`RearrangeStats`.

    Raises:
        InvalidTransferError: a bad argument, or placements differing across ranks; raised
            before anything moves. With ``check_placements`` and more than one rank, a rank
            that rejects its arguments (with any error raised while checking them) first
            joins the placement exchange, flagged as rejecting, then raises its own error:
            its peers stop at once instead of waiting for it until their deadline.
        PeerMismatchError: another rank rejected its arguments (the message names it; it
            raises why). As when ``comm.execute()`` fails this way, nothing moved and the
            communicator stays usable.
        TransferError: a batch failed (subclasses as raised by ``comm.execute()``).

    Only what leaves no exchange to join is raised at once, alone, while peers wait in the
    exchange until their deadline: a ``comm`` that is not a :class:`Communicator`, or one
    closed or broken. Every rank must pass the same ``check_placements``: without the
    exchange (``check_placements=False``, for one batch less) a rank that rejects its
    arguments raises alone and its peers wait in their first layer's batch until the
    deadline. The exchange runs apart from ops queued on ``comm`` (which a rank rejects,
    leaving them queued) and on the transport's own device.
    """
    started = time.perf_counter()
    if not isinstance(comm, Communicator):  # nothing to tell the peers through
        raise InvalidTransferError(
            f"comm: expected an aeplb.Communicator (from create_communicator), got "
            f"{type(comm).__name__}"
        )
    args: Args | None = None
    problem: Exception | None = None
    try:
        args = await check_args(
            comm,
            expert_weights,
            old_phy2log,
            new_phy2log,
            on_layer,
            on_progress,
            log2phy,
            logcnt,
            layers_in_flight,
            timeout,
        )
    except Exception as exc:
        problem = exc  # raised after the agreement, which tells the peers to stop at once
    if check_placements and comm.world_size > 1:
        await check_agreement(comm, args, problem, timeout if timeout_ok(timeout) else None)
    if problem is not None:
        raise problem
    assert args is not None
    run = _Run(comm, args.weights, args.plan, args.new, old_phy2log, log2phy, logcnt, timeout)
    await run.run(on_layer, on_progress, layers_in_flight)
    return RearrangeStats(
        layers=len(args.plan.layers),
        layers_changed=sum(lp.changed for lp in args.plan.layers),
        bytes_sent=run.sent,
        bytes_received=run.received,
        bytes_copied_locally=run.copied,
        seconds=time.perf_counter() - started,
        layer_seconds=tuple(run.layer_seconds),
        transfer_seconds=run.transfer_seconds,
    )


@dataclass
class _Layer:
    """One changed layer with its staging buffers, between preparation and commit."""

    plan: LayerPlan
    recv_blocks: list[torch.Tensor]  # per k: [num recvs, *slot shape]
    staged_blocks: list[torch.Tensor]  # per k: old values of sources the commit overwrites
    staged_rows: dict[int, int]  # source slot -> row of staged_blocks
    rows: list[torch.Tensor]  # new placement rows, already on their tables' devices
    started: float = 0.0


class _Transfer:
    """One layer's batch, run in a child task so the host can commit the previous layer."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer
        # Shielded so that a failed or cancelled host still waits for the batch to end.
        self.scope = anyio.CancelScope(shield=True)
        self.done = anyio.Event()
        self.stats: TransferStats | None = None
        self.error: Exception | None = None

    async def run(
        self,
        comm: Communicator,
        timeout: float | None,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with self.scope:
                # execute() takes the queue before its first checkpoint, so the host may
                # commit while the batch runs.
                task_status.started()
                self.stats = await comm.execute(timeout=timeout)
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    async def result(self) -> TransferStats:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats


class _Run:
    def __init__(
        self,
        comm: Communicator,
        weights: list[list[torch.Tensor]],
        plan: RearrangementPlan,
        new: np.ndarray,
        phy2log: torch.Tensor,
        log2phy: torch.Tensor | None,
        logcnt: torch.Tensor | None,
        timeout: float | None,
    ) -> None:
        self.comm, self.weights, self.plan = comm, weights, plan
        self.new, self.timeout = new, timeout
        self.tables = [t for t in (phy2log, log2phy, logcnt) if t is not None]
        self.has_log2phy, self.has_logcnt = log2phy is not None, logcnt is not None
        self.streams = current_streams(
            t.device for t in [*(w for ws in weights for w in ws), *self.tables]
        )
        self.changed = [lp for lp in plan.layers if lp.changed]
        self.inflight: _Transfer | None = None
        self.sent = self.received = self.copied = self.reported = 0
        self.transfer_seconds = 0.0
        self.layer_seconds: list[float] = []

    async def run(
        self,
        on_layer: Callable[[int], object] | None,
        on_progress: Callable[[int, int], object] | None,
        depth: int,
    ) -> None:
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            try:
                await self._pipeline(tg, on_layer, on_progress, depth)
            except BaseException as exc:
                if self.inflight is not None and not self.inflight.done.is_set():
                    limit = self.timeout or self.comm.timeout or _DRAIN_DEFAULT
                    self.inflight.scope.deadline = anyio.current_time() + limit + _DRAIN_GRACE
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                error = exc  # re-raised below, unwrapped by the task group
        if error is not None:
            raise error

    async def _pipeline(
        self,
        tg: anyio.abc.TaskGroup,
        on_layer: Callable[[int], object] | None,
        on_progress: Callable[[int, int], object] | None,
        depth: int,
    ) -> None:
        total = len(self.plan.layers)
        upcoming = iter(self.changed)
        staged: deque[_Layer] = deque()

        async def refill() -> None:
            while len(staged) < depth and (lp := next(upcoming, None)) is not None:
                # Off the loop: allocating staging memory can wait for the GPU (cudaMalloc).
                staged.append(await in_thread(self.streams, self._prepare, lp))

        async def progress(until: int) -> None:
            while self.reported < until:
                self.reported += 1
                if on_progress is not None:
                    await _call(on_progress, self.reported, total)

        await progress(self.changed[0].layer if self.changed else total)
        await refill()
        if staged:
            await self._start(tg, staged[0])
        while self.inflight is not None:
            stats = await self.inflight.result()
            layer = staged.popleft()
            self.inflight = None
            await anyio.lowlevel.checkpoint_if_cancelled()
            # Joining batch l+1 and committing layer l go together, so a rank that entered
            # batch l+1 has committed layer l: ranks cancelled at unrelated moments end at
            # most one layer apart.
            with anyio.CancelScope(shield=True):
                if depth > 1 and staged:
                    await self._start(tg, staged[0])
                with transfer_mode():  # weights may be parameters or inference tensors
                    self._commit(layer, stats)
            index = layer.plan.layer
            del layer  # frees its staging buffers before the next layer is prepared
            if on_layer is not None:
                await _call(on_layer, index)
            await refill()
            await progress(staged[0].plan.layer if staged else total)
            if self.inflight is None and staged:
                await self._start(tg, staged[0])
            await anyio.lowlevel.checkpoint()

    async def _start(self, tg: anyio.abc.TaskGroup, layer: _Layer) -> None:
        # A cancellation already delivered must stop us before this rank joins a new batch.
        await anyio.lowlevel.checkpoint_if_cancelled()
        lp, comm = layer.plan, self.comm
        tensors = self.weights[lp.layer]
        # Peers pair ops in queue order: sends sorted by (dst, expert) on the sender match
        # receives sorted by (src, expert) on the receiver, k innermost on both sides.
        try:
            with torch.no_grad():
                for send in lp.sends:
                    for w in tensors:
                        comm.add_send(w[send.src_slot], send.dst_rank)
                for i, recv in enumerate(lp.recvs):
                    for block in layer.recv_blocks:
                        comm.add_recv(block[i], recv.src_rank)
        except BaseException:
            comm.clear()
            raise
        layer.started = time.perf_counter()
        self.inflight = _Transfer(layer)
        await tg.start(self.inflight.run, comm, self.timeout)

    def _prepare(self, lp: LayerPlan) -> _Layer:
        tensors = self.weights[lp.layer]
        overwritten = {c.dst_slot for c in lp.local_copies}
        overwritten.update(s for r in lp.recvs for s in r.dst_slots)
        # Sources that keep their expert are read at commit time instead of being staged.
        sources = sorted({c.src_slot for c in lp.local_copies} & overwritten)
        row = self.new[lp.layer]
        rows = [torch.from_numpy(row.copy())]
        if self.has_log2phy:
            rows.append(torch.from_numpy(_log2phy_row(row, *self.tables[1].shape[1:])))
        if self.has_logcnt:
            rows.append(torch.from_numpy(np.bincount(row, minlength=self.tables[-1].shape[1])))
        with torch.no_grad():
            recv_blocks = [w.new_empty((len(lp.recvs), *w.shape[1:])) for w in tensors]
            staged_blocks = [w.new_empty((len(sources), *w.shape[1:])) for w in tensors]
            for w, block in zip(tensors, staged_blocks, strict=True):
                for i, s in enumerate(sources):
                    block[i].copy_(w[s])
            rows = [to_device(r, t) for r, t in zip(rows, self.tables, strict=True)]
        return _Layer(lp, recv_blocks, staged_blocks, {s: i for i, s in enumerate(sources)}, rows)

    def _commit(self, layer: _Layer, stats: TransferStats) -> None:
        lp = layer.plan
        tensors = self.weights[lp.layer]
        with on_streams(self.streams), torch.no_grad():
            for w, recv_block, staged in zip(
                tensors, layer.recv_blocks, layer.staged_blocks, strict=True
            ):
                for i, recv in enumerate(lp.recvs):
                    for s in recv.dst_slots:
                        w[s].copy_(recv_block[i])
                for c in lp.local_copies:
                    at = layer.staged_rows.get(c.src_slot)
                    w[c.dst_slot].copy_(w[c.src_slot] if at is None else staged[at])
            for table, row in zip(self.tables, layer.rows, strict=True):
                table[lp.layer].copy_(row)
        self.layer_seconds.append(time.perf_counter() - layer.started)
        self.transfer_seconds += stats.seconds
        self.sent += stats.bytes_sent
        self.received += stats.bytes_received
        size = sum(w.element_size() * w[0].numel() for w in tensors)
        self.copied += size * (len(lp.local_copies) + sum(len(r.dst_slots) - 1 for r in lp.recvs))


async def _call(fn: Callable[..., object], *args: int) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


def _log2phy_row(row: np.ndarray, num_experts: int, maxcnt: int) -> np.ndarray:
    out = np.full((num_experts, maxcnt), -1, dtype=np.int64)
    fill = np.zeros(num_experts, dtype=np.int64)
    for slot, expert in enumerate(row.tolist()):
        out[expert, fill[expert]] = slot
        fill[expert] += 1
    return out
