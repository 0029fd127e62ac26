"""Gloo transport: CPU tensors go straight over torch.distributed's Gloo backend."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist

from .._exceptions import InvalidTransferError
from .._ops import OpKind, PreparedBatch
from ._base import Transport


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


class GlooTransport(Transport):
    name = "gloo"

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size)
        self._group = group
        self._global = [dist.get_global_rank(group, r) for r in range(world_size)]

    def check_tensor(self, tensor: torch.Tensor, verb: str) -> None:
        if tensor.device.type != "cpu":
            raise InvalidTransferError(
                f"{verb}: the gloo backend moves CPU tensors, got one on {tensor.device}; "
                "move it to the CPU or use a CUDA-capable backend"
            )

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        work = dist.all_gather(out, local, group=self._group, async_op=True)
        assert work is not None
        wait_work(work, deadline)
        return torch.stack(out)

    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        for src, dst in batch.copies:
            dst.view(-1).copy_(src.view(-1))
        # A per-peer sequence number as the tag makes Gloo match the i-th send to a peer
        # with that peer's i-th receive, whatever order the transport posts them in.
        seq: defaultdict[tuple[OpKind, int], int] = defaultdict(int)
        works: list[dist.Work] = []
        for op in batch.ops:
            tag = seq[(op.kind, op.peer)]
            seq[(op.kind, op.peer)] += 1
            peer = self._global[op.peer]
            if op.kind is OpKind.SEND:
                work = dist.isend(op.tensor, dst=peer, group=self._group, tag=tag)
            else:
                work = dist.irecv(op.tensor, src=peer, group=self._group, tag=tag)
            assert work is not None
            works.append(work)
        for work in works:
            wait_work(work, deadline)
