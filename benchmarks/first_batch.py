"""What a new communicator's first batches cost, per backend.

Two ranks create a communicator, then exchange a bench workload several times; rank 0
prints, for each backend, how long ``create_communicator`` took and each of the first
batches. A backend that sets up connections lazily pays for them in its first batch, which
a server sees as one slow rebalance, or as a missed deadline when ``timeout`` is short.

    NCCL_NVLS_ENABLE=0 python benchmarks/first_batch.py --backends ipc,nccl,pynccl,gloo
    python benchmarks/first_batch.py --cpu --backends gloo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch.distributed as dist

import aeplb
from aeplb.bench._driver import variants
from aeplb.bench._pair import Pair
from aeplb.bench._spawn import enough_gpus, rank_device, run_pair
from aeplb.bench._workloads import eplb, many_small


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="ipc,nccl,pynccl,gloo", help="backend[:opt=v],...")
    p.add_argument("--workload", choices=["eplb", "many-small"], default="eplb")
    p.add_argument("--cpu", action="store_true", help="CPU ranks over Gloo")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--json", help="write the figures here")
    return p.parse_args()


async def _measure(rank: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    device = rank_device(rank, args.cpu)
    rows = []
    for spec, name, options in variants(args.backends):
        dist.barrier()
        t0 = time.perf_counter()
        comm = aeplb.create_communicator(name, device=device, timeout=60, **options)
        created = time.perf_counter() - t0
        pair = Pair(rank, eplb(16, 1) if args.workload == "eplb" else many_small(), device, comm)
        batches = []
        for _ in range(args.batches):
            dist.barrier()
            t0 = time.perf_counter()
            await pair.once()
            batches.append(time.perf_counter() - t0)
        ok = pair.received_all()
        await comm.aclose()
        rows.append(
            {
                "backend": spec,
                "workload": args.workload,
                "create_ms": created * 1e3,
                "batches_ms": [b * 1e3 for b in batches],
                "verified": ok,
            }
        )
    return rows


def main() -> int:
    args = parse_args()
    if not enough_gpus(1, args.cpu):
        return 2
    rows = run_pair(_measure, args)
    if rows is None:
        return 1
    for r in rows:
        first = ", ".join(f"{b:.1f}" for b in r["batches_ms"])
        print(
            f"{r['backend']:<24} create {r['create_ms']:8.1f} ms   batches {first} ms   "
            f"verified {r['verified']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
