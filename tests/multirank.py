"""Runs a function on N real ranks: spawned processes, torch.distributed Gloo on loopback.

Rank processes are spawned once per world size and reused (importing torch dominates the
cost); every ``run`` gets a fresh rendezvous and a fresh default process group. A rank that
does not answer in time gets the whole pool killed and respawned, and the test fails.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

ASYNC_BACKENDS = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


class RankFailure(AssertionError):
    """One or more ranks raised; the message holds their tracebacks."""


class RankTimeout(AssertionError):
    """Ranks did not answer in time; the pool was killed."""


# The "rank" of the message in which rank 0 tells the port its store listens on.
_PORT = -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world_size: int, tasks: Any, results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import anyio
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    while True:
        msg = tasks.get()
        if msg is None:
            return
        run_id, fn, args, backend, port, pg_timeout, pg_backend = msg
        try:
            if "nccl" in pg_backend:
                torch.cuda.set_device(rank % torch.cuda.device_count())
            timeout = timedelta(seconds=pg_timeout)
            if rank == 0:
                # The store listens on a port the OS picks while binding it: a port picked
                # beforehand can be taken by another socket before the store binds it.
                store = dist.TCPStore(
                    "127.0.0.1", 0, world_size, True, timeout, wait_for_workers=False
                )
                results.put((run_id, _PORT, True, store.port))
            else:
                store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
            dist.init_process_group(
                pg_backend, store=store, rank=rank, world_size=world_size, timeout=timeout
            )
            del store  # the default group holds it
            call = functools.partial(fn, rank, world_size, *args)
            if backend == "sync":
                value = call()
            else:
                name, options = ASYNC_BACKENDS[backend]
                value = anyio.run(call, backend=name, backend_options=options)
            results.put((run_id, rank, True, value))
        except BaseException:
            results.put((run_id, rank, False, traceback.format_exc()))
        finally:
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:
                    pass


class RankPool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._ids = itertools.count()

    def _ensure(self) -> None:
        if self._procs and all(p.is_alive() for p in self._procs):
            return
        self.kill()
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            self._ctx.Process(
                target=_rank_main,
                args=(r, self.world_size, self._tasks[r], self._results),
                daemon=True,
                name=f"rank{r}",
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5)
        self._procs = []

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        backend: str = "sync",
        timeout: float = 60.0,
        pg_timeout: float = 60.0,
        allow_dead: bool = False,
        pg_backend: str = "gloo",
    ) -> list[Any]:
        """Runs ``fn(rank, world_size, *args)`` on every rank; returns the results by rank.

        ``backend`` is "sync" or an async backend name (asyncio, uvloop, trio) for an async
        ``fn``. ``pg_backend`` is the default group's backend (e.g. "cpu:gloo,cuda:nccl";
        with NCCL each rank first selects GPU ``rank``). With ``allow_dead``, ranks that die
        or never answer give None instead of failing the run (for fault tests), and the pool
        is respawned afterwards.
        """
        self._ensure()
        run_id = next(self._ids)
        # rank 0 first: the others learn the port its store got
        self._tasks[0].put((run_id, fn, args, backend, 0, pg_timeout, pg_backend))
        got: dict[int, tuple[bool, Any]] = {}
        started = self.world_size == 1
        import time

        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            left = deadline - time.monotonic()
            if allow_dead and left > 0:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead and all(r in got or r in dead for r in range(self.world_size)):
                    break
            try:
                rid, rank, ok, value = self._results.get(timeout=max(min(left, 0.5), 0.01))
            except queue.Empty:
                if time.monotonic() < deadline:
                    continue
                if allow_dead:
                    break
                missing = [r for r in range(self.world_size) if r not in got]
                self.kill()
                raise RankTimeout(
                    f"rank(s) {missing} did not finish {fn.__name__} within {timeout} s; "
                    f"finished: {self._describe(got)}"
                ) from None
            if rid == run_id and rank == _PORT:
                for q in self._tasks[1:]:
                    q.put((run_id, fn, args, backend, value, pg_timeout, pg_backend))
                started = True
            elif rid == run_id:
                got[rank] = (ok, value)
                if not started:  # rank 0 failed before its store was up; the rest never ran
                    break
        if allow_dead:
            self.kill()  # respawn for the next test; some ranks are gone or stuck
        failed = {r: v for r, (ok, v) in got.items() if not ok}
        if failed:
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items()))
            raise RankFailure(f"{len(failed)} rank(s) failed in {fn.__name__}:\n{text}")
        return [got[r][1] if r in got else None for r in range(self.world_size)]

    @staticmethod
    def _describe(got: dict[int, tuple[bool, Any]]) -> str:
        parts = [
            f"rank {r}: " + ("ok" if ok else "failed:\n" + str(v))
            for r, (ok, v) in sorted(got.items())
        ]
        return ", ".join(parts) or "none"
