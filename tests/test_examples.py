"""The examples run end to end, as a user would start them (a subprocess per run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO = EXAMPLES / "serve_while_rebalancing.py"

# Small enough for a 2-core CI machine: startup (importing torch on every rank) dominates.
SMALL = ["--layers", "3", "--experts", "8", "--hidden", "64", "--tokens", "32", "--duration", "3"]

SUMMARY_LINES = (
    "== summary ==",
    "requests served:",
    "latency idle: p50",
    "latency during rearrangement:",
    "load imbalance (max/mean tokens per rank): before",
    "bytes moved:",
    "probe:",
    "identical: True",
)


def _run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.mark.timeout(120)
def test_serve_while_rebalancing_two_ranks() -> None:
    proc = _run(*SMALL)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for line in SUMMARY_LINES:
        assert line in proc.stdout, f"missing {line!r} in:\n{output}"
    # The progress bar was drawn and each rearrangement reported what it moved. Rounds are
    # timed, so on a starved machine the stop may overtake the second one.
    assert "rebalance 1/2 [" in proc.stdout
    assert "rebalance 1/2: " in proc.stdout
    assert re.search(r"rearrangements: [12], bytes moved: \d", proc.stdout), output


@pytest.mark.timeout(120)
def test_serve_while_rebalancing_three_ranks() -> None:
    # An odd world size (the default slot count is rounded up to a multiple of it) and a
    # single rebalance.
    proc = _run(*SMALL, "--ranks", "3", "--rounds", "1")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "identical: True" in proc.stdout, output
    assert "rearrangements: 1, bytes moved:" in proc.stdout, output


def test_bad_arguments_exit_nonzero() -> None:
    proc = _run("--ranks", "3", "--experts", "8", "--slots", "10", timeout=60)
    assert proc.returncode != 0
    assert "multiple of --ranks" in proc.stderr
