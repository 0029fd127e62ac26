"""``python -m aeplb.bench``: what it runs where, and what it keeps when something fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aeplb.bench import _workloads as wl
from aeplb.bench.__main__ import Results, parse_args, run
from aeplb.bench._driver import NCCL_BACKENDS, Step, plan

# option variants too: the backend decides, not the label
GPU_ARGS = ["--backends", "ipc,nccl,pynccl:coalesce=0,gloo,nccl:chunk_bytes=1048576"]


@pytest.mark.parametrize(("world", "gpus"), [(2, 1), (4, 2), (3, 2)])
def test_ranks_sharing_a_gpu_run_nothing_nccl(world: int, gpus: int) -> None:
    steps, left_out = plan(parse_args(GPU_ARGS), world, gpus)

    assert {s.workload.name for s in steps} >= {"eplb", "many-small", "interference"}
    for step in steps:
        assert not step.raw, step.workload.name  # raw-nccl
        assert not step.sync, step.workload.name  # ref-nccl
        assert not [v for v in step.variants if v[1] in NCCL_BACKENDS], step.workload.name
    interference = next(s for s in steps if s.interference)
    assert [v[0] for v in interference.variants] == ["ipc"]
    # said, not silent: each of them, for every workload, and why
    nccl = {(o["workload"], o["variant"]) for o in left_out if "NCCL refuses" in o["reason"]}
    for name in {s.workload.name for s in steps}:
        assert {(name, "nccl"), (name, "pynccl:coalesce=0")} <= nccl
    assert {("eplb", "raw-nccl"), ("eplb", "ref-nccl"), ("many-small", "ref-nccl")} <= nccl


def test_a_gpu_per_rank_runs_every_nccl_variant() -> None:
    steps, left_out = plan(parse_args(GPU_ARGS), 2, 2)

    eplb = next(s for s in steps if s.workload.name == "eplb")
    assert eplb.raw and eplb.sync and eplb.sync_staged
    interference = next(s for s in steps if s.interference)
    assert [v[0] for v in interference.variants] == [
        "ipc",
        "nccl",
        "pynccl:coalesce=0",
        "nccl:chunk_bytes=1048576",
    ]
    assert not [o for o in left_out if "NCCL" in o["reason"]]


def test_cpu_ranks_leave_out_interference_and_say_so() -> None:
    steps, left_out = plan(parse_args(["--cpu"]), 2, 0)

    assert not [s for s in steps if s.interference]
    assert all(s.raw for s in steps)  # raw-gloo
    assert [o["workload"] for o in left_out] == ["interference"]


def _bogus_variant_in_a_later_workload(args: Any) -> list[Step]:
    steps, _ = plan(args, 2, 0)
    # unknown option: create_communicator raises TypeError (not an AEPLBError) on every rank
    return [*steps, Step(wl.sweep([2])[0], variants=(("gloo:bogus=1", "gloo", {"bogus": 1}),))]


def test_a_failing_workload_keeps_the_rows_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bench.json"
    argv = ["--cpu", "--workloads", "sweep", "--sweep-mb", "1", "--reps", "2", "--warmup", "0"]
    args = parse_args([*argv, "--no-baselines", "--json", str(path)])

    assert run(args, 2, _bogus_variant_in_a_later_workload(args), []) == 1

    out = json.loads(path.read_text())
    measured = [(r["workload"], r["variant"]) for r in out["rows"] if "GBps" in r]
    assert measured == [("sweep-1MB", "raw-gloo"), ("sweep-1MB", "gloo")]
    [failure] = out["failures"]
    assert failure["workload"] == "sweep-2MB"
    assert failure["variant"] == "gloo:bogus=1"
    assert "TypeError" in failure["error"] and "bogus" in failure["error"]
    printed = capsys.readouterr().out
    assert "sweep-1MB" in printed and "FAILED sweep-2MB gloo:bogus=1" in printed


def _row(workload: str, variant: str) -> dict[str, Any]:
    return {"workload": workload, "variant": variant, "max_stall_ms": 0.1, "p99_stall_ms": 0.1}


def test_a_rank_that_dies_without_a_word_is_put_down_where_rank_0_was(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    results = Results(2, {}, [], str(path))
    for rank in (0, 1):
        results.take(("row", rank, _row("idle", "ticker")))
    # written as soon as every rank has reported the row, before the run ends
    assert [r["variant"] for r in json.loads(path.read_text())["rows"]] == ["ticker"]
    results.take(("at", "eplb", "pynccl"))
    results.take(("row", 0, _row("eplb", "ipc")))  # rank 1 never finished it: not merged

    results.ranks_failed([None, -11])
    results.write()

    out = json.loads(path.read_text())
    assert [r["variant"] for r in out["rows"]] == ["ticker"]
    assert out["failures"] == [
        {
            "workload": "eplb",
            "variant": "pynccl",
            "error": "rank 1 exited with code -11",
            "ranks": [1],
        }
    ]


def test_the_recorded_command_names_no_machine_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aeplb.bench.__main__ import _portable

    monkeypatch.chdir(tmp_path)
    assert _portable(str(tmp_path / "out" / "bench.json")) == "out/bench.json"
    assert _portable("/somewhere/else/bench.json") == "bench.json"
    assert _portable("--reps") == "--reps"
