"""The GPU timeline of one EPLB batch: which copies and kernels ran on which stream, when.

Two ranks (one per GPU) exchange the EPLB batch of ``python -m aeplb.bench`` with the given
backend; after a warm-up, one batch runs under the PyTorch profiler. Rank 0 prints each
kernel and memcpy (stream, start and length in microseconds from the first), then the busy
time per stream, and writes the Chrome trace if asked.

    NCCL_NVLS_ENABLE=0 python benchmarks/trace_batch.py --backend nccl --trace nccl.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import aeplb
from aeplb.bench._driver import variants
from aeplb.bench._pair import Pair
from aeplb.bench._spawn import Meeting, enough_gpus, init_rank, run_ranks
from aeplb.bench._workloads import eplb


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="nccl", help="backend[:option=value...]")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--trace", default="", help="write rank 0's Chrome trace here")
    p.add_argument(
        "--pack",
        choices=["default", "memcpy", "kernel"],
        default="default",
        help="nccl packing: a byte view and a memcpy per tensor, or batched kernels on "
        "the tensors as they are (the default switches at aeplb's threshold)",
    )
    p.add_argument("--reps", type=int, default=10, help="batches timed after the trace")
    return p.parse_args()


def _rank(rank: int, world: int, meeting: Meeting, args: argparse.Namespace, out: Any) -> None:
    init_rank(rank, world, meeting, cpu=False, timeout=timedelta(seconds=120))
    prof, ok = asyncio.run(_batch(rank, args))
    dist.destroy_process_group()
    if rank != 0:
        return
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as g:
            trace = json.load(g)
    if args.trace:
        with open(args.trace, "w") as f2:
            json.dump(trace, f2)
    events = [
        e
        for e in trace.get("traceEvents", [])
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
    ]
    out.put((events, ok))


async def _batch(rank: int, args: argparse.Namespace) -> tuple[profile, bool]:
    """Warms up, then runs one batch under the profiler; returns it and the data check."""
    device = torch.device("cuda", rank)
    _, name, options = variants(args.backend)[0]
    if args.pack != "default":  # an experiment's switch: the packer's private threshold
        from aeplb.transports import _streams

        _streams.FEW = 0 if args.pack == "kernel" else 1 << 30
    comm = aeplb.create_communicator(name, device=device, timeout=60, **options)
    pair = Pair(rank, eplb(args.experts, 1), device, comm)
    for _ in range(3):
        await pair.once()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        await pair.once()
        torch.cuda.synchronize()
    times = []
    for _ in range(args.reps):
        torch.cuda.synchronize()
        dist.barrier(device_ids=[rank])
        t0 = time.perf_counter()
        await pair.once()
        times.append(time.perf_counter() - t0)
    print(f"rank {rank}: median batch {statistics.median(times) * 1e3:.2f} ms", flush=True)
    await comm.aclose()
    return prof, pair.received_all()


def main() -> int:
    args = parse_args()
    if not enough_gpus(2):
        return 2
    got = run_ranks(_rank, 2, args)
    if got is None:
        return 1
    events, ok = got
    if not events:
        print("no GPU activity recorded")
        return 1
    t0 = min(float(e["ts"]) for e in events)
    busy: dict[str, float] = defaultdict(float)
    end = 0.0
    for e in sorted(events, key=lambda e: float(e["ts"])):
        start, dur = float(e["ts"]) - t0, float(e["dur"])
        stream = str(e.get("args", {}).get("stream", e.get("tid")))
        busy[stream] += dur
        end = max(end, start + dur)
        print(f"stream {stream:>4}  {start:9.1f} us  {dur:8.1f} us  {e['name'][:70]}")
    print(f"span {end:.1f} us; busy per stream (us): {dict(busy)}; data verified: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
