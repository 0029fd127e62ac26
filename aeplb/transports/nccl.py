"""NCCL through torch.distributed: batch_isend_irecv on the communicator's stream."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._ops import OpKind
from ._cudabase import CudaTransport
from ._packing import WireOp


class NCCLTransport(CudaTransport):
    name = "nccl"
    posts_on_group = True

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        device: torch.device,
        **options: Any,
    ) -> None:
        super().__init__(rank, world_size, device, **options)
        self._group = group
        self._global = [dist.get_global_rank(group, r) for r in range(world_size)]

    def gather_into(self, mine: torch.Tensor, out: torch.Tensor) -> None:
        dist.all_gather_into_tensor(out, mine, group=self._group)

    def post_group(self, ops: list[WireOp]) -> None:
        p2p = [
            dist.P2POp(
                dist.isend if kind is OpKind.SEND else dist.irecv,
                tensor,
                self._global[peer],
                self._group,
            )
            for kind, tensor, peer in ops
        ]
        for work in dist.batch_isend_irecv(p2p):
            work.wait()  # makes the current stream wait; the host does not block

    def abort(self) -> None:
        try:
            backend = self._group._get_backend(self.device)
            backend.abort()
        except Exception:
            pass
