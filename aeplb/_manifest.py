from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch

from ._exceptions import PeerMismatchError
from ._ops import DTYPE, IS_RECV, NBYTES, NUMEL, PEER

# Columns of one manifest row (one row per peer).
_SEND, _RECV = 0, 3  # each: count, bytes, digest
_STATUS = 6
_COLS = 7

OK, REJECTED = 0, 1


def build(table: np.ndarray, world_size: int, status: int = OK) -> torch.Tensor:
    """This rank's manifest, from its op table: per peer, what it sends and receives there."""
    rows = np.zeros((world_size, _COLS), dtype=np.int64)
    rows[:, _STATUS] = status
    if len(table):
        # ops grouped by (peer, direction), queue order kept within each group
        key = table[:, PEER] * 2 + table[:, IS_RECV]
        if not (key[1:] >= key[:-1]).all():  # usually they were queued group by group
            order = np.argsort(key, kind="stable")
            key, table = key[order], table[order]
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        counts = np.diff(np.append(starts, len(key)))
        keys = key[starts]
        shapes = table[:, DTYPE : NUMEL + 1]  # dtype, numel per op: what the digest covers
        nbytes = np.add.reduceat(table[:, NBYTES], starts)
        for k, start, count, total in zip(
            keys.tolist(), starts.tolist(), counts.tolist(), nbytes.tolist(), strict=True
        ):
            peer, is_recv = divmod(k, 2)
            col = _RECV if is_recv else _SEND
            digest = hashlib.blake2b(shapes[start : start + count].tobytes(), digest_size=8)
            rows[peer, col] = count
            rows[peer, col + 1] = total
            rows[peer, col + 2] = int.from_bytes(digest.digest(), "little", signed=True)
    return torch.from_numpy(rows)


def check(
    local: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor], rank: int
) -> None:
    """Exchanges manifests and raises PeerMismatchError, identically on every rank.

    Every rank checks every pair, so all ranks agree and raise together, before any data
    moves; the communicator stays usable.
    """
    check_rows(all_gather(local).numpy(), rank)


def check_rows(rows: np.ndarray, rank: int) -> None:
    """:func:`check` on manifests already gathered: [world (who), world (peer), cols]."""
    rejected = [r for r in range(rows.shape[0]) if int(rows[r, 0, _STATUS]) != OK]
    if rejected:
        raise PeerMismatchError(
            f"rank(s) {rejected} rejected their batch as invalid (see the error raised there); "
            "no data moved on any rank. Fix the op lists and execute again."
        )
    sent_all = rows[:, :, _SEND : _SEND + 3]  # [a, b]: what a sends to b
    expected_all = rows[:, :, _RECV : _RECV + 3].transpose(1, 0, 2)  # [a, b]: b expects from a
    bad = (sent_all != expected_all).any(axis=-1)
    np.fill_diagonal(bad, False)
    problems: list[str] = []
    for a, b in zip(*np.nonzero(bad), strict=True):
        sent = sent_all[a, b].tolist()
        expected = expected_all[a, b].tolist()
        if sent[:2] == expected[:2]:
            detail = "the same count and bytes, but dtypes or element counts differ in order"
        else:
            detail = f"rank {b} expects {expected[0]} tensor(s) ({expected[1]} bytes)"
        problems.append(
            f"rank {a} sends {sent[0]} tensor(s) ({sent[1]} bytes) to rank {b}; {detail}"
        )
    if problems:
        shown = "; ".join(problems[:8])
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise PeerMismatchError(
            f"send/recv lists do not pair up across ranks (seen on rank {rank}): {shown}{more}. "
            "No data moved. Each add_send(t, dst) needs a matching add_recv on dst, queued "
            "in the same order with the same dtype and element count."
        )
