"""The rank side of the benchmark: spawned per rank, so it must live in an importable module."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from datetime import timedelta
from typing import Any

import anyio
import torch.distributed as dist

import aeplb

from . import _workloads as wl
from ._rank import Bench, Row
from ._spawn import Meeting, init_rank, rank_device, shares_gpus

GPU_BACKENDS = "ipc,nccl,pynccl,gloo"
CPU_BACKENDS = "gloo"


def variants(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for spec in text.split(","):
        name, *opts = spec.strip().split(":")
        options: dict[str, Any] = {}
        for o in opts:
            key, value = o.split("=", 1)
            options[key] = int(value) if value.lstrip("-").isdigit() else value
            if key in ("coalesce", "check_peers", "warm_up"):
                options[key] = bool(int(value))
        out.append((spec.strip(), name, options))
    return out


def workload_list(args: argparse.Namespace, peers: int) -> list[wl.Workload]:
    out: list[wl.Workload] = []
    for name in args.workloads.split(","):
        if name == "eplb":
            out.append(wl.eplb(args.experts * peers, peers))
        elif name == "interference":
            out.append(dataclasses.replace(wl.eplb(args.experts * peers, peers), name=name))
        elif name == "many-small":
            out.append(wl.many_small())
        elif name == "sweep":
            default = "1,4,16,64" if args.cpu else "4,16,64,256,512,2048"
            out.extend(wl.sweep([int(x) for x in (args.sweep_mb or default).split(",")]))
        else:
            raise SystemExit(f"unknown workload {name!r}")
    return out


async def _rank_main(rank: int, world: int, args: argparse.Namespace) -> list[Row]:
    device = rank_device(rank, args.cpu)
    # NCCL pairs no two ranks on one GPU: with more ranks than GPUs, no NCCL rows
    nccl_rows = args.cpu or not shares_gpus(world)
    bench = Bench(rank, world, device, args.reps, args.warmup)
    backends = variants(args.backends or (CPU_BACKENDS if args.cpu else GPU_BACKENDS))
    rows: list[Row] = []
    stop = anyio.Event()
    if args.gc_freeze:
        # What a tuned server does once it has started: later full collections then scan
        # only newer objects, so they stop the event loop for far less time.
        gc.collect()
        gc.freeze()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval / 1e3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bench.ticker.run, stop)
        bench.ticker.begin()
        await anyio.sleep(0.5)
        idle = bench.ticker.end()
        rows.append(
            {
                "workload": "idle",
                "variant": "ticker",
                "max_stall_ms": idle[0],
                "p99_stall_ms": idle[1],
            }
        )
        for w in workload_list(args, world - 1):
            if w.name == "interference":
                if bench.cuda:
                    bench.progress("interference: matmul alone and during transfers")
                    rows.extend(await bench.interference(w, backends))
                continue
            sweep = w.name.startswith("sweep")
            if nccl_rows:
                bench.progress(f"{w.name}: raw")
                rows.append(await bench.raw(w))
            if nccl_rows and not args.no_baselines and not sweep:
                bench.progress(f"{w.name}: synchronous per-tensor baseline")
                many = len(w.shapes) > 100
                rows.append(await bench.reference(w, staged=False, max_ops=32 if many else None))
                if bench.cuda and any(b == "gloo" for _, b, _ in backends):
                    rows.append(await bench.reference(w, staged=True, max_ops=None))
            for label, backend, options in backends:
                if backend == "gloo" and bench.cuda and sweep and w.bytes_per_peer > 512 << 20:
                    continue  # seconds per repetition; the staged curve is flat by then
                if not nccl_rows and backend in ("nccl", "pynccl"):
                    continue
                bench.progress(f"{w.name}: {label}")
                try:
                    rows.append(await bench.ours(w, label, backend, options))
                except aeplb.AEPLBError as exc:  # report it and go on with the other variants
                    rows.append(
                        {
                            "workload": w.name,
                            "variant": label,
                            "error": repr(exc),
                            "max_stall_ms": 0.0,
                            "p99_stall_ms": 0.0,
                        }
                    )
        stop.set()
    return rows


def entry(rank: int, world: int, meeting: Meeting, args: argparse.Namespace, out: Any) -> None:
    init_rank(rank, world, meeting, cpu=args.cpu, timeout=timedelta(minutes=5))
    rows = anyio.run(_rank_main, rank, world, args)
    gathered: list[Any] = [None] * world if rank == 0 else []
    group = dist.new_group(backend="gloo")
    dist.gather_object(rows, gathered if rank == 0 else None, dst=0, group=group)
    if rank == 0:
        out.put(gathered)
    dist.destroy_process_group()
