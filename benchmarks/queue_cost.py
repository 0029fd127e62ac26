"""Host time of queueing one op (``add_send``), on one process, no network.

The communicator sits on a stand-in transport that takes CPU tensors (checked as the gloo
transport checks them) and moves nothing: what is timed is the communicator's own checks
and its op table, which the many-small benchmark pays 2000 times per batch on the caller's
thread.

    python benchmarks/queue_cost.py --ops 2000 --reps 200
"""

from __future__ import annotations

import argparse
import time

import torch

from aeplb._communicator import Communicator
from aeplb._ops import PreparedBatch
from aeplb.transports._base import Transport


class _Nowhere(Transport):
    """Takes CPU tensors as the gloo transport does, moves nothing."""

    name = "nowhere"

    def check_tensor(self, tensor: torch.Tensor, verb: str) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(f"{verb}: CPU tensors only")

    def accepts(self, tensor: torch.Tensor) -> bool:
        return bool(tensor.is_cpu)

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        return local.unsqueeze(0)

    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()
    comm = Communicator(_Nowhere(0, 2), check_peers=False)
    tensors = [torch.empty(64 << 10, dtype=torch.uint8) for _ in range(args.ops)]
    best = float("inf")
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for t in tensors:
            comm.add_send(t, 1)
        best = min(best, time.perf_counter() - t0)
        comm.clear()
    print(f"add_send: {best / args.ops * 1e9:.0f} ns per op (best of {args.reps} x {args.ops})")


if __name__ == "__main__":
    main()
