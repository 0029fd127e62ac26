"""One full expert rearrangement at model scale on N ranks, verified slot by slot.

Default scale is DeepSeek-V3: 58 MoE layers, 256 logical experts plus 32 redundant slots
(R = 288), fp8 expert weights w1/w3 [S, 2048, 7168] and w2 [S, 7168, 2048] per layer, where
S = R / ranks slots live on each rank (44 MB per slot). Each rank fills its slots with a
pattern derived from (layer, logical expert, tensor), never zero, draws a Zipf load, places
experts with ``aeplb.rebalance_experts`` (old placement), drifts the load and re-places with
``current=old`` (new placement), then runs ``await aeplb.rearrange_experts(...)`` while a
1 ms ticker runs on the same event loop. Afterwards every slot is compared byte by byte with
the pattern of the expert the new placement puts there; any mismatch exits non-zero.

GPUs (one rank per GPU, NCCL by default)::

    python benchmarks/rearrange_scale.py --json out.json

CPU ranks over Gloo, shapes divided by 16 (about 2.9 GB of expert weights in all)::

    python benchmarks/rearrange_scale.py --cpu --ranks 8 --hidden-scale 16 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import anyio
import numpy as np
import torch
import torch.distributed as dist

import aeplb
from aeplb.bench._spawn import Meeting, init_rank, ranks_wanted, run_ranks

Result = dict[str, Any]

# Per-slot tensor shapes at full scale (DeepSeek-V3: hidden 7168, MoE intermediate 2048).
FULL_SHAPES = ((2048, 7168), (2048, 7168), (7168, 2048))
# Multipliers coprime to 255: x -> (a * x + b) mod 255 is then a bijection on 0..254.
_UNITS = np.array([a for a in range(1, 255) if np.gcd(a, 255) == 1], dtype=np.int64)
_CODES = len(_UNITS) * 255  # distinct (a, b) pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="A full, verified expert rearrangement at model scale on N ranks."
    )
    p.add_argument("--cpu", action="store_true", help="CPU ranks over Gloo (no GPU needed)")
    p.add_argument("--ranks", type=int, default=0, help="ranks (default: GPUs, or 2 with --cpu)")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "nccl", "pynccl", "gloo"], help="transport"
    )
    p.add_argument("--layers", type=int, default=58, help="MoE layers (default 58)")
    p.add_argument("--experts", type=int, default=256, help="logical experts (default 256)")
    p.add_argument("--redundant", type=int, default=32, help="redundant slots (default 32)")
    p.add_argument("--groups", type=int, default=8, help="expert groups (default 8)")
    p.add_argument(
        "--nodes", type=int, default=0, help="nodes for the policy (default: ranks // 8, min 1)"
    )
    p.add_argument(
        "--hidden-scale",
        type=int,
        default=1,
        help="divide both dims of every expert tensor by this (CPU runs: 16 or more)",
    )
    p.add_argument("--dtype", default="float8_e4m3fn", help="expert dtype (default fp8 e4m3)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the load")
    p.add_argument(
        "--drift", type=float, default=0.5, help="sigma of the log-normal load drift (default 0.5)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers-in-flight", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per layer batch (s)")
    p.add_argument("--loop", default="asyncio", choices=["asyncio", "trio"], help="event loop")
    p.add_argument(
        "--prewarm",
        action="store_true",
        help="import numpy.ma before the run: np.unique imports it lazily on first use, inside "
        "aeplb's planner thread, holding the GIL (a one-off stall of the loop)",
    )
    p.add_argument("--force", action="store_true", help="skip the memory check")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)
    if args.hidden_scale < 1 or any(d % args.hidden_scale for s in FULL_SHAPES for d in s):
        p.error("--hidden-scale must divide 2048 and 7168 (1, 2, 4, ..., 1024)")
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        p.error(f"--dtype {args.dtype!r} is not a torch dtype")
    return args


def shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(r // args.hidden_scale, c // args.hidden_scale) for r, c in FULL_SHAPES]


def slot_bytes(args: argparse.Namespace) -> int:
    size = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    return sum(r * c for r, c in shapes(args)) * size


def nodes_for(args: argparse.Namespace, world: int) -> int:
    if args.nodes:
        return int(args.nodes)
    nodes = max(1, world // 8)
    return nodes if world % nodes == 0 and args.groups % nodes == 0 else 1


# --- workload: loads, placements, weight patterns -------------------------------------------


def placements(args: argparse.Namespace, world: int) -> tuple[aeplb.Placement, aeplb.Placement]:
    """Old placement from a Zipf load, new one from the drifted load; equal on every rank."""
    rng = np.random.default_rng(args.seed)
    shape = (args.layers, args.experts)
    # Per layer, a random ranking of experts; load ~ 1 / rank^s (Zipf), in tokens.
    ranking = np.argsort(rng.random(shape), axis=1)
    load = 1e6 / (ranking + 1.0) ** args.zipf
    drifted = load * np.exp(rng.normal(0.0, args.drift, shape))
    slots, nodes = args.experts + args.redundant, nodes_for(args, world)
    old = aeplb.rebalance_experts(load.round(), slots, args.groups, nodes, world)
    new = aeplb.rebalance_experts(
        drifted.round(), slots, args.groups, nodes, world, current=old.phy2log
    )
    return old, new


def _code(layer: int, expert: int, k: int) -> tuple[int, int]:
    # 7919 is coprime to _CODES, so distinct experts of one (layer, k) get distinct codes.
    code = (expert * 7919 + layer * 104729 + k * 1299709) % _CODES
    return int(_UNITS[code % len(_UNITS)]), code // len(_UNITS)


def pattern(base: torch.Tensor, layer: int, expert: int, k: int) -> torch.Tensor:
    """Bytes of tensor k of ``expert`` in ``layer``: (a * base + b) mod 255 + 1, never zero.

    ``base`` is a fixed random int32 tensor in [0, 256); two experts' patterns differ in most
    positions, so a slot holding the wrong expert (or stale, torn or zero data) is caught.
    """
    a, b = _code(layer, expert, k)
    return base.mul(a).add_(b).remainder_(255).add_(1).to(torch.uint8)


def bases(
    args: argparse.Namespace, weights: list[torch.Tensor], device: torch.device
) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    out = []
    for w in weights:
        shape = w[0].view(torch.uint8).shape
        out.append(torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(device))
    return out


# --- the 1 ms ticker --------------------------------------------------------------------------


class Ticker:
    """Sleeps 1 ms in a loop on the event loop and records how late each wake-up was."""

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []  # (wake-up time since begin(), lateness)
        self.active = False
        self.began = 0.0
        self.stop = anyio.Event()

    async def run(self) -> None:
        last = time.perf_counter()
        while not self.stop.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            if self.active:
                self.stalls.append((now - self.began, now - last - 0.001))
            last = now

    def begin(self) -> None:
        self.stalls, self.active, self.began = [], True, time.perf_counter()

    def end(self) -> Result:
        self.active = False
        s = sorted(x for _, x in self.stalls) or [0.0]
        worst = sorted(self.stalls, key=lambda ts: -ts[1])[:5]
        return {
            "max_stall_ms": s[-1] * 1e3,
            "p99_stall_ms": s[int(0.99 * (len(s) - 1))] * 1e3,
            "ticks": len(self.stalls),
            "worst_ms_at_ms": [(round(x * 1e3, 2), round(t * 1e3, 1)) for t, x in worst],
        }


# --- one rank ---------------------------------------------------------------------------------


def _slot_sets(log2phy: torch.Tensor, width: int = 0) -> torch.Tensor:
    """Each expert's slots in ascending order, -1 padded to ``width`` (order-free compare)."""
    pad = max(width, log2phy.shape[2]) - log2phy.shape[2]
    t = torch.nn.functional.pad(log2phy, (0, pad), value=-1)
    big = torch.iinfo(t.dtype).max
    t = torch.where(t < 0, big, t).sort(dim=2).values
    return torch.where(t == big, -1, t)


def _sync(device: torch.device, group: dist.ProcessGroup) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)


async def rank_main(rank: int, world: int, args: argparse.Namespace) -> Result:
    cuda = not args.cpu
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype: torch.dtype = getattr(torch, args.dtype)
    ctl = dist.new_group(backend="gloo")  # barriers and result gathering
    phases: dict[str, float] = {}

    t0 = time.perf_counter()
    old, new = placements(args, world)
    phases["policy_s"] = time.perf_counter() - t0

    slots = args.experts + args.redundant
    per_rank = slots // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    if cuda and not args.force:
        free, _ = torch.cuda.mem_get_info(device)
        need = int(per_rank * args.layers * slot_bytes(args) * 1.1) + (4 << 30)
        if need > free:
            raise MemoryError(
                f"rank {rank}: needs about {need / 2**30:.1f} GiB on {device}, "
                f"{free / 2**30:.1f} GiB free; use --hidden-scale or --layers (or --force)"
            )

    t0 = time.perf_counter()
    weights: list[list[torch.Tensor]] = []
    base: list[torch.Tensor] = []
    with torch.no_grad():
        for layer in range(args.layers):
            tensors = [
                torch.empty((per_rank, *s), dtype=dtype, device=device) for s in shapes(args)
            ]
            if not base:
                base = bases(args, tensors, device)
            for k, w in enumerate(tensors):
                for i, slot in enumerate(mine):
                    expert = int(old.phy2log[layer, slot])
                    w[i].view(torch.uint8).copy_(pattern(base[k], layer, expert, k))
            weights.append(tensors)
    phy2log = old.phy2log.clone().to(device)
    maxcnt = slots - args.experts + 1  # the most replicas one expert can have
    log2phy = torch.full((args.layers, args.experts, maxcnt), -1, dtype=torch.int64)
    log2phy[:, :, : old.log2phy.shape[2]] = old.log2phy
    log2phy = log2phy.to(device)
    logcnt = old.logcnt.clone().to(device)
    _sync(device, ctl)
    phases["fill_s"] = time.perf_counter() - t0

    comm = aeplb.create_communicator(
        args.backend, device=device if cuda else None, timeout=args.timeout
    )
    if args.prewarm:
        import numpy.ma  # noqa: F401
    ticker = Ticker()
    async with comm, anyio.create_task_group() as tg:
        tg.start_soon(ticker.run)
        ticker.begin()
        await anyio.sleep(0.5)
        idle = ticker.end()
        _sync(device, ctl)  # blocks the loop briefly; the ticker starts afresh below
        await anyio.sleep(0.01)
        ticker.begin()
        t0 = ticker.began
        commits: list[float] = []  # when each layer committed, ms since the start

        def on_layer(layer: int) -> None:
            commits.append(round((time.perf_counter() - t0) * 1e3, 1))

        stats = await aeplb.rearrange_experts(
            comm,
            weights,
            phy2log,
            new.phy2log.to(device),
            log2phy=log2phy,
            logcnt=logcnt,
            on_layer=on_layer,
            layers_in_flight=args.layers_in_flight,
            timeout=args.timeout,
        )
        if cuda:
            await anyio.to_thread.run_sync(torch.cuda.synchronize, device)
        wall = time.perf_counter() - t0
        await anyio.sleep(0.005)  # a last tick, to see a stall at the very end
        # Stalls once the first layer has committed, i.e. without the one-off setup.
        first = commits[0] / 1e3 if commits else wall
        steady = max((x for t, x in ticker.stalls if t > first), default=0.0)
        busy = ticker.end()
        busy["steady_max_stall_ms"] = steady * 1e3
        busy["first_commit_ms"] = first * 1e3
        ticker.stop.set()
    phases["rearrange_s"] = wall

    t0 = time.perf_counter()
    bad_slots: list[tuple[int, int, int, int]] = []  # (layer, slot, k, wrong bytes)
    with torch.no_grad():
        for layer, tensors in enumerate(weights):
            for k, w in enumerate(tensors):
                for i, slot in enumerate(mine):
                    want = pattern(base[k], layer, int(new.phy2log[layer, slot]), k)
                    got = w[i].view(torch.uint8)
                    if not torch.equal(got, want):
                        bad_slots.append((layer, slot, k, int((got != want).sum())))
    tables_ok = (
        torch.equal(phy2log.cpu(), new.phy2log)
        and torch.equal(_slot_sets(log2phy.cpu()), _slot_sets(new.log2phy, maxcnt))
        and torch.equal(logcnt.cpu(), new.logcnt)
    )
    phases["verify_s"] = time.perf_counter() - t0

    return {
        "rank": rank,
        "seconds": stats.seconds,
        "wall_s": wall,
        "transfer_s": stats.transfer_seconds,
        "layers": stats.layers,
        "layers_changed": stats.layers_changed,
        "layer_seconds": list(stats.layer_seconds),
        "bytes_sent": stats.bytes_sent,
        "bytes_received": stats.bytes_received,
        "bytes_copied_locally": stats.bytes_copied_locally,
        "slots_changed": int((old.phy2log[:, mine] != new.phy2log[:, mine]).sum()),
        "commit_ms": commits,
        "idle": idle,
        "busy": busy,
        "phases": phases,
        "bad_slots": bad_slots[:20],
        "bad_slot_count": len(bad_slots),
        "tables_ok": tables_ok,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "backend": comm.backend,
    }


def entry(rank: int, world: int, meeting: Meeting, args: argparse.Namespace, out: Any) -> None:
    if args.cpu:
        # Every rank shares the machine's cores: one intra-op thread each.
        torch.set_num_threads(1)
    init_rank(rank, world, meeting, cpu=args.cpu, timeout=timedelta(seconds=args.timeout + 60))
    result = anyio.run(rank_main, rank, world, args, backend=args.loop)
    gathered: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(result, gathered if rank == 0 else None, dst=0)
    if rank == 0:
        out.put(gathered)
    dist.destroy_process_group()


# --- driver -----------------------------------------------------------------------------------


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] if s else 0.0


def summarize(args: argparse.Namespace, world: int, ranks: list[Result]) -> Result:
    changed = ranks[0]["layers_changed"]
    # A layer is done when its slowest rank is; per changed layer, take the max over ranks.
    per_layer = [max(r["layer_seconds"][i] for r in ranks) for i in range(changed)]
    seconds = max(r["seconds"] for r in ranks)
    sent = sum(r["bytes_sent"] for r in ranks)
    slots = args.experts + args.redundant
    return {
        "seconds": seconds,
        "layers": ranks[0]["layers"],
        "layers_changed": changed,
        "layer_ms": {
            "median": statistics.median(per_layer) * 1e3 if per_layer else 0.0,
            "p90": _quantile(per_layer, 0.9) * 1e3,
            "max": max(per_layer, default=0.0) * 1e3,
            "min": min(per_layer, default=0.0) * 1e3,
            "sum": sum(per_layer) * 1e3,
            "per_layer": [round(x * 1e3, 3) for x in per_layer],
        },
        "bytes_sent": sent,
        "bytes_received": sum(r["bytes_received"] for r in ranks),
        "bytes_copied_locally": sum(r["bytes_copied_locally"] for r in ranks),
        "model_bytes": args.layers * slots * slot_bytes(args),
        "slots_changed": sum(r["slots_changed"] for r in ranks),
        "slots_total": args.layers * slots,
        "aggregate_GBps": sent / seconds / 1e9 if seconds else 0.0,
        "per_rank_GBps_max": max(
            max(r["bytes_sent"], r["bytes_received"]) / r["seconds"] / 1e9 for r in ranks
        ),
        "max_stall_ms": max(r["busy"]["max_stall_ms"] for r in ranks),
        "p99_stall_ms": max(r["busy"]["p99_stall_ms"] for r in ranks),
        "steady_max_stall_ms": max(r["busy"]["steady_max_stall_ms"] for r in ranks),
        "first_commit_ms": max(r["busy"]["first_commit_ms"] for r in ranks),
        "idle_max_stall_ms": max(r["idle"]["max_stall_ms"] for r in ranks),
        "idle_p99_stall_ms": max(r["idle"]["p99_stall_ms"] for r in ranks),
        "phases_s": {k: max(r["phases"][k] for r in ranks) for k in ranks[0]["phases"]},
        "bad_slots": sum(r["bad_slot_count"] for r in ranks),
        "tables_ok": all(r["tables_ok"] for r in ranks),
    }


def table(args: argparse.Namespace, world: int, s: Result, ranks: list[Result]) -> str:
    mb = 1e6
    dims = " + ".join(f"{r}x{c}" for r, c in shapes(args))
    slots = args.experts + args.redundant
    lm = s["layer_ms"]
    lines = [
        f"rearrange {args.layers} layers x {slots} slots ({args.experts} experts + "
        f"{args.redundant} redundant) on {world} ranks ({ranks[0]['device']}, "
        f"{ranks[0]['backend']}, {args.loop})",
        f"slot: {args.dtype} {dims} = {slot_bytes(args) / mb:.3f} MB; model "
        f"{s['model_bytes'] / 1e9:.2f} GB; slots changed {s['slots_changed']}/{s['slots_total']}",
        f"total {s['seconds']:.3f} s (slowest rank); layers changed {s['layers_changed']}/"
        f"{s['layers']}; per layer ms median {lm['median']:.1f} p90 {lm['p90']:.1f} "
        f"max {lm['max']:.1f}",
        f"moved {s['bytes_sent'] / 1e9:.3f} GB between ranks ({s['aggregate_GBps']:.2f} GB/s "
        f"aggregate), {s['bytes_copied_locally'] / 1e9:.3f} GB copied locally",
        f"event loop: max stall {s['max_stall_ms']:.2f} ms, p99 {s['p99_stall_ms']:.2f} ms; "
        f"after the first commit max {s['steady_max_stall_ms']:.2f} ms "
        f"(idle: max {s['idle_max_stall_ms']:.2f}, p99 {s['idle_p99_stall_ms']:.2f})",
        f"first layer committed at {s['first_commit_ms']:.0f} ms (planning, placement check, "
        "first batch)",
        "phases (s, slowest rank): "
        + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in s["phases_s"].items()),
        "",
        f"{'rank':>4}{'seconds':>9}{'xfer s':>8}{'sent MB':>10}{'recv MB':>10}{'local MB':>10}"
        f"{'stall ms':>10}{'p99 ms':>8}",
    ]
    for r in ranks:
        lines.append(
            f"{r['rank']:>4}{r['seconds']:>9.3f}{r['transfer_s']:>8.3f}"
            f"{r['bytes_sent'] / mb:>10.1f}{r['bytes_received'] / mb:>10.1f}"
            f"{r['bytes_copied_locally'] / mb:>10.1f}{r['busy']['max_stall_ms']:>10.2f}"
            f"{r['busy']['p99_stall_ms']:>8.2f}"
        )
    ok = s["bad_slots"] == 0 and s["tables_ok"]
    verdict = "OK" if ok else f"FAILED ({s['bad_slots']} bad slot tensors, tables {s['tables_ok']})"
    lines.append(
        f"verify: {verdict}: {s['slots_total']} slots x {len(FULL_SHAPES)} tensors compared "
        "byte by byte with the new placement"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = ranks_wanted(args.cpu, args.ranks)
    if world is None:
        return 2
    slots = args.experts + args.redundant
    if world < 2 or slots % world:
        print(f"needs >= 2 ranks dividing {slots} slots, got {world}", file=sys.stderr)
        return 2
    if not args.cpu and world > torch.cuda.device_count():
        print(f"{world} ranks but {torch.cuda.device_count()} GPUs", file=sys.stderr)
        return 2
    model = args.layers * slots * slot_bytes(args)
    avail = _mem_available()
    # Weights plus staging for layers in flight, plus ~0.5 GB per process for torch itself.
    need = model * 1.2 + world * (0.5e9 if args.cpu else 1.5e9)
    if args.cpu and avail is not None and need > 0.9 * avail and not args.force:
        print(
            f"needs about {need / 1e9:.1f} GB of RAM, {avail / 1e9:.1f} GB available; raise "
            "--hidden-scale or lower --layers (or --force)",
            file=sys.stderr,
        )
        return 2
    print(
        f"{world} ranks, model {model / 1e9:.2f} GB ({model / world / 1e9:.2f} GB per rank)",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    load_before = os.getloadavg()
    ranks: list[Result] | None = run_ranks(entry, world, args)
    if ranks is None:
        return 1
    summary = summarize(args, world, ranks)
    summary["run_s"] = time.perf_counter() - started
    print(table(args, world, summary, ranks), flush=True)
    if args.json:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": ranks[0]["device"],
            "host": platform.node(),
            "cpus": os.cpu_count(),
            # Other work on the machine skews CPU runs: 1-minute load average before/after.
            "loadavg_1m": [load_before[0], os.getloadavg()[0]],
            "ranks": world,
            "torch": torch.__version__,
            "aeplb": aeplb.__version__,
            "python": platform.python_version(),
            "command": shlex.join([sys.executable, *sys.argv]),
            "config": {
                **{k: v for k, v in vars(args).items() if k != "json"},
                "slots": slots,
                "nodes_used": nodes_for(args, world),
                "shapes": shapes(args),
                "slot_bytes": slot_bytes(args),
            },
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "ranks": ranks}, f, indent=1)
    return 0 if summary["bad_slots"] == 0 and summary["tables_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
