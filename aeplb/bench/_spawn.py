"""Spawns one process per rank and collects what rank 0 reports."""

from __future__ import annotations

import asyncio
import os
import queue
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._C._distributed_c10d import TCPStore


def ranks_wanted(cpu: bool, ranks: int) -> int | None:
    """The rank count: ``ranks``, else one per GPU (2 with ``cpu``); None without a GPU."""
    if not cpu and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --cpu for CPU ranks over Gloo", file=sys.stderr)
        return None
    return ranks or (2 if cpu else torch.cuda.device_count())


@dataclass(frozen=True)
class Meeting:
    """Where a spawned rank finds the others: rank 0's store, on a port the OS picks as
    the store binds it (a port picked beforehand can be taken by another socket first)."""

    port: int = 0
    report: Any = None  # rank 0's: a queue to tell the parent the port

    def store(self, rank: int, world: int, timeout: timedelta) -> TCPStore:
        if rank != 0:
            return TCPStore("127.0.0.1", self.port, world, False, timeout)
        store = TCPStore("127.0.0.1", 0, world, True, timeout, wait_for_workers=False)
        self.report.put(store.port)
        return store


def rank_device(rank: int, cpu: bool) -> torch.device:
    """The device a spawned rank works on: a GPU each, round robin when there are more
    ranks than GPUs (ipc and gloo run two ranks on one GPU; NCCL refuses to)."""
    if cpu:
        return torch.device("cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def enough_gpus(need: int, cpu: bool | None = None) -> bool:
    """Whether a benchmark script can run here; if not, says on stderr what is missing.

    ``cpu`` is the script's ``--cpu`` flag (None for a script without one): CPU ranks need
    no GPU. With ``need`` 1, two ranks share the GPU, which NCCL refuses.
    """
    have = torch.cuda.device_count()
    if cpu or have >= need:
        return True
    hint = " (two ranks share it; nccl and pynccl need two)" if need == 1 else ""
    if cpu is not None:
        hint += ", or run with --cpu"
    print(f"needs {need} CUDA GPU(s), found {have}{hint}", file=sys.stderr)
    return False


def init_rank(rank: int, world: int, meeting: Meeting, *, cpu: bool, timeout: timedelta) -> None:
    """Joins the default group from a spawned rank: Gloo on CPU, Gloo and NCCL on GPUs."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if cpu:
        # As torchrun does: ranks sharing the cores would each start a thread pool per
        # core, and a copy split over a pool waits for whichever thread is descheduled.
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank_device(rank, cpu))
    dist.init_process_group(
        "gloo" if cpu else "cpu:gloo,cuda:nccl",
        store=meeting.store(rank, world, timeout),
        rank=rank,
        world_size=world,
        timeout=timeout,
    )


class RanksFailed(Exception):
    """A spawned rank exited with an error.

    ``codes`` holds each rank's exit code as it was when that was seen: None for a rank
    still running then (and killed since).
    """

    def __init__(self, codes: list[int | None]) -> None:
        super().__init__(f"rank exit codes {codes}")
        self.codes = codes


def stream_ranks(entry: Callable[..., None], world: int, args: Any) -> Iterator[Any]:
    """Runs ``entry(rank, world, meeting, args, out)`` on ``world`` spawned ranks and yields
    what they put on ``out`` as it comes, until every rank has exited.

    Once any rank exits with an error, yields what the ranks had put on ``out`` by then and
    raises RanksFailed; the other ranks are killed, so a failed rank never leaves the caller
    waiting, and neither does a caller that stops early.
    """
    ctx = mp.get_context("spawn")
    out, ports = ctx.Queue(), ctx.Queue()
    procs: list[Any] = []

    def start(rank: int, meeting: Meeting) -> None:
        p = ctx.Process(target=entry, args=(rank, world, meeting, args, out))
        p.start()
        procs.append(p)

    try:
        start(0, Meeting(report=ports))
        port = next(_items(ports, procs))  # rank 0 first: the others learn its store's port
        for r in range(1, world):
            start(r, Meeting(port))
        yield from _items(out, procs)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()


def run_ranks(entry: Callable[..., None], world: int, args: Any) -> Any | None:
    """Runs ``entry(rank, world, meeting, args, out)`` on ``world`` spawned ranks.

    Returns the first thing put on ``out`` (what rank 0 reports), or None once any rank
    exits with an error.
    """
    try:
        items = list(stream_ranks(entry, world, args))
    except RanksFailed:
        print("a rank failed; see its traceback above", file=sys.stderr)
        return None
    return items[0] if items else None


def _items(q: Any, procs: list[Any]) -> Iterator[Any]:
    """What the ranks put on ``q`` until all have exited; RanksFailed once one failed."""
    while True:
        try:
            item = q.get(timeout=0.2)
        except queue.Empty:
            codes = [p.exitcode for p in procs]
            failed = any(c not in (None, 0) for c in codes)
            if failed or all(c == 0 for c in codes):
                # what a rank put before it exited is all in the pipe by then (its queue's
                # feeder thread is joined on the way out) but may have come in after the get
                yield from _left_on(q)
                if failed:
                    raise RanksFailed(codes) from None
                return
            continue
        yield item


def _left_on(q: Any) -> Iterator[Any]:
    while True:
        try:
            item = q.get(timeout=0.1)
        except queue.Empty:
            return
        yield item


def run_pair(main: Callable[[int, Any], Awaitable[Any]], args: Any) -> Any | None:
    """Runs ``await main(rank, args)`` on two spawned ranks of the default group (Gloo on
    CPU with ``args.cpu``, else a GPU each, or both on one where there is one) and returns
    what rank 0's returned; None once a rank failed. ``main`` must be a module-level
    function, as spawn pickles it."""
    return run_ranks(_pair_rank, 2, (main, args))


def _pair_rank(rank: int, world: int, meeting: Meeting, job: Any, out: Any) -> None:
    main, args = job
    init_rank(rank, world, meeting, cpu=args.cpu, timeout=timedelta(seconds=120))
    result = asyncio.run(main(rank, args))
    dist.destroy_process_group()
    if rank == 0:
        out.put(result)
