from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable

import numpy as np
import torch

from ._exceptions import PeerMismatchError
from ._ops import Op, OpKind

# Columns of one manifest row (one row per peer).
_SEND, _RECV = 0, 3  # each: count, bytes, digest
_STATUS = 6
_COLS = 7

OK, REJECTED = 0, 1


_DTYPE_CODES: dict[torch.dtype, int] = {}


def _dtype_code(dtype: torch.dtype) -> int:
    code = _DTYPE_CODES.get(dtype)
    if code is None:  # the same on every rank: a hash of the dtype's name
        code = _DTYPE_CODES[dtype] = zlib.crc32(str(dtype).encode())
    return code


def build(ops: list[Op], world_size: int, status: int = OK) -> torch.Tensor:
    """This rank's manifest: per peer, what it will send there and receive from there."""
    shapes: dict[tuple[int, int], list[int]] = {}  # (column, peer) -> dtype, numel, ...
    nbytes: dict[tuple[int, int], int] = {}
    for op in ops:
        t = op.tensor
        key = (_SEND if op.kind is OpKind.SEND else _RECV, op.peer)
        numel = t.numel()
        found = shapes.get(key)
        if found is None:
            found = shapes[key] = []
            nbytes[key] = 0
        found.append(_dtype_code(t.dtype))
        found.append(numel)
        nbytes[key] += numel * t.element_size()
    rows = np.zeros((world_size, _COLS), dtype=np.int64)
    rows[:, _STATUS] = status
    for key, found in shapes.items():
        col, peer = key
        digest = hashlib.blake2b(np.array(found, dtype=np.int64).tobytes(), digest_size=8)
        rows[peer, col] = len(found) // 2
        rows[peer, col + 1] = nbytes[key]
        rows[peer, col + 2] = int.from_bytes(digest.digest(), "little", signed=True)
    return torch.from_numpy(rows)


def check(
    local: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor], rank: int
) -> None:
    """Exchanges manifests and raises PeerMismatchError, identically on every rank.

    Every rank checks every pair, so all ranks agree and raise together, before any data
    moves; the communicator stays usable.
    """
    rows = all_gather(local).numpy()  # [world (who), world (peer), cols]
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
