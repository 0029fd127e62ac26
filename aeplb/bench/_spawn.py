"""Spawns one process per rank and collects what rank 0 reports."""

from __future__ import annotations

import os
import queue
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def ranks_wanted(cpu: bool, ranks: int) -> int | None:
    """The rank count: ``ranks``, else one per GPU (2 with ``cpu``); None without a GPU."""
    if not cpu and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --cpu for CPU ranks over Gloo", file=sys.stderr)
        return None
    return ranks or (2 if cpu else torch.cuda.device_count())


def init_rank(rank: int, world: int, port: int, *, cpu: bool, timeout: timedelta) -> None:
    """Joins the default group from a spawned rank: Gloo on CPU, Gloo and NCCL on GPUs."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if cpu:
        # As torchrun does: ranks sharing the cores would each start a thread pool per
        # core, and a copy split over a pool waits for whichever thread is descheduled.
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "gloo" if cpu else "cpu:gloo,cuda:nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timeout,
    )


def run_ranks(entry: Callable[..., None], world: int, args: Any) -> Any | None:
    """Runs ``entry(rank, world, port, args, out)`` on ``world`` spawned ranks.

    Returns what rank 0 put on ``out``, or None once any rank exits with an error (the other
    ranks are killed then, so a failed rank never leaves the caller waiting).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=entry, args=(r, world, port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    while True:
        try:
            result = out.get(timeout=1.0)
            break
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                print("a rank failed; see its traceback above", file=sys.stderr)
                return None
    for p in procs:
        p.join()
    return result
