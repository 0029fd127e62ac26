"""Transfer planning: old placement + new placement -> this rank's per-layer transfer plan.

Every rank computes its plan from the two placements alone, with no exchange, and the plans
of all ranks agree on who sends what to whom.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# np.unique imports numpy.ma on its first call, holding the GIL for 0.1 to 0.7 s on a loaded
# machine; importing it with aeplb keeps that stall out of the first rearrangement.
import numpy.ma
import numpy.typing as npt

from aeplb._arrays import int_array
from aeplb._exceptions import InvalidTransferError

__all__ = [
    "LayerBytes",
    "LayerPlan",
    "LocalCopy",
    "RearrangementPlan",
    "Recv",
    "Send",
    "plan_rearrangement",
]

_Int = npt.NDArray[np.int64]
_Bool = npt.NDArray[np.bool_]


class LocalCopy(NamedTuple):
    """Copy this rank's OLD weights in ``src_slot`` into ``dst_slot`` (local slot indices)."""

    src_slot: int
    dst_slot: int


class Send(NamedTuple):
    """Send this rank's OLD copy of ``expert`` (held in local ``src_slot``) to ``dst_rank``."""

    dst_rank: int
    expert: int
    src_slot: int


class Recv(NamedTuple):
    """Receive ``expert`` from ``src_rank`` once, into ``dst_slots[0]``.

    The remaining ``dst_slots`` are then filled locally from the received copy.
    """

    src_rank: int
    expert: int
    dst_slots: tuple[int, ...]


class LayerBytes(NamedTuple):
    """Bytes this rank sends and receives over the network for one layer."""

    sent: int
    received: int


@dataclass(frozen=True)
class LayerPlan:
    """What one rank does for one layer. Slot indices are local: 0 <= slot < slots_per_rank."""

    layer: int
    changed: bool
    """True when any slot of this layer changes on any rank; equal on every rank."""
    keep: tuple[int, ...]
    local_copies: tuple[LocalCopy, ...]
    recvs: tuple[Recv, ...]
    """Sorted by (src_rank, expert)."""
    sends: tuple[Send, ...]
    """Sorted by (dst_rank, expert)."""

    @property
    def num_sent(self) -> int:
        """Number of expert copies this rank sends on this layer."""
        return len(self.sends)

    @property
    def num_received(self) -> int:
        """Number of experts this rank receives on this layer."""
        return len(self.recvs)


@dataclass(frozen=True)
class RearrangementPlan:
    """One rank's plan for all layers, from :func:`plan_rearrangement`."""

    rank: int
    world_size: int
    slots_per_rank: int
    layers: tuple[LayerPlan, ...]

    @property
    def num_sent(self) -> int:
        """Number of expert copies this rank sends, over all layers."""
        return sum(lp.num_sent for lp in self.layers)

    @property
    def num_received(self) -> int:
        """Number of experts this rank receives, over all layers."""
        return sum(lp.num_received for lp in self.layers)

    def bytes_per_layer(self, expert_bytes: int) -> tuple[LayerBytes, ...]:
        """Network bytes this rank sends and receives per layer.

        Args:
            expert_bytes: size of one expert's weights in bytes (all tensors of one slot).

        Returns:
            One :class:`LayerBytes` per layer, in layer order.

        Raises:
            InvalidTransferError: if ``expert_bytes`` is not a non-negative int.
        """
        size = _int_arg(expert_bytes, "expert_bytes", minimum=0)
        return tuple(LayerBytes(lp.num_sent * size, lp.num_received * size) for lp in self.layers)


def plan_rearrangement(
    old_phy2log: Any, new_phy2log: Any, *, rank: int, world_size: int
) -> RearrangementPlan:
    """Plan how ``rank`` moves from the old placement to the new one.

    Rank r owns physical slots [r * S, (r + 1) * S) of every layer, S = R / world_size.
    For each layer, every local slot is in exactly one of: ``keep`` (same expert as before),
    a ``local_copies`` destination (the expert is in another local slot of the old
    placement), or the ``dst_slots`` of one ``recvs`` entry (this rank held no copy of the
    expert). A rank never receives an expert it already held, and receives each expert at
    most once per layer. Each receiver of expert e is served by one of e's old holders:
    the i-th receiver (ranks in ascending order) by holder ``(i + e) % num_holders`` (holders
    in ascending order), which spreads sends evenly over holders and over experts.

    Ordering contract, relied on by the executor: within a layer, ``sends`` are sorted by
    ``(dst_rank, expert)`` and ``recvs`` by ``(src_rank, expert)``. Hence rank a's sends to
    rank b and rank b's receives from rank a list the same experts in the same order, and
    can be paired one to one by position. ``changed`` is computed from the whole placement,
    so all ranks agree on which layers to run.

    Args:
        old_phy2log: [L, R] integer placement now in use (tensor or array).
        new_phy2log: [L, R] integer placement to move to; every expert of a layer must exist
            somewhere in that layer of ``old_phy2log``.
        rank: this rank, 0 <= rank < world_size.
        world_size: number of ranks; must divide R.

    Returns:
        This rank's :class:`RearrangementPlan`.

    Raises:
        InvalidTransferError: on a malformed argument, or a new expert with no old copy.
    """
    old = _as_placement(old_phy2log, "old_phy2log")
    new = _as_placement(new_phy2log, "new_phy2log")
    if old.shape != new.shape:
        raise InvalidTransferError(
            f"new_phy2log: shape {new.shape} differs from old_phy2log's {old.shape}; "
            "both must be [layers, physical slots]"
        )
    world = _int_arg(world_size, "world_size", minimum=1)
    me = _int_arg(rank, "rank", minimum=0)
    if me >= world:
        raise InvalidTransferError(f"rank: {me} is not below world_size={world}")
    num_layers, num_phy = old.shape
    if num_phy % world != 0:
        raise InvalidTransferError(
            f"world_size: the {num_phy} physical slots do not split evenly over {world} ranks; "
            "R must be a multiple of world_size"
        )
    slots = num_phy // world

    # Compact expert ids so that (layer, expert, rank) keys stay small whatever the ids are.
    experts, compact = np.unique(np.concatenate([old.ravel(), new.ravel()]), return_inverse=True)
    old3 = compact[: old.size].reshape(num_layers, world, slots)
    new3 = compact[old.size :].reshape(num_layers, world, slots)
    table = _TransferTable.build(old3, new3, experts)
    return RearrangementPlan(
        rank=me,
        world_size=world,
        slots_per_rank=slots,
        layers=_rank_layers(me, old3, new3, table, experts, (old != new).any(axis=1)),
    )


@dataclass(frozen=True)
class _TransferTable:
    """Every network transfer of every layer, as parallel arrays sorted by (layer, expert, dst).

    Keys encode (layer, compact expert, rank) as ``(layer * E + expert) * W + rank``.
    """

    layer: _Int
    expert: _Int
    dst: _Int
    src: _Int
    held_keys: _Int
    """Sorted unique keys of (layer, expert, rank) triples present in the old placement."""

    @classmethod
    def build(cls, old3: _Int, new3: _Int, experts: _Int) -> _TransferTable:
        num_layers, world, _ = old3.shape
        num_exp = experts.size
        lw = (np.arange(num_layers)[:, None, None] * num_exp, np.arange(world)[None, :, None])
        held_keys = np.unique((lw[0] + old3) * world + lw[1])
        need_keys = np.unique((lw[0] + new3) * world + lw[1])
        need_keys = need_keys[~_isin_sorted(need_keys, held_keys)]

        # Per (layer, expert) group: where its holders start in held_keys, and how many.
        held_group = held_keys // world
        need_group = need_keys // world
        first = np.searchsorted(held_group, need_group)
        count = np.searchsorted(held_group, need_group, side="right") - first
        if (count == 0).any():
            missing = need_group[np.flatnonzero(count == 0)[0]]
            layer, expert = divmod(int(missing), num_exp)
            raise InvalidTransferError(
                f"new_phy2log: layer {layer} needs expert {experts[expert]}, which no slot of "
                "that layer holds in old_phy2log; a rearrangement can only copy experts "
                "that exist"
            )
        # Index of each receiver among its group's receivers (need_keys is sorted).
        starts = np.searchsorted(need_group, need_group)
        recv_idx = np.arange(need_keys.size) - starts
        expert = need_group % num_exp
        # Rotating by the expert id spreads experts with few receivers over different holders.
        pick = (recv_idx + experts[expert]) % count
        src = held_keys[first + pick] % world
        return cls(need_group // num_exp, expert, need_keys % world, src, held_keys)


def _isin_sorted(keys: _Int, sorted_keys: _Int) -> _Bool:
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    found: _Bool = sorted_keys[pos] == keys
    return found


def _as_placement(value: Any, name: str) -> _Int:
    arr = int_array(value, name)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidTransferError(
            f"{name}: expected a 2-D [layers, physical slots] array with at least one slot, "
            f"got shape {arr.shape}"
        )
    if arr.size and arr.min() < 0:
        raise InvalidTransferError(
            f"{name}: contains negative expert id {arr.min()}; every slot must hold an expert"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def _int_arg(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise InvalidTransferError(f"{name}: expected an int, got a bool")
    try:
        out = operator.index(value)
    except TypeError:
        raise InvalidTransferError(f"{name}: expected an int, got {type(value).__name__}") from None
    if out < minimum:
        raise InvalidTransferError(f"{name}: expected an int >= {minimum}, got {out}")
    return out


def _rank_layers(
    me: int, old3: _Int, new3: _Int, table: _TransferTable, experts: _Int, changed: _Bool
) -> tuple[LayerPlan, ...]:
    num_layers, world, slots = old3.shape
    num_exp = experts.size
    my_old, my_new = old3[:, me], new3[:, me]
    rows = np.arange(num_layers)[:, None]
    my_recv = ~_isin_sorted((rows * num_exp + my_new) * world + me, table.held_keys)

    first_slot = np.full((num_layers, num_exp), slots, dtype=np.int64)
    np.minimum.at(first_slot, (np.broadcast_to(rows, my_old.shape), my_old), np.arange(slots))
    keep = my_old == my_new
    copy = ~keep & ~my_recv
    copy_src = first_slot[rows, my_new]

    mine = table.src == me
    sl, sw, se = table.layer[mine], table.dst[mine], table.expert[mine]
    order = np.lexsort((se, sw, sl))
    sl, sw, se = sl[order], sw[order], se[order]
    send_slot = first_slot[sl, se]
    mine = table.dst == me
    rl, rs, re = table.layer[mine], table.src[mine], table.expert[mine]
    order = np.lexsort((re, rs, rl))
    rl, rs, re = rl[order], rs[order], re[order]

    send_bounds = np.searchsorted(sl, np.arange(num_layers + 1)).tolist()
    recv_bounds = np.searchsorted(rl, np.arange(num_layers + 1)).tolist()
    sends = list(map(Send, sw.tolist(), experts[se].tolist(), send_slot.tolist()))
    recv_src, recv_comp, recv_exp = rs.tolist(), re.tolist(), experts[re].tolist()
    keep_l, copy_l, copy_src_l = keep.tolist(), copy.tolist(), copy_src.tolist()
    new_l, recv_l = my_new.tolist(), my_recv.tolist()
    changed_l = changed.tolist()

    layers = []
    for layer in range(num_layers):
        dst_slots: dict[int, list[int]] = {}
        for s, expert in enumerate(new_l[layer]):
            if recv_l[layer][s]:
                dst_slots.setdefault(expert, []).append(s)
        r0, r1 = recv_bounds[layer], recv_bounds[layer + 1]
        layers.append(
            LayerPlan(
                layer=layer,
                changed=bool(changed_l[layer]),
                keep=tuple(s for s, k in enumerate(keep_l[layer]) if k),
                local_copies=tuple(
                    LocalCopy(copy_src_l[layer][s], s) for s, c in enumerate(copy_l[layer]) if c
                ),
                recvs=tuple(
                    Recv(recv_src[i], recv_exp[i], tuple(dst_slots[recv_comp[i]]))
                    for i in range(r0, r1)
                ),
                sends=tuple(sends[send_bounds[layer] : send_bounds[layer + 1]]),
            )
        )
    return tuple(layers)
