"""What ``rearrange_experts`` accepts, and how its ranks agree on it before anything moves.

A rank that rejects its arguments still joins the agreement, flagged as rejecting, so its
peers stop at once instead of waiting for it until their deadline.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from typing import Any, NamedTuple

import anyio.to_thread
import numpy as np
import torch

from ._checks import MAX_TIMEOUT, timeout_ok
from ._communicator import Communicator
from ._exceptions import InvalidTransferError, PeerMismatchError
from ._onstreams import current_streams, host_copy, in_thread, to_device
from .plan import RearrangementPlan, plan_rearrangement


class Args(NamedTuple):
    """The checked arguments of one rearrange_experts call."""

    weights: list[list[torch.Tensor]]
    plan: RearrangementPlan
    old: np.ndarray
    new: np.ndarray


async def check_args(
    comm: Communicator,
    expert_weights: object,
    old_phy2log: object,
    new_phy2log: object,
    on_layer: object,
    on_progress: object,
    log2phy: object,
    logcnt: object,
    depth: object,
    timeout: object,
) -> Args:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise InvalidTransferError(f"layers_in_flight: expected an int >= 1, got {depth!r}")
    if not timeout_ok(timeout):
        raise InvalidTransferError(
            f"timeout: expected positive seconds up to {MAX_TIMEOUT:g} or None, got {timeout!r}"
        )
    for name, fn in (("on_layer", on_layer), ("on_progress", on_progress)):
        if fn is not None and not callable(fn):  # else it would fail after a commit
            raise InvalidTransferError(f"{name}: expected a callable or None, got {fn!r}")
    if comm.pending:
        raise InvalidTransferError(
            f"comm: has {comm.pending} queued op(s) that would join the first layer's batch; "
            "execute or clear() them before rearranging"
        )
    if not isinstance(old_phy2log, torch.Tensor) or old_phy2log.is_floating_point():
        raise InvalidTransferError(
            "old_phy2log: expected the live integer placement tensor (it is updated in place)"
        )
    old = await host_copy(old_phy2log)
    new = await host_copy(new_phy2log) if isinstance(new_phy2log, torch.Tensor) else None
    new = np.array(new_phy2log, copy=True) if new is None else new
    # Planning takes milliseconds for large models: keep it off the event loop.
    plan = await anyio.to_thread.run_sync(
        functools.partial(plan_rearrangement, old, new, rank=comm.rank, world_size=comm.world_size)
    )
    weights = _check_weights(comm, expert_weights, len(plan.layers), plan.slots_per_rank)
    _check_tables(plan, new, log2phy, logcnt)
    return Args(weights, plan, old, new)


def _check_weights(
    comm: Communicator, expert_weights: object, num_layers: int, slots: int
) -> list[list[torch.Tensor]]:
    layers = _as_list(expert_weights, "expert_weights")
    if len(layers) != num_layers:
        raise InvalidTransferError(
            f"expert_weights: expected {num_layers} layers (one per placement row), "
            f"got {len(layers)}"
        )
    out: list[list[torch.Tensor]] = []
    for layer, entry in enumerate(layers):
        tensors = _as_list(entry, f"expert_weights[{layer}]")
        if not tensors:
            raise InvalidTransferError(
                f"expert_weights[{layer}]: is empty; pass the layer's expert tensors (w1, w2, ...)"
            )
        for k, w in enumerate(tensors):
            where = f"expert_weights[{layer}][{k}]"
            if not isinstance(w, torch.Tensor) or w.dim() == 0 or w.shape[0] != slots:
                shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise InvalidTransferError(
                    f"{where}: expected a tensor whose dim 0 holds this rank's {slots} slots "
                    f"(R / world_size), got {shape}"
                )
            if not w.is_contiguous():
                raise InvalidTransferError(
                    f"{where}: is not contiguous; pass the contiguous parameter tensor itself "
                    "(slots are sent straight from it and written in place)"
                )
            try:  # the transport's own checks (device, layout), with nothing executed
                with torch.no_grad():
                    comm.add_recv(w[0], 0)
            except InvalidTransferError as exc:
                raise InvalidTransferError(
                    f"{where}: the communicator cannot move it: {exc}"
                ) from exc
            finally:
                comm.clear()
        out.append(tensors)
    return out


def _as_list(value: object, name: str) -> list[Any]:
    # A tensor is iterable too, but iterating one here would silently mean something else.
    if isinstance(value, torch.Tensor) or not isinstance(value, Iterable):
        raise InvalidTransferError(
            f"{name}: expected a sequence (e.g. a list), got {type(value).__name__}; "
            "expert_weights is indexed as expert_weights[layer][k]"
        )
    return list(value)


def _check_tables(
    plan: RearrangementPlan, new: np.ndarray, log2phy: object, logcnt: object
) -> None:
    num_layers = len(plan.layers)
    rows = [new[lp.layer] for lp in plan.layers if lp.changed]
    experts = max((int(r.max()) + 1 for r in rows), default=0)
    most = max((int(np.bincount(r).max()) for r in rows), default=0)
    for name, table, ndim in (("log2phy", log2phy, 3), ("logcnt", logcnt, 2)):
        if table is None:
            continue
        if not isinstance(table, torch.Tensor) or table.is_floating_point() or table.dim() != ndim:
            raise InvalidTransferError(
                f"{name}: expected a {ndim}-D integer tensor (updated in place), got "
                f"{getattr(table, 'shape', type(table).__name__)}"
            )
        if table.shape[0] != num_layers or table.shape[1] < experts:
            raise InvalidTransferError(
                f"{name}: shape {tuple(table.shape)} does not cover {num_layers} layers x "
                f"{experts} experts of new_phy2log"
            )
        if ndim == 3 and table.shape[2] < most:
            raise InvalidTransferError(
                f"log2phy: new_phy2log places an expert in {most} slots but log2phy has room "
                f"for {table.shape[2]}; allocate log2phy with maxcnt >= {most}"
            )


async def check_agreement(
    comm: Communicator, args: Args | None, problem: Exception | None, timeout: float | None
) -> None:
    """One small batch with every peer: each rank sends a digest of both placements and
    whether it rejected its arguments (``args`` None, ``problem`` its error)."""
    mine = (0, 1) if args is None else (_digest(args.old, args.new), 0)
    try:
        got = await _exchange(comm, mine, timeout)
    except Exception:
        if problem is None:
            raise
        # This rank's own error is what to fix; the exchange's (which may have broken the
        # communicator) stays visible as its context.
        raise problem  # noqa: B904
    if problem is not None:
        return  # the caller raises it
    rejected = [p for p, (_, flag) in enumerate(got) if p != comm.rank and flag]
    if rejected:
        raise PeerMismatchError(
            f"rearrange_experts: rank(s) {rejected} rejected their arguments (the error raised "
            f"there says why), so rank {comm.rank} stops too; nothing moved and the "
            "communicator stays usable: call again with valid arguments on every rank"
        )
    differ = [p for p, (v, _) in enumerate(got) if p != comm.rank and v != mine[0]]
    if differ:
        raise InvalidTransferError(
            f"old_phy2log/new_phy2log: rank {comm.rank}'s placements differ from rank(s) "
            f"{differ}; every rank must pass identical placements (after a failure, compare "
            "committed rows across ranks before retrying)"
        )


def _digest(old: np.ndarray, new: np.ndarray) -> int:
    digest = hashlib.blake2b(digest_size=8)
    for arr in (old, new):
        digest.update(repr(arr.shape).encode())
        digest.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True)


async def _exchange(
    comm: Communicator, mine: tuple[int, int], timeout: float | None
) -> list[list[int]]:
    """Sends ``mine`` to every peer and returns every rank's, by rank (this rank's zeros)."""
    # The transport's own device (its warm-up's): the weights may be what this rank rejected.
    device = comm._transport.home_device()

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        theirs = torch.zeros((comm.world_size, len(mine)), dtype=torch.int64, device=device)
        return theirs, to_device(torch.tensor(mine, dtype=torch.int64), theirs)

    theirs, sent = await in_thread(current_streams([device]), make)
    # Apart from any queued ops, which a rank rejects but keeps.
    async with comm.batch(timeout=timeout) as batch:
        for peer in range(comm.world_size):
            if peer != comm.rank:
                batch.add_send(sent, peer)
                batch.add_recv(theirs[peer], peer)
    rows: list[list[int]] = (await host_copy(theirs)).tolist()
    return rows
