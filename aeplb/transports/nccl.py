"""NCCL through torch.distributed: batch_isend_irecv on the communicator's stream."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _cuda
from .._ops import OpKind, PreparedBatch, group_chunks
from ._cudabase import CudaTransport

# Large p2p groups are known to hang on the GPU; SGLang settled on 32 ops per group.
DEFAULT_MAX_OPS_PER_GROUP = 64


class NCCLTransport(CudaTransport):
    name = "nccl"

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        device: torch.device,
        *,
        max_ops_per_group: int | None = DEFAULT_MAX_OPS_PER_GROUP,
    ) -> None:
        super().__init__(rank, world_size, device)
        self._group = group
        self._global = [dist.get_global_rank(group, r) for r in range(world_size)]
        self._max_ops = max_ops_per_group

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

    def launch(self, batch: PreparedBatch, stream: torch.cuda.Stream) -> None:
        for chunk in group_chunks(batch.ops, self.world_size, self._max_ops):
            p2p = [
                dist.P2POp(
                    dist.isend if op.kind is OpKind.SEND else dist.irecv,
                    op.tensor,
                    self._global[op.peer],
                    self._group,
                )
                for op in chunk
            ]
            for work in dist.batch_isend_irecv(p2p):
                work.wait()  # makes the current stream wait; the host does not block

    def abort(self) -> None:
        try:
            backend = self._group._get_backend(self.device)
            backend.abort()
        except Exception:
            pass
