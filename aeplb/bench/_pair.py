"""Two ranks exchanging one workload each way: what the benchmark scripts trace or profile."""

from __future__ import annotations

import torch

import aeplb

from ._workloads import Workload, fill


class Pair:
    """This rank's half of the exchange: random payloads out, buffers in, and the check."""

    def __init__(
        self, rank: int, w: Workload, device: torch.device, comm: aeplb.Communicator
    ) -> None:
        self.peer = 1 - rank
        self.comm = comm
        self._w, self._device = w, device
        self.sends = [fill(s, w.dtype, device, 1000 * rank + i) for i, s in enumerate(w.shapes)]
        self.recvs = [torch.empty(s, dtype=w.dtype, device=device) for s in w.shapes]

    async def once(self) -> None:
        """Queues every tensor each way and runs them as one batch."""
        for t in self.sends:
            self.comm.add_send(t, self.peer)
        for t in self.recvs:
            self.comm.add_recv(t, self.peer)
        await self.comm.execute()

    def received_all(self) -> bool:
        """Whether every buffer holds what the peer sent, byte for byte."""
        w, seed = self._w, 1000 * self.peer
        want = [fill(s, w.dtype, self._device, seed + i) for i, s in enumerate(w.shapes)]
        return all(
            torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
            for a, b in zip(self.recvs, want, strict=True)
        )
