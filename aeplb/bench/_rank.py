"""What each rank measures. Rank 0 later takes, per repetition, the slowest rank's time."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch
import torch.distributed as dist

import aeplb

from ._workloads import Workload, fill

Row = dict[str, Any]


class Ticker:
    """A 1 ms ticker on the event loop; records how late each tick woke up."""

    def __init__(self) -> None:
        self.stalls: list[float] = []
        self.active = False
        self._last = 0.0

    async def run(self, stop: anyio.Event) -> None:
        self._last = time.perf_counter()
        while not stop.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            if self.active:
                self.stalls.append(now - self._last - 0.001)
            self._last = now

    def begin(self) -> None:
        """Starts measuring now: code the loop ran before (the caller's queueing) is not
        counted against the call that follows."""
        self.stalls = []
        self.active = True
        self._last = time.perf_counter()

    def end(self) -> tuple[float, float]:
        self.active = False
        s = sorted(self.stalls) or [0.0]
        return s[-1] * 1e3, s[int(0.99 * (len(s) - 1))] * 1e3


class GCWatch:
    """Times the garbage collector's pauses while active: they stop every thread."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self.active = False
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self.active:
            self.pauses.append((info["generation"], time.perf_counter() - self._began))

    def __enter__(self) -> GCWatch:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def _seed(src: int, dst: int, index: int) -> int:
    return (src * 7919 + dst * 104729 + index) % (1 << 31)


class Bench:
    def __init__(self, rank: int, world: int, device: torch.device, reps: int, warmup: int):
        self.rank, self.world, self.device = rank, world, device
        self.reps, self.warmup = reps, warmup
        self.cuda = device.type == "cuda"
        self.peers = [p for p in range(world) if p != rank]
        self.cpu_group = dist.new_group(backend="gloo")
        self.ticker = Ticker()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.cpu_group)

    def tensors(
        self, w: Workload
    ) -> tuple[dict[int, list[torch.Tensor]], dict[int, list[torch.Tensor]]]:
        sends = {
            p: [
                fill(s, w.dtype, self.device, _seed(self.rank, p, i))
                for i, s in enumerate(w.shapes)
            ]
            for p in self.peers
        }
        recvs = {
            p: [torch.zeros(s, dtype=w.dtype, device=self.device) for s in w.shapes]
            for p in self.peers
        }
        return sends, recvs

    def verify(self, w: Workload, recvs: dict[int, list[torch.Tensor]]) -> None:
        for p, bufs in recvs.items():
            for i, (s, buf) in enumerate(zip(w.shapes, bufs, strict=True)):
                want = fill(s, w.dtype, buf.device, _seed(p, self.rank, i))
                if not torch.equal(buf.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)):
                    raise AssertionError(f"{w.name}: data from rank {p}, tensor {i} is wrong")
                buf.zero_()

    async def inline(self, name: str, w: Workload, fn: Callable[[], None]) -> Row:
        """Times a synchronous transfer run on the event loop thread, as reference code does."""
        times, cpu = [], []
        for i in range(self.warmup + self.reps):
            self.sync()
            self.ticker.begin()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if self.cuda:
                torch.cuda.synchronize(self.device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            await anyio.sleep(0.003)  # let the ticker see how long it was blocked
            stall = self.ticker.end()
            if i >= self.warmup:
                times.append(dt)
                cpu.append(dc)
        return _row(name, w, times, cpu, stall, 0)

    async def raw(self, w: Workload) -> Row:
        """The ceiling: one buffer of the same bytes per peer and direction."""
        n = w.bytes_per_peer
        send = {p: fill((n,), torch.uint8, self.device, p + 1) for p in self.peers}
        recv = {p: torch.empty(n, dtype=torch.uint8, device=self.device) for p in self.peers}

        def once() -> None:
            ops = []
            for p in self.peers:
                ops.append(dist.P2POp(dist.isend, send[p], p))
                ops.append(dist.P2POp(dist.irecv, recv[p], p))
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        return await self.inline("raw-nccl" if self.cuda else "raw-gloo", w, once)

    async def reference(self, w: Workload, staged: bool, max_ops: int | None) -> Row:
        """The reference synchronous communicators: one op per tensor; CUDA tensors through
        Gloo via fresh pageable host copies and full synchronizes."""
        sends, recvs = self.tensors(w)

        def once() -> None:
            ops = []
            back: list[tuple[torch.Tensor, torch.Tensor]] = []
            if staged:
                torch.cuda.synchronize(self.device)
            for p in self.peers:
                # send i and receive i side by side, so a capped group never holds only sends
                for t, r in zip(sends[p], recvs[p], strict=True):
                    ops.append(dist.P2POp(dist.isend, t.cpu() if staged else t, p))
                    buf = torch.empty(r.shape, dtype=r.dtype) if staged else r
                    back.append((buf, r))
                    ops.append(dist.P2POp(dist.irecv, buf, p))
            step = max_ops or len(ops)
            for i in range(0, len(ops), step):
                for work in dist.batch_isend_irecv(ops[i : i + step]):
                    work.wait()
            if staged:
                for buf, t in back:
                    t.copy_(buf)
                torch.cuda.synchronize(self.device)

        name = "ref-gloo-staged" if staged else ("ref-nccl" if self.cuda else "ref-gloo")
        row = await self.inline(name, w, once)
        self.verify(w, recvs)
        return row

    async def ours(self, w: Workload, name: str, backend: str, options: dict[str, Any]) -> Row:
        comm = aeplb.create_communicator(backend, device=self.device, **options)
        sends, recvs = self.tensors(w)
        times: list[float] = []
        cpu: list[float] = []
        queue_ms: list[float] = []
        check_ms: list[float] = []
        phases: list[dict[str, float]] = []
        stalls_max: list[float] = []
        stalls_p99: list[float] = []
        gc_watch, gc_queue = GCWatch(), GCWatch()
        with gc_watch, gc_queue:
            for i in range(self.warmup + self.reps):
                await anyio.to_thread.run_sync(self.sync)
                c0, t0 = time.process_time(), time.perf_counter()
                gc_queue.active = i >= self.warmup
                for p in self.peers:
                    for t in sends[p]:
                        comm.add_send(t, p)
                    for t in recvs[p]:
                        comm.add_recv(t, p)
                gc_queue.active = False
                tq = time.perf_counter()
                # the stall that matters is the one execute() causes; queueing is the caller's
                # own synchronous code and is reported apart
                self.ticker.begin()
                gc_watch.active = i >= self.warmup
                stats = await comm.execute()
                gc_watch.active = False
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                check_ms.append(stats.check_seconds * 1e3)
                phases.append(
                    {
                        # execute() until the worker started; the worker's end until here
                        "handoff": stats.seconds - stats.transfer_seconds,
                        **getattr(comm._transport, "phases", {}),
                        "wake": dt - (tq - t0) - stats.seconds,
                    }
                )
                stall = self.ticker.end()
                queue_ms.append((tq - t0) * 1e3)
                if i == 0:
                    self.verify(w, recvs)
                if i >= self.warmup:
                    times.append(dt)
                    cpu.append(dc)
                    stalls_max.append(stall[0])
                    stalls_p99.append(stall[1])
        if self.warmup + self.reps > 1:  # one batch in all was checked (and zeroed) above
            self.verify(w, recvs)
        staging = int(getattr(comm._transport, "staging_bytes", 0))
        await comm.aclose()
        row = _row(name, w, times, cpu, (max(stalls_max), max(stalls_p99)), staging)
        row["options"] = {k: v for k, v in options.items() if k != "timeout"}
        row["queue_ms"] = statistics.median(queue_ms[self.warmup :])
        row["check_ms"] = statistics.median(check_ms[self.warmup :])
        # collector pauses inside timed execute() calls: (generation, ms), longest first
        row["gc_pauses_ms"] = sorted(
            ((g, p * 1e3) for g, p in gc_watch.pauses), key=lambda x: -x[1]
        )[:5]
        # ... and inside the caller's queueing (add_send/add_recv) before them
        row["gc_queue_pauses_ms"] = sorted(
            ((g, p * 1e3) for g, p in gc_queue.pauses), key=lambda x: -x[1]
        )[:5]
        timed = [p for p in phases[self.warmup :] if len(p) > 2]
        if timed:  # where the time went (ipc)
            row["phases_ms"] = {
                key: statistics.median(p[key] for p in timed) * 1e3 for key in timed[0]
            }
        return row

    async def interference(
        self,
        w: Workload,
        variants: list[tuple[str, str, dict[str, Any]]],
        on_variant: Callable[[str], None],
    ) -> list[Row]:
        """bf16 matmul throughput alone, and while each variant moves ``w`` back to back
        (``on_variant`` is told each one's label as it starts).

        The matmuls run on a stream of their own and are timed with CUDA events; the
        batches keep running until after the matmuls end, so the whole timed window
        overlaps transfers. "Alone" is measured before and after, against clock drift.
        """
        n, k = 8192, 60
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        # Its own stream: execute() waits for what is queued on the caller's current
        # stream, so matmuls there would hold every transfer back until they finish.
        mm_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        torch.cuda.synchronize(self.device)  # ``a`` was written on the default stream

        def launch() -> tuple[torch.cuda.Event, torch.cuda.Event]:
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            with torch.cuda.stream(mm_stream):
                start.record()
                for _ in range(k):
                    a @ a
                end.record()
            return start, end

        def tflops(events: tuple[torch.cuda.Event, torch.cuda.Event]) -> float:
            ms: float = events[0].elapsed_time(events[1])
            return k * 2 * n**3 / (ms / 1e3) / 1e12

        async def alone() -> float:
            rates = []
            for _ in range(3):
                events = launch()
                await anyio.to_thread.run_sync(events[1].synchronize)
                rates.append(tflops(events))
            return statistics.median(rates)

        async def measure(label: str, backend: str, options: dict[str, Any], before: float) -> Row:
            comm = aeplb.create_communicator(backend, device=self.device, **options)
            sends, recvs = self.tensors(w)
            t0 = time.perf_counter()
            await self._pump(comm, sends, recvs, 3)
            per_batch = (time.perf_counter() - t0) / 3
            window = k * 2 * n**3 / (before * 1e12)
            # rank 0 decides how many batches: every rank must run exactly as many
            plan = torch.tensor([int(window / per_batch * 1.5) + 8, int(per_batch * 1e6)])
            dist.broadcast(plan, 0, group=self.cpu_group)
            count, per_batch = int(plan[0]), int(plan[1]) / 1e6
            self.sync()
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, comm, sends, recvs, count)
                await anyio.sleep(per_batch * 2)
                events = launch()
                await anyio.to_thread.run_sync(events[1].synchronize)
                matmul_end = time.perf_counter()
            pump_end = time.perf_counter()
            self.verify(w, recvs)
            await comm.aclose()
            during = tflops(events)
            return {
                "workload": "interference",
                "variant": label,
                "TFLOPs": during,
                "TFLOPs_alone": before,
                "drop": 1 - during / before,
                "batches": count,
                "GBps_during": count * w.bytes_per_peer / (pump_end - t0) / 1e9,
                "transfers_outlasted_matmul_s": pump_end - matmul_end,
            }

        await alone()  # warm the clocks
        self.sync()
        before = await alone()
        rows: list[Row] = []
        for label, backend, options in variants:
            on_variant(label)
            try:
                rows.append(await measure(label, backend, options, before))
            except aeplb.AEPLBError as exc:
                rows.append({"workload": "interference", "variant": label, "error": repr(exc)})
        after = await alone()
        rows.insert(
            0,
            {
                "workload": "interference",
                "variant": "matmul alone",
                "TFLOPs": before,
                "TFLOPs_after": after,
            },
        )
        return rows

    async def _pump(
        self,
        comm: aeplb.Communicator,
        sends: dict[int, list[torch.Tensor]],
        recvs: dict[int, list[torch.Tensor]],
        count: int,
    ) -> None:
        for _ in range(count):
            for p in self.peers:
                for t in sends[p]:
                    comm.add_send(t, p)
                for t in recvs[p]:
                    comm.add_recv(t, p)
            await comm.execute()


def _row(
    name: str,
    w: Workload,
    times: list[float],
    cpu: list[float],
    stall: tuple[float, float],
    staging: int,
) -> Row:
    return {
        "workload": w.name,
        "variant": name,
        "bytes_per_peer": w.bytes_per_peer,
        "tensors_per_peer": len(w.shapes),
        "times": times,
        "cpu_ms": statistics.median(cpu) * 1e3,
        "max_stall_ms": stall[0],
        "p99_stall_ms": stall[1],
        "staging_bytes": staging,
    }
