"""``python -m aeplb.bench``: see ``--help``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from typing import Any

import torch

from ._driver import CPU_BACKENDS, GPU_BACKENDS, LeftOut, Step, entry, plan
from ._rank import Row
from ._spawn import RanksFailed, ranks_wanted, stream_ranks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m aeplb.bench",
        description="Bandwidth, event-loop stall and host CPU time per backend, against raw "
        "single-buffer p2p and a synchronous per-tensor baseline, in one run.",
    )
    p.add_argument("--cpu", action="store_true", help="CPU ranks over Gloo (no GPU needed)")
    p.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="ranks (default: GPUs, or 2 with --cpu); more ranks than GPUs share them",
    )
    p.add_argument(
        "--workloads",
        default="eplb,many-small,sweep,interference",
        help="eplb, many-small, sweep, interference (GPU: bf16 matmul rate during transfers)",
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma list; a variant adds options: 'nccl:chunk_bytes=16777216:coalesce=0' "
        f"(default {GPU_BACKENDS}; with --cpu {CPU_BACKENDS})",
    )
    p.add_argument("--experts", type=int, default=16, help="eplb: experts sent to each peer")
    p.add_argument("--sweep-mb", default=None, help="sweep sizes in MB (default 4..2048)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() on each rank after start-up, as tuned servers do: full collections "
        "of a large heap otherwise stop the event loop for tens of ms",
    )
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        metavar="MS",
        help="sys.setswitchinterval() on each rank, in ms (Python's default is 5): how long "
        "a thread running Python may keep the GIL from the event loop's thread",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="draw bandwidth vs message size to this PNG")
    return p.parse_args(argv)


def _merge(per_rank: list[list[Row]]) -> list[Row]:
    merged = []
    for rows in zip(*per_rank, strict=True):
        row = dict(rows[0])
        if row.get("workload") == "interference":
            # the rank whose matmuls suffered most
            worst = min(rows, key=lambda r: r.get("TFLOPs", 0.0))
            merged.append(dict(worst))
            continue
        errors = [r["error"] for r in rows if "error" in r]
        if errors or (any("times" not in r for r in rows) and "times" in row):
            row["error"] = errors[0] if errors else "failed on another rank"
            row.pop("times", None)
            merged.append(row)
            continue
        for key in ("gc_pauses_ms", "gc_queue_pauses_ms"):
            pauses = [p for r in rows for p in r.get(key, [])]
            if pauses:  # the longest collector pauses on any rank
                row[key] = sorted(pauses, key=lambda p: -p[1])[:5]
        row["max_stall_ms"] = max(r["max_stall_ms"] for r in rows)
        row["p99_stall_ms"] = max(r["p99_stall_ms"] for r in rows)
        if "times" in row:
            # the exchange is over when the slowest rank is done
            slowest = [max(ts) for ts in zip(*(r["times"] for r in rows), strict=True)]
            row["times"] = slowest
            row["seconds"] = statistics.median(slowest)
            row["GBps"] = row["bytes_per_peer"] / row["seconds"] / 1e9
            row["cpu_ms"] = max(r["cpu_ms"] for r in rows)
            row["staging_bytes"] = max(r["staging_bytes"] for r in rows)
            if "check_ms" in row:
                row["check_ms"] = max(r["check_ms"] for r in rows)
        merged.append(row)
    for row in merged:
        if "GBps" not in row:
            continue
        same = [r for r in merged if r.get("workload") == row["workload"] and "GBps" in r]
        raw = next((r for r in same if r["variant"].startswith("raw")), None)
        if raw:
            row["ratio_to_raw"] = row["GBps"] / raw["GBps"]
        ref = next((r for r in same if r["variant"] in ("ref-nccl", "ref-gloo")), None)
        if row["variant"].startswith("gloo") and row.get("device") != "cpu":
            ref = next((r for r in same if r["variant"] == "ref-gloo-staged"), ref)
        if ref and not row["variant"].startswith(("raw", "ref")):
            row["speedup_vs_sync"] = row["GBps"] / ref["GBps"]
    return merged


def _table(rows: list[Row]) -> str:
    head = f"{'workload':<14}{'variant':<34}{'MB/peer':>9}{'ms':>9}{'GB/s':>9}{'x raw':>7}"
    head += f"{'x sync':>8}{'stall ms':>10}{'queue ms':>9}{'check ms':>9}{'cpu ms':>8}"
    head += f"{'staging MB':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("workload") == "interference" and "error" not in r:
            drop = f"  drop {r['drop'] * 100:.1f}%" if "drop" in r else ""
            during = f"  ({r['GBps_during']:.0f} GB/s moving)" if "GBps_during" in r else ""
            lines.append(
                f"{'interference':<14}{r['variant'][:33]:<34}"
                f"matmul {r['TFLOPs']:.0f} TFLOP/s{drop}{during}"
            )
            continue
        if "error" in r:
            lines.append(f"{r['workload']:<14}{r['variant']:<34} FAILED: {r['error'][:60]}")
            continue
        if "GBps" not in r:
            lines.append(f"{r['workload']:<14}{r['variant']:<34}{'':>42}{r['max_stall_ms']:>10.2f}")
            continue
        lines.append(
            f"{r['workload']:<14}{r['variant'][:33]:<34}{r['bytes_per_peer'] / 2**20:>9.1f}"
            f"{r['seconds'] * 1e3:>9.2f}{r['GBps']:>9.2f}"
            f"{r.get('ratio_to_raw', float('nan')):>7.2f}"
            f"{r.get('speedup_vs_sync', float('nan')):>8.2f}"
            f"{r['max_stall_ms']:>10.2f}{r.get('queue_ms', float('nan')):>9.2f}"
            f"{r.get('check_ms', float('nan')):>9.2f}"
            f"{r['cpu_ms']:>8.1f}{r['staging_bytes'] / 2**20:>11.0f}"
        )
    return "\n".join(lines)


def _plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(
            f"--plot needs matplotlib (pip install matplotlib); {path} not drawn", file=sys.stderr
        )
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sweep = [r for r in rows if r.get("workload", "").startswith("sweep") and "GBps" in r]
    for variant in sorted({r["variant"] for r in sweep}):
        pts = sorted((r["bytes_per_peer"], r["GBps"]) for r in sweep if r["variant"] == variant)
        ax.plot([b / 2**20 for b, _ in pts], [g for _, g in pts], marker="o", label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size per peer and direction (MB)")
    ax.set_ylabel("GB/s per direction")
    ax.set_title("aeplb bandwidth vs message size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    version = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


class Results:
    """What the ranks have reported so far, written to ``path`` (if any) whenever another
    row is in from every rank, so that a failure later in the run loses nothing measured."""

    def __init__(
        self, world: int, meta: dict[str, Any], left_out: list[LeftOut], path: str | None
    ) -> None:
        self.meta, self.left_out, self.path = meta, left_out, path
        self.per_rank: list[list[Row]] = [[] for _ in range(world)]
        self.crashes: list[dict[str, Any]] = []
        self._at = ("start-up", "")

    def take(self, message: tuple[Any, ...]) -> None:
        """One message from a rank (see ``_driver._Reporter``)."""
        kind, *rest = message
        if kind == "row":
            rank, row = rest
            self.per_rank[rank].append(row)
            if len(self.per_rank[rank]) == self._complete():
                self.write()
        elif kind == "at":
            self._at = (rest[0], rest[1])
        elif kind == "failed":
            self._crash(*rest)

    def ranks_failed(self, codes: list[int | None]) -> None:
        """Ranks that exited with an error; those that did not say why (killed, or dead in C
        code) are put down where rank 0 last was."""
        told = {rank for c in self.crashes for rank in c["ranks"]}
        for rank, code in enumerate(codes):
            if code not in (None, 0) and rank not in told:
                self._crash(rank, *self._at, f"rank {rank} exited with code {code}")

    def rows(self) -> list[Row]:
        """The merged rows every rank has reported."""
        n = self._complete()
        return _merge([rows[:n] for rows in self.per_rank])

    def failures(self) -> list[dict[str, Any]]:
        """Variants that failed and went on (their rows), then what stopped the run."""
        failed = [
            {"workload": r["workload"], "variant": r["variant"], "error": r["error"]}
            for r in self.rows()
            if "error" in r
        ]
        return failed + self.crashes

    def write(self) -> None:
        if not self.path:
            return
        out = {
            "meta": self.meta,
            "rows": self.rows(),
            "left_out": self.left_out,
            "failures": self.failures(),
        }
        # a run killed mid-write leaves the last complete file, not half of one
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, self.path)

    def _complete(self) -> int:
        return min(len(rows) for rows in self.per_rank)

    def _crash(self, rank: int, workload: str, variant: str, error: str) -> None:
        for c in self.crashes:  # every rank tends to fail alike: one entry for all of them
            if (c["workload"], c["variant"], c["error"]) == (workload, variant, error):
                c["ranks"] = sorted([*c["ranks"], rank])
                return
        self.crashes.append(
            {"workload": workload, "variant": variant, "error": error, "ranks": [rank]}
        )


def _left_out_lines(left_out: list[LeftOut]) -> list[str]:
    """One line per reason: which variants it left out, of which workloads."""
    by_reason: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for item in left_out:
        names, workloads = by_reason.setdefault(item["reason"], ({}, {}))
        if item["variant"]:
            names[item["variant"]] = None
        workloads[item["workload"]] = None
    lines = []
    for reason, (names, workloads) in by_reason.items():
        what = f"{', '.join(names)} in " if names else ""
        lines.append(f"left out {what}{', '.join(workloads)}: {reason}")
    return lines


def _show(results: Results) -> None:
    rows = results.rows()
    print(_table(rows))
    for r in rows:
        if "phases_ms" in r:
            parts = "  ".join(f"{k} {v:.2f}" for k, v in r["phases_ms"].items())
            print(f"phases (ms, rank 0) {r['workload']} {r['variant']}: {parts}")
    for r in rows:
        for key, where in (("gc_pauses_ms", "execute()"), ("gc_queue_pauses_ms", "queueing")):
            if r.get(key):
                parts = "  ".join(f"gen{g} {ms:.1f}" for g, ms in r[key])
                label = f"{r['workload']} {r['variant']}"
                print(f"gc pauses in {where} (ms, any rank) {label}: {parts}")
    for line in _left_out_lines(results.left_out):
        print(line)
    for c in results.crashes:
        ranks = ", ".join(map(str, c["ranks"]))
        print(f"FAILED {c['workload']} {c['variant']} (rank {ranks}): {c['error']}")
    if results.crashes:
        print("the run stopped there: the rows above are what was measured before it")


def _portable(arg: str) -> str:
    """An argument as another machine could give it: paths relative to the working
    directory, and a file elsewhere (an output folder) by its name alone."""
    if not os.path.isabs(arg):
        return arg
    relative = os.path.relpath(arg)
    return os.path.basename(arg) if relative.startswith("..") else relative


def _meta(args: argparse.Namespace, world: int) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
        "ranks": world,
        "torch": torch.__version__,
        "nccl": _nccl_version(),
        "argv": ["python", "-m", "aeplb.bench", *map(_portable, sys.argv[1:])],
        "reps": args.reps,
        "gc_freeze": args.gc_freeze,
        "switch_interval_ms": args.switch_interval,
    }


def run(args: argparse.Namespace, world: int, steps: list[Step], left_out: list[LeftOut]) -> int:
    """Runs ``steps`` on ``world`` spawned ranks, then prints, writes (``--json``, also as the
    rows come in) and draws what they measured, a failure or not; 1 if anything failed."""
    for line in _left_out_lines(left_out):
        print(line, file=sys.stderr)
    results = Results(world, _meta(args, world), left_out, args.json)
    try:
        for message in stream_ranks(entry, world, (args, steps)):
            results.take(message)
    except RanksFailed as exc:
        results.ranks_failed(exc.codes)
    finally:
        results.write()
    _show(results)
    if args.plot:
        _plot(results.rows(), args.plot)
    return 1 if results.failures() else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = ranks_wanted(args.cpu, args.ranks)
    if world is None:
        return 2
    if world < 2:
        print("needs at least 2 ranks (2 GPUs, --ranks 2 on one GPU, or --cpu)", file=sys.stderr)
        return 2
    steps, left_out = plan(args, world, 0 if args.cpu else torch.cuda.device_count())
    return run(args, world, steps, left_out)


if __name__ == "__main__":
    raise SystemExit(main())
