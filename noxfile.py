"""Sessions: tests, lint, typecheck, demo, bench, soak, tests_gpu (opt-in, needs GPUs)."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

# Pinned so a CPU machine gets a CPU build quickly; set AEPLB_TORCH to pick another build.
TORCH = os.environ.get("AEPLB_TORCH", "torch==2.13.0")
PYTHON = None  # the interpreter nox runs under


def _install(session: nox.Session, extra: str = "test") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extra}]")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The CPU suite: real Gloo ranks on loopback; GPU tests are skipped."""
    _install(session)
    session.run("pytest", "-q", "-m", "not gpu and not slow", *session.posargs)


@nox.session(python=PYTHON)
def tests_gpu(session: nox.Session) -> None:
    """GPU tests only; fails instead of skipping when GPUs are missing."""
    _install(session)
    session.run("pytest", "-q", "-m", "gpu", *session.posargs, env={"AEPLB_REQUIRE_GPU": "1"})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    _install(session)
    session.install("mypy>=1.11")
    session.run("mypy", "aeplb")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Serve requests on every rank while the experts are rebalanced (2 CPU ranks)."""
    _install(session)
    session.run("python", "examples/serve_while_rebalancing.py", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Bandwidth and event-loop stall per backend (one rank per GPU, or --cpu)."""
    _install(session)
    session.run("python", "-m", "aeplb.bench", *(session.posargs or ["--cpu"]))


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """The full soak: >= 10,000 random batches on 2 and 4 CPU ranks, every byte checked."""
    _install(session)
    session.run("pytest", "-q", "-m", "slow", "tests/test_soak.py", *session.posargs)
