"""Where a batch's host time goes: cProfile of the worker thread or of the caller's.

Two ranks exchange a bench workload (``eplb`` or ``many-small``) with the given backend.
After a warm-up, rank 0 profiles ``--reps`` batches on one thread: the communicator's worker
(default) or the calling thread (queueing and ``execute()``); Python 3.12 allows one
profiler per process. It prints the functions with the most time of their own. cProfile
slows Python calls down, so the absolute times are inflated; the ranking is what to read.

    NCCL_NVLS_ENABLE=0 python benchmarks/host_profile.py --backend nccl --workload many-small
    python benchmarks/host_profile.py --cpu --backend gloo --workload many-small
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys

import aeplb
from aeplb.bench._driver import variants
from aeplb.bench._pair import Pair
from aeplb.bench._spawn import enough_gpus, rank_device, run_pair
from aeplb.bench._workloads import eplb, many_small


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="ipc", help="backend[:option=value...]")
    p.add_argument("--workload", choices=["eplb", "many-small"], default="many-small")
    p.add_argument("--cpu", action="store_true", help="CPU ranks over Gloo")
    p.add_argument("--thread", choices=["worker", "caller"], default="worker")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--top", type=int, default=25, help="functions printed per thread")
    return p.parse_args()


def _stats(prof: cProfile.Profile, top: int) -> str:
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


async def _profile(rank: int, args: argparse.Namespace) -> str:
    device = rank_device(rank, args.cpu)
    _, name, options = variants(args.backend)[0]
    comm = aeplb.create_communicator(name, device=device, timeout=60, **options)
    pair = Pair(rank, eplb(16, 1) if args.workload == "eplb" else many_small(), device, comm)
    for _ in range(3):
        await pair.once()
    prof = cProfile.Profile()
    on_worker = args.thread == "worker"
    if on_worker:
        comm._worker.submit(prof.enable).wait()  # profiles the thread it is enabled on
    else:
        prof.enable()
    for _ in range(args.reps):
        await pair.once()
    if on_worker:
        comm._worker.submit(prof.disable).wait()
    else:
        prof.disable()
    await comm.aclose()
    ok = pair.received_all()
    return (
        f"{args.backend} {args.workload}, {args.reps} batches, {args.thread} thread, "
        f"data verified: {ok}\n{_stats(prof, args.top)}"
    )


def main() -> int:
    args = parse_args()
    if not enough_gpus(1, args.cpu):
        return 2
    report = run_pair(_profile, args)
    if report is None:
        return 1
    print(report)
    return 0 if "data verified: True" in report else 1


if __name__ == "__main__":
    sys.exit(main())
