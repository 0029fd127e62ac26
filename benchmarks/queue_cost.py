"""Host time of queueing one op (``add_send``/``add_recv``), on one process, no network.

The communicator sits on a stand-in transport that takes tensors of one device (checked as
the gloo transport checks CPU tensors and the CUDA transports CUDA ones) and moves nothing:
what is timed is the communicator's own checks and its op table, which the many-small
benchmark pays 2000 times per batch on the caller's thread. Best and median of the
repetitions: the median shows what a batch usually pays.

    python benchmarks/queue_cost.py --ops 2000 --reps 200 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aeplb._communicator import Communicator
from aeplb._ops import PreparedBatch
from aeplb.transports._base import Transport


class _Nowhere(Transport):
    """Takes CPU tensors as the gloo transport does, moves nothing."""

    name = "nowhere"

    def __init__(self, device: torch.device) -> None:
        super().__init__(0, 2)
        self.device = device

    def check_tensor(self, tensor: torch.Tensor, verb: str) -> None:
        if tensor.device != self.device:
            raise ValueError(f"{verb}: {self.device} tensors only")

    def accepts(self, tensor: torch.Tensor) -> bool:
        if self.device.type == "cpu":
            return bool(tensor.is_cpu)
        return tensor.is_cuda and tensor.get_device() == self.device.index

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        return local.unsqueeze(0)

    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=2000, help="half sends, half receives")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    comm = Communicator(_Nowhere(device), check_peers=False)
    half = args.ops // 2
    sends = [torch.empty(64 << 10, dtype=torch.uint8, device=device) for _ in range(half)]
    recvs = [torch.empty(64 << 10, dtype=torch.uint8, device=device) for _ in range(half)]
    took = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for t in sends:
            comm.add_send(t, 1)
        for t in recvs:
            comm.add_recv(t, 1)
        took.append(time.perf_counter() - t0)
        comm.clear()
    per_op = [t / (2 * half) * 1e9 for t in took]
    print(
        f"{device} add_send/add_recv: {min(per_op):.0f} ns per op best, "
        f"{statistics.median(per_op):.0f} median ({args.reps} x {2 * half} ops)"
    )


if __name__ == "__main__":
    main()
