"""NCCL through torch.distributed: batch_isend_irecv on the communicator's stream."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .. import _cuda
from .._ops import OpKind
from ._cudabase import CudaTransport
from ._packing import WireOp


class NCCLTransport(CudaTransport):
    name = "nccl"

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

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        self.enter_thread()
        stream = self.stream()
        with torch.cuda.stream(stream):
            src = local.to(self.device, non_blocking=True)
            out = torch.empty(
                (self.world_size, *local.shape), dtype=local.dtype, device=self.device
            )
            dist.all_gather_into_tensor(out, src, group=self._group)
            host = out.to("cpu", non_blocking=True)
            done = _cuda.new_event()
            done.record(stream)
        _cuda.wait_event(done, deadline)
        return host

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
