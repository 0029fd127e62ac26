"""Serve a small MoE model on N ranks while aeplb rebalances its experts underneath.

Run ``python examples/serve_while_rebalancing.py`` (2 CPU ranks over Gloo) or
``python examples/serve_while_rebalancing.py --ranks 4 --device cuda`` (a GPU per rank; with
fewer GPUs than ranks, ranks share them, and ``auto`` moves the weights by CUDA IPC).

What runs:

* The driver (this process) spawns N ranks and then acts as the load generator: a client sends
  one request at a time over loopback TCP (one JSON object per line) for ``--duration`` seconds.
* Every request goes to every rank, as a batch does in expert parallelism. Each rank routes the
  batch's tokens (a real router plus a popularity bias, top-2) to logical experts, picks one
  physical replica per token through ``log2phy``/``logcnt``, and runs the expert MLPs of the
  tokens that land on its *own* slots. There is no all-to-all: a token whose replica lives on
  another rank is computed there, because that rank got the same batch. So the work a rank does
  per request is exactly its expert-parallel share, and a request's latency (until the slowest
  rank answers) shows load imbalance directly.
* Every ``duration / (rounds + 1)`` seconds the ranks all-reduce the per-expert token counts,
  compute a new placement with ``aeplb.rebalance_experts`` and move the weights with
  ``await aeplb.rearrange_experts(...)`` while the same event loop keeps answering requests.
* A fixed probe batch is pushed through the placement before the first and after the last
  rearrangement; the two outputs must be bit-identical (same logical experts, new places).

The scenario is made to need rebalancing: popularity is Zipf-like around a per-layer hot spot
of neighbouring expert ids that drifts slowly, and the starting placement is contiguous (slot s
holds expert s mod E), so each layer's hot spot starts out on one rank.

The driver prints the summary and exits non-zero if a rank fails or the probe outputs differ.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessContext, start_processes

import aeplb

TOP_K = 2
ZIPF_EXPONENT = 1.2
ROUTER_SCALE = 0.5  # token-dependent part of the router logits, against the popularity bias
DRIFT_SPEED = 0.1  # expert ids per second that each layer's popularity hot spot moves
CLIENTS = 1  # concurrent requests in flight; 1 keeps queueing out of the latencies
THINK_SECONDS = 0.002  # pause between a client's requests, so idle ranks really are idle
PROBE_SEED = 0x5EED
PROBE_TOKENS = 32
TRANSFER_TIMEOUT = 60.0  # no rank ever waits forever on a dead peer
REQUEST_TIMEOUT = 60.0  # nor does the driver on a stuck rank


@dataclass(frozen=True)
class Config:
    ranks: int
    device: str
    layers: int
    experts: int
    slots: int
    hidden: int
    ffn: int
    tokens: int
    duration: float
    rounds: int
    seed: int
    port: int

    @property
    def slots_per_rank(self) -> int:
        return self.slots // self.ranks


# -- the model on one rank ------------------------------------------------------------------


def _expert_seed(seed: int, layer: int, expert: int) -> int:
    return (seed * 1_000_003 + layer) * 10_007 + expert


class MoE:
    """L MoE layers whose physical slots [first, first + S) live on this rank.

    The placement tensors (``phy2log``, ``log2phy``, ``logcnt``) stay on the CPU: routing
    reads them there, and ``rearrange_experts`` rewrites them in place, one layer at a time,
    together with the weights, so a request never sees a layer half-moved.
    """

    def __init__(self, cfg: Config, rank: int, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.first = rank * cfg.slots_per_rank
        num_layers, num_experts, num_slots = cfg.layers, cfg.experts, cfg.slots
        # Deliberately naive start (slot s holds expert s mod E, as an unbalanced
        # deployment would) so the first rebalance has real work to do.
        self.phy2log = (torch.arange(num_slots) % num_experts).repeat(num_layers, 1)
        # log2phy is sized for the most replicas any expert can ever get, so every later
        # placement fits into it in place.
        maxcnt = num_slots - num_experts + 1
        self.log2phy = torch.full((num_layers, num_experts, maxcnt), -1, dtype=torch.int64)
        self.logcnt = torch.zeros((num_layers, num_experts), dtype=torch.int64)
        for layer in range(num_layers):
            for slot, expert in enumerate(self.phy2log[layer].tolist()):
                self.log2phy[layer, expert, self.logcnt[layer, expert]] = slot
                self.logcnt[layer, expert] += 1

        self.weights: list[list[torch.Tensor]] = []
        for layer in range(num_layers):
            w1 = torch.empty(cfg.slots_per_rank, cfg.hidden, cfg.ffn, device=device)
            w2 = torch.empty(cfg.slots_per_rank, cfg.ffn, cfg.hidden, device=device)
            for s in range(cfg.slots_per_rank):
                # Seeded by logical expert, so every replica of an expert is bit-identical.
                expert = int(self.phy2log[layer, self.first + s])
                gen = torch.Generator(device).manual_seed(_expert_seed(cfg.seed, layer, expert))
                w1[s].normal_(0.0, 1 / math.sqrt(cfg.hidden), generator=gen)
                w2[s].normal_(0.0, 1 / math.sqrt(cfg.ffn), generator=gen)
            self.weights.append([w1, w2])

        gen = torch.Generator().manual_seed(cfg.seed)
        self.router = torch.randn(num_layers, cfg.hidden, num_experts, generator=gen)
        self.router *= ROUTER_SCALE / math.sqrt(cfg.hidden)
        # Popularity: Zipf-like in the distance from a per-layer hot spot on the ring of expert
        # ids. Neighbouring ids share the heat, so the contiguous start places each layer's
        # hot spot on one rank; the hot spot drifts, so the load the policy sees goes stale.
        self.hot_spot = torch.rand(num_layers, 1, generator=gen, dtype=torch.float64)
        self.hot_spot *= num_experts

        # Tokens served per (layer, logical expert) since the last rebalance: the policy's input.
        self.window_load = torch.zeros(num_layers, num_experts, dtype=torch.int64)

    def tokens(self, seed: int, count: int) -> torch.Tensor:
        return torch.randn(count, self.cfg.hidden, generator=torch.Generator().manual_seed(seed))

    def route(self, x: torch.Tensor, layer: int, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k logical experts and gates per token, on the CPU so all ranks agree exactly."""
        num_experts = self.cfg.experts
        centre = (self.hot_spot[layer] + DRIFT_SPEED * t) % num_experts
        distance = (torch.arange(num_experts, dtype=torch.float64) - centre).abs()
        distance = torch.minimum(distance, num_experts - distance)
        bias = -ZIPF_EXPONENT * torch.log1p(distance)
        logits = x @ self.router[layer] + bias.float()
        values, experts = logits.topk(TOP_K, dim=1)
        return experts, torch.softmax(values, dim=1)

    def slots_for(self, layer: int, experts: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Physical slot per (token, k): replicas of an expert share its tokens round-robin."""
        replica = (token_ids[:, None] + torch.arange(TOP_K)) % self.logcnt[layer][experts]
        return self.log2phy[layer][experts, replica]

    def _local(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        local = slots - self.first
        tok, kk = ((local >= 0) & (local < self.cfg.slots_per_rank)).nonzero(as_tuple=True)
        return tok, kk, local[tok, kk]

    def serve(self, request_id: int, seed: int, t: float) -> tuple[float, int]:
        """Runs this rank's share of one batch; returns (output checksum, tokens served)."""
        x_cpu = self.tokens(seed, self.cfg.tokens)
        x = x_cpu.to(self.device)
        token_ids = request_id * self.cfg.tokens + torch.arange(self.cfg.tokens)
        checksum = torch.zeros((), dtype=torch.float64, device=self.device)
        served = 0
        for layer in range(self.cfg.layers):
            experts, gates = self.route(x_cpu, layer, t)
            tok, kk, local = self._local(self.slots_for(layer, experts, token_ids))
            if tok.numel() == 0:
                continue
            served += tok.numel()
            self.window_load[layer] += torch.bincount(experts[tok, kk], minlength=self.cfg.experts)
            order = torch.argsort(local, stable=True)
            tok, kk, local = tok[order], kk[order], local[order]
            counts = torch.bincount(local, minlength=self.cfg.slots_per_rank).tolist()
            xs = x[tok.to(self.device)]
            w1, w2 = self.weights[layer]
            outs, start = [], 0
            for slot, count in enumerate(counts):
                if count:
                    h = torch.nn.functional.silu(xs[start : start + count] @ w1[slot])
                    outs.append(h @ w2[slot])
                    start += count
            y = torch.cat(outs) * gates[tok, kk].to(self.device)[:, None]
            checksum += y.sum(dtype=torch.float64)
        return float(checksum), served

    def probe(self) -> torch.Tensor:
        """This rank's part of the probe output [L, T, k, H]; zero where another rank computes.

        Each (token, k) is computed on its own, one token per matmul, so the arithmetic does
        not depend on how many tokens share a slot: any difference before/after can only come
        from different weights.
        """
        x = self.tokens(PROBE_SEED, PROBE_TOKENS)
        token_ids = torch.arange(PROBE_TOKENS)
        out = torch.zeros(self.cfg.layers, PROBE_TOKENS, TOP_K, self.cfg.hidden)
        for layer in range(self.cfg.layers):
            experts, _ = self.route(x, layer, 0.0)
            w1, w2 = self.weights[layer]
            tok, kk, local = self._local(self.slots_for(layer, experts, token_ids))
            for t, k, slot in zip(tok.tolist(), kk.tolist(), local.tolist(), strict=True):
                row = x[t : t + 1].to(self.device)
                y = torch.nn.functional.silu(row @ w1[slot]) @ w2[slot]
                out[layer, t, k] = y[0].cpu()
        return out


# -- one rank: server + rebalancing controller on one event loop ----------------------------


@dataclass
class RankState:
    started: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    t0: float = 0.0
    epoch: int = 0  # completed rearrangements
    rearranging: bool = False
    requests: int = 0
    # "steady<epoch>" / "moving<epoch>" -> [requests, tokens served on this rank's slots]
    phases: dict[str, list[int]] = field(default_factory=dict)
    intervals: list[tuple[float, float]] = field(default_factory=list)
    error: str | None = None
    connections: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    async def close_connections(self) -> None:
        # Closing our end feeds EOF to each handler's readline, so handlers end normally
        # instead of being cancelled (and logged) when the loop shuts down.
        for writer in self.connections.values():
            writer.close()
        await asyncio.gather(*self.connections, return_exceptions=True)


def _phase_key(state: RankState) -> str:
    return f"{'moving' if state.rearranging else 'steady'}{state.epoch}"


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    model: MoE,
    state: RankState,
) -> None:
    task = asyncio.current_task()
    assert task is not None
    state.connections[task] = writer
    try:
        while line := await reader.readline():
            msg = json.loads(line)
            cmd = msg.get("cmd", "infer")
            reply: dict[str, Any] = {"ok": True}
            if cmd == "start":
                state.t0 = float(msg["t0"])
                state.started.set()
            elif cmd == "stop":
                state.stop.set()
            else:
                # Runs inline on the loop, like a single-threaded server's forward pass:
                # whatever the rearrangement does to the loop shows up in these latencies.
                checksum, served = model.serve(int(msg["id"]), int(msg["seed"]), float(msg["t"]))
                state.requests += 1
                counter = state.phases.setdefault(_phase_key(state), [0, 0])
                counter[0] += 1
                counter[1] += served
                reply = {"id": msg["id"], "checksum": checksum, "tokens": served}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    except Exception:
        state.error = traceback.format_exc()
        state.stop.set()
    finally:
        writer.close()
        state.connections.pop(task, None)


def _all_reduce(tensor: torch.Tensor, group: Any, op: Any = dist.ReduceOp.SUM) -> None:
    dist.all_reduce(tensor, op=op, group=group)


def _all_gather(tensor: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor, group=group)
    return torch.stack(out)


class ProgressBar:
    """One \\r-rewritten line on rank 0, fed by rearrange_experts' on_progress."""

    def __init__(self, label: str, width: int = 24) -> None:
        self.label = label
        self.width = width

    def __call__(self, done: int, total: int) -> None:
        filled = self.width if total == 0 else self.width * done // total
        bar = "#" * filled + "." * (self.width - filled)
        sys.stdout.write(f"\r  {self.label} [{bar}] {done}/{total} layers".ljust(72))
        sys.stdout.flush()


async def _controller(
    cfg: Config,
    rank: int,
    model: MoE,
    comm: aeplb.Communicator,
    control: Any,
    state: RankState,
) -> list[dict[str, float]]:
    """Rebalances every duration / (rounds + 1) seconds until the driver says stop."""
    await state.started.wait()
    interval = cfg.duration / (cfg.rounds + 1)
    rounds: list[dict[str, float]] = []
    for k in range(1, cfg.rounds + 1):
        delay = state.t0 + k * interval - time.time()
        if delay > 0:
            try:
                await asyncio.wait_for(state.stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
        # Stop flag and load travel together, so all ranks agree on whether this round runs.
        # Collectives run in a thread: the loop keeps serving while they wait for peers.
        stop = torch.tensor([1 if state.stop.is_set() else 0], dtype=torch.int64)
        vec = torch.cat([stop, model.window_load.flatten()])
        model.window_load.zero_()
        await asyncio.to_thread(_all_reduce, vec, control)
        if vec[0] > 0:
            break
        load = vec[1:].view(cfg.layers, cfg.experts)

        started = time.time()
        state.rearranging = True
        placement = aeplb.rebalance_experts(load, cfg.slots, 1, 1, cfg.ranks, current=model.phy2log)
        bar = ProgressBar(f"rebalance {k}/{cfg.rounds}") if rank == 0 else None
        try:
            stats = await aeplb.rearrange_experts(
                comm,
                model.weights,
                model.phy2log,
                placement.phy2log,
                on_progress=bar,
                log2phy=model.log2phy,
                logcnt=model.logcnt,
                timeout=TRANSFER_TIMEOUT,
            )
        finally:
            state.rearranging = False
        ended = time.time()
        state.epoch += 1
        state.intervals.append((started, ended))
        mine = torch.tensor(
            [stats.bytes_sent, stats.bytes_copied_locally, ended - started, stats.layers_changed],
            dtype=torch.float64,
        )
        every = await asyncio.to_thread(_all_gather, mine, control, cfg.ranks)
        info = {
            "bytes_sent": float(every[:, 0].sum()),
            "bytes_copied": float(every[:, 1].sum()),
            "seconds": float(every[:, 2].max()),
            "layers_changed": int(every[0, 3]),
        }
        rounds.append(info)
        if rank == 0:
            sys.stdout.write(
                f"\r  rebalance {k}/{cfg.rounds}: {info['layers_changed']} layer(s) changed, "
                f"{_mib(info['bytes_sent'])} over the network + "
                f"{_mib(info['bytes_copied'])} local copies in {info['seconds']:.2f} s".ljust(72)
                + "\n"
            )
            sys.stdout.flush()
    await state.stop.wait()
    return rounds


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


async def _rank_async(rank: int, cfg: Config, events: Any) -> None:
    cuda = cfg.device == "cuda"
    # more ranks than GPUs share them: auto then picks ipc, which NCCL's refusal spares
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{cfg.port}",
        rank=rank,
        world_size=cfg.ranks,
        timeout=timedelta(seconds=120),
    )
    try:
        # Load counts, stop flags and the probe travel on their own Gloo group, so they never
        # interleave with the communicator's transfers on the default group.
        control = dist.new_group(backend="gloo")
        comm = aeplb.create_communicator("auto", device=device, timeout=TRANSFER_TIMEOUT)
        model = MoE(cfg, rank, device)
        initial_phy2log = model.phy2log.clone()
        # One request's worth of warm-up (allocator, BLAS/cuBLAS handles) before timing starts.
        model.serve(-1, cfg.seed, 0.0)
        model.window_load.zero_()
        probe_before = model.probe()
        _all_reduce(probe_before, control)

        state = RankState()
        server = await asyncio.start_server(
            lambda r, w: _handle(r, w, model, state), "127.0.0.1", 0
        )
        try:
            events.put(("port", rank, server.sockets[0].getsockname()[1]))
            async with comm:
                rounds = await _controller(cfg, rank, model, comm, control, state)
                if state.error is not None:
                    raise RuntimeError(f"rank {rank} failed while serving:\n{state.error}")
                probe_after = model.probe()
                await asyncio.to_thread(_all_reduce, probe_after, control)
            report: dict[str, Any] = {
                "rank": rank,
                "requests": state.requests,
                "phases": state.phases,
                "epochs": state.epoch,
                "intervals": state.intervals,
                "rounds": rounds,
            }
            if rank == 0:
                diff = (probe_after - probe_before).abs().max().item()
                report["probe"] = {
                    "identical": bool(torch.equal(probe_before, probe_after)),
                    "max_abs_diff": diff,
                    "digest": hashlib.sha256(probe_after.numpy().tobytes()).hexdigest()[:16],
                    "slots_changed": int((model.phy2log != initial_phy2log).sum()),
                }
            events.put(("report", rank, report))
            # Every rank finishes its collectives before any rank tears the group down.
            await asyncio.to_thread(dist.barrier, control)
        finally:
            server.close()
            await state.close_connections()
    finally:
        dist.destroy_process_group()


def rank_main(rank: int, cfg: Config, events: Any) -> None:
    """Entry point of a spawned rank."""
    torch.set_num_threads(1)  # N ranks share the machine's cores
    asyncio.run(_rank_async(rank, cfg, events))


# -- the driver: spawns ranks, generates load, prints the summary ---------------------------


class RankFailed(RuntimeError):
    pass


@dataclass
class Sample:
    sent: float
    received: float

    @property
    def ms(self) -> float:
        return (self.received - self.sent) * 1e3


async def _next_event(events: Any, procs: ProcessContext) -> tuple[str, int, Any]:
    deadline = time.monotonic() + REQUEST_TIMEOUT + TRANSFER_TIMEOUT
    while time.monotonic() < deadline:
        try:
            item: tuple[str, int, Any] = events.get_nowait()
            return item
        except queue.Empty:
            pass
        _check_ranks(procs)
        await asyncio.sleep(0.02)
    raise RankFailed("the ranks stopped reporting")


def _check_ranks(procs: ProcessContext) -> None:
    try:
        procs.join(timeout=0)
    except Exception as exc:  # ProcessRaisedException / ProcessExitedException
        raise RankFailed(str(exc)) from None


class Client:
    """One connection to every rank; a request is answered when every rank has answered."""

    def __init__(self, streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
        self.streams = streams

    @classmethod
    async def connect(cls, ports: list[int]) -> Client:
        return cls([await asyncio.open_connection("127.0.0.1", p) for p in ports])

    async def call(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        line = json.dumps(msg).encode() + b"\n"
        for _, writer in self.streams:
            writer.write(line)
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(*(reader.readline() for reader, _ in self.streams)),
                REQUEST_TIMEOUT,
            )
        except asyncio.TimeoutError:
            raise RankFailed(f"a rank did not answer within {REQUEST_TIMEOUT:g} s") from None
        if not all(replies):
            raise RankFailed("a rank closed its connection")
        return [json.loads(r) for r in replies]

    def close(self) -> None:
        for _, writer in self.streams:
            writer.close()


async def _drive(cfg: Config, procs: ProcessContext, events: Any) -> tuple[list[Sample], list[Any]]:
    ports: dict[int, int] = {}
    while len(ports) < cfg.ranks:
        _, rank, port = await _next_event(events, procs)
        ports[rank] = port
    clients = [await Client.connect([ports[r] for r in range(cfg.ranks)]) for _ in range(CLIENTS)]
    t0 = time.time()
    await clients[0].call({"cmd": "start", "t0": t0})
    samples: list[Sample] = []

    async def client_loop(index: int, client: Client) -> None:
        request_id = index
        while time.time() < t0 + cfg.duration:
            sent = time.time()
            seed = cfg.seed * 1_000_003 + request_id
            await client.call({"id": request_id, "seed": seed, "t": sent - t0})
            samples.append(Sample(sent, time.time()))
            request_id += CLIENTS
            await asyncio.sleep(THINK_SECONDS)

    async def watchdog() -> None:
        while True:
            _check_ranks(procs)
            await asyncio.sleep(0.2)

    load: asyncio.Future[Any] = asyncio.gather(*(client_loop(i, c) for i, c in enumerate(clients)))
    guard: asyncio.Future[Any] = asyncio.ensure_future(watchdog())
    try:
        await asyncio.wait([load, guard], return_when=asyncio.FIRST_COMPLETED)
        if guard.done():
            load.cancel()
            guard.result()
        await load
    finally:
        guard.cancel()
    await clients[0].call({"cmd": "stop"})
    reports: dict[int, Any] = {}
    while len(reports) < cfg.ranks:
        kind, rank, report = await _next_event(events, procs)
        if kind == "report":
            reports[rank] = report
    for client in clients:
        client.close()
    return samples, [reports[r] for r in range(cfg.ranks)]


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a (no requests)"
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50:.1f} ms  p99 {p99:.1f} ms  (n={len(values)})"


def _per_rank_load(reports: list[Any], phase: str) -> list[float] | None:
    loads = []
    for report in reports:
        requests, tokens = report["phases"].get(phase, [0, 0])
        if requests == 0:
            return None
        loads.append(tokens / requests)
    return loads


def _imbalance(loads: list[float] | None) -> str:
    if loads is None:
        return "n/a"
    return f"{max(loads) / (sum(loads) / len(loads)):.2f}"


def _fmt_loads(loads: list[float] | None) -> str:
    return "n/a" if loads is None else "[" + ", ".join(f"{x:.0f}" for x in loads) + "]"


def summarize(cfg: Config, samples: list[Sample], reports: list[Any]) -> bool:
    """Prints the summary; returns True when the run proved what it should."""
    intervals = [iv for report in reports for iv in report["intervals"]]

    def during(s: Sample) -> bool:
        return any(s.sent < end and s.received > start for start, end in intervals)

    busy = [s.ms for s in samples if during(s)]
    idle = [s.ms for s in samples if not during(s)]
    epochs = min(report["epochs"] for report in reports)
    before = _per_rank_load(reports, "steady0")
    after = _per_rank_load(reports, f"steady{epochs}") if epochs else None
    rounds = reports[0]["rounds"]
    probe = reports[0]["probe"]

    print()
    print("== summary ==")
    print(
        "measured: every request goes to every rank; each rank runs the expert MLPs of the "
        "tokens routed to its own slots (no all-to-all), so a request's latency is its slowest "
        "rank's expert work; a rank's load is the (token, expert) pairs landing on its slots"
    )
    print(f"requests served: {len(samples)} ({len(idle)} idle, {len(busy)} during rearrangement)")
    print(f"latency idle: {_percentiles(idle)}")
    print(f"latency during rearrangement: {_percentiles(busy)}")
    print(
        f"load imbalance (max/mean tokens per rank): before {_imbalance(before)} -> "
        f"after {_imbalance(after)}"
    )
    print(
        f"tokens per request on each rank: before {_fmt_loads(before)} -> after {_fmt_loads(after)}"
    )
    sent = sum(r["bytes_sent"] for r in rounds)
    copied = sum(r["bytes_copied"] for r in rounds)
    seconds = [r["seconds"] for r in rounds]
    print(
        f"rearrangements: {len(rounds)}, bytes moved: {_mib(sent)} over the network "
        f"(+{_mib(copied)} local copies), rearrangement time: {sum(seconds):.2f} s "
        f"({', '.join(f'{s:.2f}' for s in seconds) or 'none'})"
    )
    print(
        f"probe: {PROBE_TOKENS} tokens x {cfg.layers} layers x top-{TOP_K} through the first and "
        f"the final placement ({probe['slots_changed']} of {cfg.layers * cfg.slots} slots "
        f"changed), sha256 {probe['digest']}, max |diff| {probe['max_abs_diff']:g}"
    )
    print(f"identical: {probe['identical']}")
    ok = bool(probe["identical"])
    if not rounds or probe["slots_changed"] == 0:
        print("error: no expert moved, so the probe proves nothing; try a longer --duration")
        ok = False
    return ok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--ranks", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--layers", type=int, default=4, help="MoE layers (default 4)")
    p.add_argument("--experts", type=int, default=16, help="logical experts per layer")
    p.add_argument(
        "--slots",
        type=int,
        default=None,
        help="physical slots per layer, a multiple of --ranks (default: about 2 spare per rank)",
    )
    p.add_argument("--hidden", type=int, default=256, help="model width; expert FFN is 2x")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="rebalances during the run")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    ranks = max(a.ranks, 1)
    # Default: two redundant slots per rank, rounded up so every rank holds as many slots.
    slots = a.slots if a.slots is not None else -(-(a.experts + 2 * ranks) // ranks) * ranks
    problems = []
    if a.ranks < 1 or a.layers < 1 or a.experts < 1 or a.hidden < 1 or a.tokens < 1:
        problems.append("--ranks, --layers, --experts, --hidden and --tokens must be >= 1")
    if a.experts < TOP_K:
        problems.append(f"--experts must be at least {TOP_K} (top-{TOP_K} routing)")
    if slots < a.experts or slots % ranks:
        problems.append(f"--slots ({slots}) must be >= --experts and a multiple of --ranks")
    if a.duration <= 0 or a.rounds < 1:
        problems.append("--duration must be > 0 and --rounds >= 1")
    if a.device == "cuda" and torch.cuda.device_count() < 1:
        problems.append("--device cuda needs a CUDA GPU, found none")
    if problems:
        p.error("; ".join(problems))
    return Config(
        ranks=a.ranks,
        device=a.device,
        layers=a.layers,
        experts=a.experts,
        slots=slots,
        hidden=a.hidden,
        ffn=2 * a.hidden,
        tokens=a.tokens,
        duration=a.duration,
        rounds=a.rounds,
        seed=a.seed,
        port=_free_port(),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    expert_mib = 2 * cfg.hidden * cfg.ffn * 4 / 2**20
    print(
        f"serving {cfg.layers} MoE layers x {cfg.experts} experts in {cfg.slots} slots "
        f"({expert_mib:.2f} MiB per expert) on {cfg.ranks} {cfg.device} rank(s) for "
        f"{cfg.duration:g} s, rebalancing {cfg.rounds} time(s) while serving"
    )
    sys.stdout.flush()
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    procs: ProcessContext = start_processes(  # type: ignore[no-untyped-call]
        rank_main, args=(cfg, events), nprocs=cfg.ranks, join=False, start_method="spawn"
    )
    try:
        samples, reports = asyncio.run(_drive(cfg, procs, events))
        # The ranks have reported; they only tear down now. Bounded, so a stuck rank
        # cannot hang the demo.
        deadline = time.monotonic() + 60
        while not procs.join(timeout=1):
            if time.monotonic() > deadline:
                raise RankFailed("ranks did not exit within 60 s after reporting")
    except (RankFailed, ConnectionError) as exc:
        detail = str(exc)
        try:  # a dropped connection is a symptom; the rank's own traceback is the cause
            procs.join(timeout=10)
        except Exception as rank_exc:
            detail = str(rank_exc)
        print(f"\nerror: a rank failed: {detail}", file=sys.stderr)
        return 1
    finally:
        for proc in procs.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return 0 if summarize(cfg, samples, reports) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
