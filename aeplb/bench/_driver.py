"""What the benchmark runs (decided once, in the parent) and the rank side that runs it:
spawned per rank, so it must live in an importable module."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import sys
from datetime import timedelta
from typing import Any

import anyio
import torch.distributed as dist

import aeplb

from . import _workloads as wl
from ._rank import Bench, Row
from ._spawn import Meeting, init_rank, rank_device

GPU_BACKENDS = "ipc,nccl,pynccl,gloo"
CPU_BACKENDS = "gloo"
# Backends that need an NCCL communicator between the ranks. ipc (and auto, which picks it
# where IPC works) uses NCCL only for ranks on other nodes, and the bench spawns on one.
NCCL_BACKENDS = frozenset({"nccl", "pynccl"})
# Past this, gloo on GPUs takes seconds per repetition and its staged curve is flat anyway.
GLOO_SWEEP_MAX_BYTES = 512 << 20

Variant = tuple[str, str, dict[str, Any]]  # as given, backend, options
LeftOut = dict[str, str]  # workload, variant ("" for all of it), reason


def variants(text: str) -> list[Variant]:
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


@dataclasses.dataclass(frozen=True)
class Step:
    """One workload and what is measured on it, in this order."""

    workload: wl.Workload
    raw: bool = False  # one buffer per peer through the default group: the ceiling
    sync: bool = False  # one op per tensor through the default group, as reference code does
    sync_staged: bool = False  # the same for CUDA tensors through Gloo, via host copies
    variants: tuple[Variant, ...] = ()
    interference: bool = False  # matmul rate alone, then during each variant's transfers


def plan(args: argparse.Namespace, world: int, gpus: int) -> tuple[list[Step], list[LeftOut]]:
    """What each workload runs with ``world`` ranks on ``gpus`` GPUs, and what it leaves out
    and why.

    The parent decides this once and hands it to every rank, so that the ranks cannot
    disagree and the report can say what was not measured.
    """
    cuda = not args.cpu
    no_nccl = ""
    if cuda and world > gpus:
        no_nccl = f"{world} ranks share {gpus} GPU(s); NCCL refuses two ranks on one GPU"
    backends = variants(args.backends or (GPU_BACKENDS if cuda else CPU_BACKENDS))
    steps: list[Step] = []
    left_out: list[LeftOut] = []
    for w in workload_list(args, world - 1):
        step, skipped = _plan_one(w, backends, cuda, no_nccl, not args.no_baselines)
        if step is not None:
            steps.append(step)
        left_out += [{"workload": w.name, "variant": v, "reason": why} for v, why in skipped]
    return steps, left_out


def _plan_one(
    w: wl.Workload, backends: list[Variant], cuda: bool, no_nccl: str, baselines: bool
) -> tuple[Step | None, list[tuple[str, str]]]:
    """One workload's step (None: none at all) and the (variant, reason) pairs it leaves out;
    ``no_nccl`` is why NCCL cannot run ("" where it can)."""
    skipped: list[tuple[str, str]] = []

    def nccl_may_run(name: str) -> bool:  # noting why not, where it may not
        if no_nccl:
            skipped.append((name, no_nccl))
        return not no_nccl

    if w.name == "interference":
        if not cuda:
            return None, [("", "it times bf16 matmuls on a GPU; CPU ranks have none")]
        chosen = []
        for v in backends:
            if v[1] == "gloo":
                skipped.append((v[0], "it measures GPU transports; gloo stages through the host"))
            elif v[1] not in NCCL_BACKENDS or nccl_may_run(v[0]):
                chosen.append(v)
        return Step(w, variants=tuple(chosen), interference=True), skipped
    sweep = w.name.startswith("sweep")
    raw = nccl_may_run("raw-nccl") if cuda else True
    sync = baselines and not sweep and (nccl_may_run("ref-nccl") if cuda else True)
    has_gloo = any(b == "gloo" for _, b, _ in backends)
    # CPU tensors through Gloo: no NCCL, so ranks sharing a GPU keep it
    staged = cuda and baselines and not sweep and has_gloo
    chosen = []
    for v in backends:
        if v[1] == "gloo" and cuda and sweep and w.bytes_per_peer > GLOO_SWEEP_MAX_BYTES:
            skipped.append((v[0], "seconds per repetition through the host; the curve is flat"))
        elif v[1] not in NCCL_BACKENDS or nccl_may_run(v[0]):
            chosen.append(v)
    return Step(w, raw, sync, staged, tuple(chosen)), skipped


class _Reporter:
    """What a rank tells the parent as it goes: each row once measured, where rank 0 is, and
    what failed, so that a failure later in the run loses nothing measured before it."""

    def __init__(self, rank: int, out: Any) -> None:
        self.rank = rank
        self._out = out
        self._at = ("start-up", "")

    def progress(self, workload: str, what: str) -> None:
        self._at = (workload, what)
        if self.rank == 0:
            print(f"  .. {workload}: {what}", file=sys.stderr, flush=True)
            # the parent's guess at where a rank that dies without a word was
            self._out.put(("at", workload, what))

    def row(self, row: Row) -> None:
        self._out.put(("row", self.rank, row))

    def failed(self, exc: BaseException) -> None:
        workload, what = self._at
        error = repr(_innermost(exc))
        self._out.put(("failed", self.rank, workload, what, error))


def _innermost(exc: BaseException) -> BaseException:
    """The error itself, out of the exception groups a task group wraps it in."""
    inner: tuple[BaseException, ...] = getattr(exc, "exceptions", ())
    return _innermost(inner[0]) if len(inner) == 1 else exc


async def _rank_main(
    rank: int, world: int, args: argparse.Namespace, steps: list[Step], report: _Reporter
) -> None:
    device = rank_device(rank, args.cpu)
    bench = Bench(rank, world, device, args.reps, args.warmup)
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
        report.row(
            {
                "workload": "idle",
                "variant": "ticker",
                "max_stall_ms": idle[0],
                "p99_stall_ms": idle[1],
            }
        )
        for step in steps:
            await _run(bench, step, report)
        stop.set()
    # rank 0's store serves the others until they are done with it
    dist.barrier(group=bench.cpu_group)


async def _run(bench: Bench, step: Step, report: _Reporter) -> None:
    w = step.workload
    if step.interference:
        report.progress(w.name, "matmul alone")
        on_variant = functools.partial(report.progress, w.name)
        for row in await bench.interference(w, list(step.variants), on_variant):
            report.row(row)
        return
    if step.raw:
        report.progress(w.name, "raw")
        report.row(await bench.raw(w))
    if step.sync:
        report.progress(w.name, "synchronous per-tensor baseline")
        many = len(w.shapes) > 100
        report.row(await bench.reference(w, staged=False, max_ops=32 if many else None))
    if step.sync_staged:
        report.progress(w.name, "synchronous per-tensor baseline through host copies")
        report.row(await bench.reference(w, staged=True, max_ops=None))
    for label, backend, options in step.variants:
        report.progress(w.name, label)
        try:
            report.row(await bench.ours(w, label, backend, options))
        except aeplb.AEPLBError as exc:  # raised on every rank: report it and go on
            report.row(
                {
                    "workload": w.name,
                    "variant": label,
                    "error": repr(exc),
                    "max_stall_ms": 0.0,
                    "p99_stall_ms": 0.0,
                }
            )


def entry(
    rank: int, world: int, meeting: Meeting, job: tuple[argparse.Namespace, list[Step]], out: Any
) -> None:
    args, steps = job
    report = _Reporter(rank, out)
    try:
        init_rank(rank, world, meeting, cpu=args.cpu, timeout=timedelta(minutes=5))
        anyio.run(_rank_main, rank, world, args, steps, report)
    except Exception as exc:
        # Anything but an AEPLBError may have left the ranks out of step: stop the run, and
        # let the parent keep what was measured and say what failed.
        report.failed(exc)
        raise
    dist.destroy_process_group()
