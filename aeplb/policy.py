"""Expert placement policy: load statistics -> replicated, balanced placement.

Same algorithm as DeepSeek's open-source EPLB (hierarchical when expert groups divide evenly
over nodes, global otherwise), vectorised over layers with numpy.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from aeplb._arrays import int_array
from aeplb._exceptions import InvalidTransferError

__all__ = ["Placement", "rebalance_experts"]

_Int = npt.NDArray[np.int64]
_Float = npt.NDArray[np.float64]
_T = TypeVar("_T")


_LOAD_RULE = "loads must be real, finite and non-negative, and their per-layer sums must be finite"


class Placement(NamedTuple):
    """A placement of logical experts on physical slots (unpacks as a triple)."""

    phy2log: torch.Tensor
    """[L, R] int64: the logical expert held by each physical slot."""
    log2phy: torch.Tensor
    """[L, E, maxcnt] int64: the physical slots of each logical expert, padded with -1."""
    logcnt: torch.Tensor
    """[L, E] int64: the number of physical slots of each logical expert."""


def rebalance_experts(
    load: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    current: Any = None,
) -> Placement:
    """Compute a balanced placement of replicated experts from load statistics.

    Hierarchical when ``num_groups % num_nodes == 0``: expert groups are packed onto nodes,
    each node replicates its hottest experts, then replicas are packed onto the node's GPUs.
    Otherwise a global policy is used (one group, one node), as in DeepSeek's EPLB.

    Args:
        load: [L, E] load per layer and logical expert (tensor or array-like of real
            numbers): finite, non-negative, and each layer's sum finite in float64 (only
            the loads' relative sizes matter, so scale large ones down).
        num_replicas: R, the number of physical slots per layer; a multiple of ``num_gpus``
            and at least E.
        num_groups: number of expert groups (E must be a multiple of it when the policy is
            hierarchical).
        num_nodes: number of nodes; ``num_gpus`` must be a multiple of it.
        num_gpus: number of GPUs; GPU g owns slots [g * R / num_gpus, (g + 1) * R / num_gpus).
        current: optional [L, R] placement now in use. Slots within each GPU are then
            permuted so that as many slots as possible keep their current expert; each
            GPU's set of experts, and so its load, is unchanged.

    Returns:
        A :class:`Placement` ``(phy2log, log2phy, logcnt)`` of CPU int64 tensors.

    Raises:
        InvalidTransferError: if an argument is malformed (a complex, non-numeric or
            non-finite load included, or one whose per-layer sum overflows float64) or the
            sizes are inconsistent.
    """
    weight = _as_load(load)
    num_layers, num_experts = weight.shape
    num_replicas = _positive_int(num_replicas, "num_replicas")
    num_groups = _positive_int(num_groups, "num_groups")
    num_nodes = _positive_int(num_nodes, "num_nodes")
    num_gpus = _positive_int(num_gpus, "num_gpus")
    _check_sizes(num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    _check_sums(weight)
    if num_groups % num_nodes != 0:
        num_groups, num_nodes = 1, 1
    cur = None if current is None else _as_current(current, num_layers, num_replicas, num_experts)

    phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if cur is not None:
        phy2log, phyrank = _align_within_gpus(phy2log, phyrank, cur, num_gpus, num_experts)

    maxcnt = int(logcnt.max())
    log2phy = np.full((num_layers, num_experts * maxcnt), -1, dtype=np.int64)
    rows = np.arange(num_layers)[:, None]
    log2phy[rows, phy2log * maxcnt + phyrank] = np.arange(num_replicas, dtype=np.int64)
    return Placement(
        torch.from_numpy(phy2log),
        torch.from_numpy(log2phy.reshape(num_layers, num_experts, maxcnt)),
        torch.from_numpy(logcnt),
    )


def _as_load(load: Any) -> _Float:
    arr = _real_array(load)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidTransferError(
            f"load: expected a non-empty 2-D [layers, experts] array, got shape {arr.shape}; "
            "reshape it to [layers, experts]"
        )
    if not np.isfinite(arr).all():
        raise InvalidTransferError(
            f"load: contains NaN or infinite values; {_LOAD_RULE}; replace them with finite "
            "non-negative counts"
        )
    if (arr < 0).any():
        raise InvalidTransferError(
            f"load: contains negative values (min {arr.min()}); {_LOAD_RULE}"
        )
    return np.ascontiguousarray(arr)


def _real_array(load: Any) -> _Float:
    """``load`` as float64, refusing what a cast would change or could not read."""
    if isinstance(load, torch.Tensor):
        if load.is_complex():  # the cast would drop the imaginary part with only a warning
            raise _complex_load(str(load.dtype))
        return _read(lambda: load.detach().to("cpu", torch.float64).numpy())
    arr = _read(lambda: np.asarray(load))
    if arr.dtype.kind == "c":
        raise _complex_load(str(arr.dtype))
    if arr.dtype.kind == "O":
        # float() would read "1" as 1.0 and take the real part of a numpy complex scalar.
        for x in arr.flat:
            if isinstance(x, (str, bytes)):
                raise _not_numeric(type(x).__name__)
            if isinstance(x, numbers.Complex) and not isinstance(x, numbers.Real):
                raise _complex_load(type(x).__name__)
    elif arr.dtype.kind not in "biuf":  # strings would parse, dates and timedeltas would cast
        raise _not_numeric(str(arr.dtype))
    with np.errstate(over="ignore"):  # too large for float64 becomes inf, refused below
        return _read(lambda: arr.astype(np.float64, copy=False))


def _complex_load(what: str) -> InvalidTransferError:
    return InvalidTransferError(
        f"load: holds complex values ({what}); {_LOAD_RULE}; pass the real loads "
        "(e.g. .real or abs())"
    )


def _not_numeric(what: str) -> InvalidTransferError:
    return InvalidTransferError(
        f"load: holds non-numeric values ({what}); {_LOAD_RULE}; pass a 2-D tensor or "
        "array of real numbers"
    )


def _read(convert: Callable[[], _T]) -> _T:
    try:
        return convert()
    except OverflowError as exc:  # a Python int beyond float64
        raise InvalidTransferError(
            f"load: holds a value too large for float64 ({exc}); {_LOAD_RULE}; scale them down "
            "(e.g. divide by their maximum)"
        ) from exc
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise InvalidTransferError(
            f"load: cannot be read as a real [layers, experts] array ({exc}); {_LOAD_RULE}; "
            "pass a 2-D tensor or array of real numbers"
        ) from exc


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise InvalidTransferError(f"{name}: expected a positive int, got a bool")
    try:
        out = operator.index(value)
    except TypeError:
        raise InvalidTransferError(
            f"{name}: expected a positive int, got {type(value).__name__}"
        ) from None
    if out < 1:
        raise InvalidTransferError(f"{name}: expected a positive int, got {out}")
    return out


def _check_sizes(
    num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> None:
    if num_replicas < num_experts:
        raise InvalidTransferError(
            f"num_replicas: {num_replicas} is smaller than the {num_experts} logical experts; "
            "every expert needs at least one slot, so pass num_replicas >= experts"
        )
    if num_replicas % num_gpus != 0:
        raise InvalidTransferError(
            f"num_replicas: {num_replicas} is not a multiple of num_gpus={num_gpus}; "
            "every GPU must hold the same number of slots"
        )
    if num_gpus % num_nodes != 0:
        raise InvalidTransferError(
            f"num_gpus: {num_gpus} is not a multiple of num_nodes={num_nodes}; "
            "every node must hold the same number of GPUs"
        )
    if num_groups % num_nodes == 0 and num_experts % num_groups != 0:
        raise InvalidTransferError(
            f"num_groups: the {num_experts} experts do not split into {num_groups} equal "
            "groups; pass a num_groups that divides the expert count"
        )


def _check_sums(weight: _Float) -> None:
    # Every sum the policy forms (a group's load, the load packed onto a node or a GPU) adds
    # part of one layer's loads or of their per-replica shares, so it is at most the layer's
    # total, up to rounding. Packs that overflow weigh inf like full ones, and the greedy
    # packing then puts items into full packs (IndexError): a finite total rules that out.
    with np.errstate(over="ignore"):
        totals = weight.sum(axis=1)
    bad = np.flatnonzero(~np.isfinite(totals))
    if bad.size:
        raise InvalidTransferError(
            f"load: layer {int(bad[0])}'s loads sum to more than the float64 maximum; "
            f"{_LOAD_RULE}; scale them down (e.g. divide by their maximum)"
        )


def _as_current(current: Any, num_layers: int, num_replicas: int, num_experts: int) -> _Int:
    arr = int_array(current, "current")
    if arr.shape != (num_layers, num_replicas):
        raise InvalidTransferError(
            f"current: expected shape ({num_layers}, {num_replicas}) [layers, num_replicas], "
            f"got {arr.shape}"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= num_experts):
        raise InvalidTransferError(
            f"current: expert ids must lie in [0, {num_experts}), got values in "
            f"[{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64, copy=False)


def _balanced_packing(weight: _Float, num_packs: int) -> tuple[_Int, _Int]:
    """Greedy packing of n items per row into packs of exactly n / num_packs items.

    Items go, heaviest first, to the lightest pack that still has room (lowest index on
    ties); each step is vectorised over rows. Returns (pack index, rank within pack).
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        pack = np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n)).copy()
        return pack, np.zeros((rows, n), dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    sorted_weight = np.ascontiguousarray(np.take_along_axis(weight, order, axis=1).T)
    base = np.arange(rows, dtype=np.int64) * num_packs
    pack_weight = np.zeros((rows, num_packs))
    flat_weight = pack_weight.reshape(-1)
    flat_count = np.zeros(rows * num_packs, dtype=np.int64)
    # A pack that becomes full gets +inf weight, so argmin skips it without a mask.
    full_penalty = np.zeros(per_pack + 1)
    full_penalty[per_pack] = np.inf
    chosen = np.empty((n, rows), dtype=np.int64)
    ranks = np.empty((n, rows), dtype=np.int64)
    count = np.empty(rows, dtype=np.int64)
    # Per-step work is a handful of flat take/put calls: this loop is the policy's hot path.
    for j in range(n):
        flat = np.add(base, pack_weight.argmin(axis=1), out=chosen[j])
        rank = flat_count.take(flat, out=ranks[j])
        np.add(rank, 1, out=count)
        flat_count.put(flat, count)
        flat_weight.put(flat, flat_weight.take(flat) + sorted_weight[j] + full_penalty.take(count))
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    np.put_along_axis(pack_index, order, (chosen - base).T, axis=1)
    np.put_along_axis(rank_in_pack, order, ranks.T, axis=1)
    return pack_index, rank_in_pack


def _replicate(weight: _Float, num_phy: int) -> tuple[_Int, _Int, _Int]:
    """Add replicas one at a time to the expert with the highest load per replica.

    Returns (phy2log, replica rank, logcnt) per row.
    """
    rows, num_log = weight.shape
    ridx = np.arange(rows)
    phy2log = np.empty((rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    per_replica = weight.copy()
    for i in range(num_log, num_phy):
        hot = per_replica.argmax(axis=1)
        cnt = logcnt[ridx, hot]
        phy2log[:, i] = hot
        rank[:, i] = cnt
        logcnt[ridx, hot] = cnt + 1
        per_replica[ridx, hot] = weight[ridx, hot] / (cnt + 1)
    return phy2log, rank, logcnt


def _inverse(perm: _Int) -> _Int:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=np.int64)[None, :], axis=1)
    return inv


def _hierarchical(
    weight: _Float, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[_Int, _Int, _Int]:
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # Step 1: groups -> nodes. "mlog" numbers experts node by node, so that each node's
    # experts form one contiguous block of log_per_node ids.
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=-1)
    group_pack, group_rank = _balanced_packing(group_load, num_nodes)
    group_base = (group_pack * groups_per_node + group_rank) * group_size
    log2mlog = (group_base[:, :, None] + np.arange(group_size)).reshape(num_layers, num_log)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicas within each node; rows are (layer, node).
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, log_per_node)
    phy2mlog, phyrank, mlogcnt = _replicate(mlog_load, num_phy // num_nodes)

    # Step 3: a node's replicas -> its GPUs, equal counts per GPU.
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    gpu, rank_in_gpu = _balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * phy_per_gpu + rank_in_gpu)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(num_layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * log_per_node)[:, None]).reshape(
        num_layers, num_phy
    )
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, num_phy)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, num_log), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def _occurrence(keys: _Int) -> _Int:
    """For each element, how many equal keys precede it (in array order)."""
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    idx = np.arange(keys.size, dtype=np.int64)
    starts = np.ones(keys.size, dtype=bool)
    starts[1:] = ks[1:] != ks[:-1]
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    occ = np.empty_like(idx)
    occ[order] = idx - first
    return occ


def _align_within_gpus(
    phy2log: _Int, phyrank: _Int, current: _Int, num_gpus: int, num_experts: int
) -> tuple[_Int, _Int]:
    """Permute slots within each GPU so the most slots keep their ``current`` expert.

    Per (layer, GPU) and expert e with n_e new and c_e current copies, min(n_e, c_e) copies
    can stay put, which is the maximum; the k-th new copy of e is matched with the k-th slot
    currently holding e, and unmatched copies fill the remaining slots in order.
    """
    num_layers, num_phy = phy2log.shape
    slot_gpu = np.arange(num_phy) // (num_phy // num_gpus)
    gpu_id = (np.arange(num_layers)[:, None] * num_gpus + slot_gpu).ravel()
    new_flat = phy2log.ravel()
    key_new = gpu_id * num_experts + new_flat
    key_cur = gpu_id * num_experts + current.ravel()
    code_new = key_new * num_phy + _occurrence(key_new)
    code_cur = key_cur * num_phy + _occurrence(key_cur)

    cur_order = np.argsort(code_cur)
    cur_sorted = code_cur[cur_order]
    pos = np.minimum(np.searchsorted(cur_sorted, code_new), cur_sorted.size - 1)
    matched = cur_sorted[pos] == code_new

    target = np.empty_like(new_flat)
    target[matched] = cur_order[pos[matched]]
    taken = np.zeros(new_flat.size, dtype=bool)
    taken[target[matched]] = True
    # Flat order groups slots by (layer, GPU), and each GPU has as many unmatched copies as
    # free slots, so pairing the two in order never crosses a GPU boundary.
    target[~matched] = np.flatnonzero(~taken)

    out_log = np.empty_like(new_flat)
    out_rank = np.empty_like(new_flat)
    out_log[target] = new_flat
    out_rank[target] = phyrank.ravel()
    return out_log.reshape(phy2log.shape), out_rank.reshape(phy2log.shape)
