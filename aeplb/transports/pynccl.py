"""NCCL through aeplb's own libnccl binding: one NCCL communicator per aeplb communicator.

Independent of torch.distributed's NCCL backend (only the unique id travels over the
process group), so its kernels never share a communicator with the model's collectives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .._exceptions import BackendUnavailableError
from .._ops import OpKind
from . import _libnccl
from ._cudabase import CudaTransport
from ._packing import WireOp


class PyNCCLTransport(CudaTransport):
    name = "pynccl"

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        world_size: int,
        device: torch.device,
        *,
        library: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(rank, world_size, device, **options)
        self._lib = _libnccl.NCCLLibrary(library)
        uid = [self._lib.get_unique_id().to_bytes() if rank == 0 else None]
        nccl_only = "gloo" not in str(dist.get_backend(group)).lower()
        dist.broadcast_object_list(
            uid,
            src=dist.get_global_rank(group, 0),
            group=group,
            device=device if nccl_only else None,
        )
        if not isinstance(uid[0], bytes):
            raise BackendUnavailableError("pynccl: the NCCL unique id did not arrive from rank 0")
        with torch.cuda.device(device):
            self._comm = _libnccl.NCCLComm.init(self._lib, uid[0], world_size, rank)

    def gather_into(self, mine: torch.Tensor, out: torch.Tensor) -> None:
        # An all-gather from point-to-point ops: the binding covers send and recv only.
        out[self.rank].copy_(mine)
        handle = torch.cuda.current_stream(self.device).cuda_stream
        nbytes = mine.numel() * mine.element_size()
        u8 = _libnccl.DataType.UINT8
        self._lib.group_start()
        try:
            for peer in range(self.world_size):
                if peer != self.rank:
                    self._comm.send(mine.data_ptr(), nbytes, u8, peer, handle)
                    self._comm.recv(out[peer].data_ptr(), nbytes, u8, peer, handle)
        finally:
            self._lib.group_end()

    def post_group(self, ops: list[WireOp]) -> None:
        handle = torch.cuda.current_stream(self.device).cuda_stream
        u8 = _libnccl.DataType.UINT8
        self._lib.group_start()
        try:
            for kind, t, peer in ops:
                count = t.numel() * t.element_size()
                if kind is OpKind.SEND:
                    self._comm.send(t.data_ptr(), count, u8, peer, handle)
                else:
                    self._comm.recv(t.data_ptr(), count, u8, peer, handle)
        finally:
            self._lib.group_end()

    def abort(self) -> None:
        try:
            self._comm.abort()
        except Exception:
            pass

    def close(self) -> None:
        if not self._comm.closed:
            self.enter_thread()
            torch.cuda.current_stream(self.device).synchronize()
            self._comm.destroy()
