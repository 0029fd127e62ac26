from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import torch

from ._exceptions import PeerMismatchError
from ._ops import Op, OpKind

# Columns of one manifest row (one row per peer).
_SEND, _RECV = 0, 3  # each: count, bytes, digest
_STATUS = 6
_COLS = 7

OK, REJECTED = 0, 1


def _digest(ops: list[Op]) -> int:
    h = hashlib.blake2b(digest_size=8)
    for op in ops:
        h.update(str(op.tensor.dtype).encode())
        h.update(struct.pack("<q", op.tensor.numel()))
    return int.from_bytes(h.digest(), "little", signed=True)


def build(ops: list[Op], world_size: int, status: int = OK) -> torch.Tensor:
    """This rank's manifest: per peer, what it will send there and receive from there."""
    rows = torch.zeros(world_size, _COLS, dtype=torch.int64)
    rows[:, _STATUS] = status
    for peer in range(world_size):
        for kind, col in ((OpKind.SEND, _SEND), (OpKind.RECV, _RECV)):
            mine = [op for op in ops if op.kind is kind and op.peer == peer]
            if mine:
                rows[peer, col] = len(mine)
                rows[peer, col + 1] = sum(op.nbytes for op in mine)
                rows[peer, col + 2] = _digest(mine)
    return rows


def check(
    local: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor], rank: int
) -> None:
    """Exchanges manifests and raises PeerMismatchError, identically on every rank.

    Every rank checks every pair, so all ranks agree and raise together, before any data
    moves; the communicator stays usable.
    """
    table = all_gather(local)  # [world (who), world (peer), cols]
    world = table.shape[0]
    rejected = [r for r in range(world) if int(table[r, 0, _STATUS]) != OK]
    if rejected:
        raise PeerMismatchError(
            f"rank(s) {rejected} rejected their batch as invalid (see the error raised there); "
            "no data moved on any rank. Fix the op lists and execute again."
        )
    problems: list[str] = []
    for a in range(world):
        for b in range(world):
            if a == b:
                continue
            sent = table[a, b, _SEND : _SEND + 3].tolist()
            expected = table[b, a, _RECV : _RECV + 3].tolist()
            if sent == expected:
                continue
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
