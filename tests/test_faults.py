"""Real faults on CPU ranks over Gloo: a killed peer, a stopped peer, a cut network link.

Every live rank must end its batch with BrokenCommunicatorError or TransferTimeoutError
within the deadline plus a small margin, never hang. Afterwards the survivors form a new
Gloo group among themselves (``dist.new_group(survivors, use_local_synchronization=True)``:
the dead or stopped rank takes no part) and a fresh communicator on it moves verified data.
The victim is never rank 0, which hosts the rendezvous store that new groups need.

Ranks come from :class:`ForkedPool`: forked from a server that has torch imported already, so
the respawn after every fault costs a fraction of a second instead of a full interpreter start.
The network cut runs two rank processes in separate network namespaces joined by a veth pair
(root only; skipped with the reason where ``ip`` or the kernel refuses).
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torch.distributed as dist

import aeplb

from .multirank import RankPool, free_port
from .payloads import assert_same, payload, poisoned, seed_of

# Deadline given to the faulted batch, and how far past it an error may arrive (scheduling
# on a loaded 2-core machine; the communicator's own grace for a stuck worker is 2 s more).
DEADLINE = 2.0
MARGIN = 1.0
# Bytes per direction per peer: large enough that the fault lands while data is moving
# (loopback Gloo moves a few hundred MB/s per connection here).
BIG = 256 << 20
PIECE = 8 << 20  # the Gloo transport's default chunk_bytes

LIVE_ERRORS = (aeplb.BrokenCommunicatorError, aeplb.TransferTimeoutError)
REPO = Path(__file__).resolve().parents[1]


class ForkedPool(RankPool):
    """A RankPool whose ranks are forked from a server with torch already imported."""

    _PRELOAD = ("torch", "torch.distributed", "anyio", "trio", "aeplb", "tests.multirank")

    def __init__(self, world_size: int, preload: tuple[str, ...] = ()) -> None:
        super().__init__(world_size)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([*self._PRELOAD, *preload])  # used when the server starts
        self._ctx = ctx  # type: ignore[assignment]


@pytest.fixture(scope="module")
def world3() -> Iterator[ForkedPool]:
    pool = ForkedPool(3, preload=(__name__,))
    yield pool
    pool.kill()


# -- rank functions (module level so the ranks can import them) -------------------------


def _exchange_ops(comm: aeplb.Communicator, salt: int) -> list[tuple[torch.Tensor, int]]:
    me, world = comm.rank, comm.world_size
    expected = []
    for peer in range(world):
        comm.add_send(payload(seed_of(me, peer, 0, salt), (1000 + me,)), peer)
        buf = poisoned((1000 + peer,))
        comm.add_recv(buf, peer)
        expected.append((buf, seed_of(peer, me, 0, salt)))
    return expected


async def _verified_exchange(group: dist.ProcessGroup, salt: int) -> bool:
    """A fresh communicator on ``group``: every member exchanges checked data with all."""
    async with aeplb.create_communicator("gloo", group=group, timeout=30) as comm:
        expected = _exchange_ops(comm, salt)
        await comm.execute()
        for buf, seed in expected:
            assert_same(buf, payload(seed, (buf.numel(),)), f"after the fault, seed {seed}")
        return comm.statistics().batches_completed == 1


def _check_broken(comm: aeplb.Communicator, peer: int) -> None:
    stats = comm.statistics()
    assert stats.broken and stats.batches_failed == 1 and stats.in_flight == 0, stats
    assert isinstance(stats.last_error, LIVE_ERRORS), stats
    with pytest.raises(aeplb.BrokenCommunicatorError):
        comm.add_send(torch.ones(1), peer)


def _big_batch(comm: aeplb.Communicator, rank: int, world: int) -> dict[int, torch.Tensor]:
    out = torch.ones(BIG // 4)
    bufs = {}
    for peer in range(world):
        if peer != rank:
            comm.add_send(out, peer)
            bufs[peer] = torch.zeros(BIG // 4)
            comm.add_recv(bufs[peer], peer)
    return bufs


def _pieces(buf: torch.Tensor) -> str:
    """How many of the peer's pieces had landed when the batch ended."""
    first = buf.view(-1, PIECE // 4)[:, 0]
    return f"{int((first == 1).sum())}/{first.numel()}"


def _fault(rank: int, victim: int, fault: str, flag_dir: str) -> None:
    """Runs on the victim while its batch is on the wire."""
    Path(flag_dir, "ready").write_text(repr(time.time()))  # the test signals from outside
    if fault == "kill-self":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "stop-self":
        os.kill(os.getpid(), signal.SIGSTOP)


async def faulted_peer(
    rank: int, world: int, fault: str, victim: int, flag_dir: str, check_peers: bool
) -> dict[str, Any]:
    """Every rank exchanges BIG bytes with every other; ``victim`` fails mid-transfer.

    ``fault``: "kill-self" / "stop-self" (the victim signals itself) or "outside" (the
    test process signals the victim when it sees the flag file).
    """
    comm = aeplb.create_communicator("gloo", timeout=DEADLINE, check_peers=check_peers)
    bufs = _big_batch(comm, rank, world)
    result: dict[str, Any] = {"error": None}

    async def run() -> None:
        started = time.monotonic()
        try:
            await comm.execute()
        except LIVE_ERRORS as exc:
            result.update(
                error=type(exc).__name__,
                cause=str(exc.__cause__)[:80],
                elapsed=time.monotonic() - started,
                at=time.time(),
            )

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.sleep(0.05)  # the batch is on the wire
        if rank == victim:
            assert comm.statistics().in_flight == 1, "the transfer ended before the fault"
            _fault(rank, victim, fault, flag_dir)
            await anyio.sleep(60)  # stopped or killed meanwhile
    result["pieces_from_victim"] = _pieces(bufs[victim])
    if result["error"] is not None:
        _check_broken(comm, victim)
        await comm.aclose()
        survivors = [r for r in range(world) if r != victim]
        group = dist.new_group(survivors, backend="gloo", use_local_synchronization=True)
        result["recovered"] = await _verified_exchange(group, salt=3)
    return result


def faulted_peer_blocking(
    rank: int, world: int, fault: str, victim: int, flag_dir: str, check_peers: bool
) -> dict[str, Any]:
    """The same through the blocking facade (no event loop), victim faulting from a thread."""
    comm = aeplb.create_communicator("gloo", timeout=DEADLINE, check_peers=check_peers)
    bufs = _big_batch(comm, rank, world)
    if rank == victim:
        threading.Timer(0.05, _fault, (rank, victim, fault, flag_dir)).start()
    result: dict[str, Any] = {"error": None}
    started = time.monotonic()
    try:
        comm.blocking().execute()
    except LIVE_ERRORS as exc:
        elapsed = time.monotonic() - started
        result.update(error=type(exc).__name__, elapsed=elapsed, at=time.time())
    assert rank != victim, "the victim's batch ended before its fault"
    result["pieces_from_victim"] = _pieces(bufs[victim])
    if result["error"] is not None:
        _check_broken(comm, victim)
        anyio.run(comm.aclose)
        survivors = [r for r in range(world) if r != victim]
        group = dist.new_group(survivors, backend="gloo", use_local_synchronization=True)
        result["recovered"] = anyio.run(_verified_exchange, group, 4)
    return result


# -- helpers for the test process -----------------------------------------------------------


class _Signaller(threading.Thread):
    """Signals ``pid`` when the victim writes its flag; a stopped victim is ended later."""

    def __init__(self, pid: int, flag: Path, sig: signal.Signals | None, end_after: float):
        super().__init__(daemon=True)
        self.pid, self.flag, self.sig, self.end_after = pid, flag, sig, end_after
        self.stop = threading.Event()
        self.fault_at: float | None = None

    def run(self) -> None:
        while not self.stop.is_set() and not self.flag.exists():
            time.sleep(0.001)
        if self.stop.is_set():
            return
        if self.sig is not None:
            os.kill(self.pid, self.sig)
            self.fault_at = time.time()
        else:
            time.sleep(0.01)  # the victim signals itself right after writing the flag
            self.fault_at = float(self.flag.read_text())
        # A stopped rank never answers: end it once the survivors had time to notice.
        if not self.stop.wait(self.end_after):
            _end(self.pid)


def _end(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def _check_live(
    results: list[dict[str, Any] | None], victim: int, fault_at: float, expect: str
) -> list[float]:
    """Every live rank failed in time with the typed error, then recovered; detection times."""
    assert results[victim] is None, "the victim must not answer"
    detect = []
    for rank, r in enumerate(results):
        if rank == victim:
            continue
        assert r is not None, f"live rank {rank} did not answer: a hang"
        assert r["error"] == expect, (rank, r)
        assert r["elapsed"] <= DEADLINE + MARGIN, (rank, r)
        if expect == "TransferTimeoutError":
            assert r["elapsed"] >= DEADLINE - 0.05, (rank, r)
        assert r["recovered"], (rank, r)
        detect.append(round(r["at"] - fault_at, 3))
    return detect


FAULTS = [
    # fault, signal sent from the test process, API, check_peers, error every live rank sees
    ("kill-self", None, "asyncio", True, "BrokenCommunicatorError"),
    ("outside", signal.SIGKILL, "trio", False, "BrokenCommunicatorError"),
    ("kill-self", None, "sync", True, "BrokenCommunicatorError"),
    ("stop-self", None, "trio", True, "TransferTimeoutError"),
    ("outside", signal.SIGSTOP, "asyncio", False, "TransferTimeoutError"),
    ("stop-self", None, "sync", False, "TransferTimeoutError"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fault", "sig", "api", "check_peers", "expect"),
    FAULTS,
    ids=[f"{f}-{s.name if s else 'self'}-{a}-check{int(c)}" for f, s, a, c, _ in FAULTS],
)
def test_peer_fault_mid_transfer(
    world3: ForkedPool,
    tmp_path: Path,
    fault: str,
    sig: signal.Signals | None,
    api: str,
    check_peers: bool,
    expect: str,
) -> None:
    world3._ensure()
    victim = 2
    pid = world3.pids[victim]
    signaller = _Signaller(pid, tmp_path / "ready", sig, DEADLINE + MARGIN + 1)
    signaller.start()
    fn = faulted_peer_blocking if api == "sync" else faulted_peer
    try:
        results = world3.run(
            fn,
            fault,
            victim,
            str(tmp_path),
            check_peers,
            backend=api,
            timeout=30,
            pg_timeout=30,
            allow_dead=True,
        )
    finally:
        signaller.stop.set()
        _end(pid)
    assert signaller.fault_at is not None, "the victim never reached its fault"
    detect = _check_live(results, victim, signaller.fault_at, expect)
    pieces = [r["pieces_from_victim"] for r in results if r is not None]
    print(f"\n{fault}/{api}: {expect} {detect} s after the fault; pieces landed {pieces}")


# -- a network cut between two network namespaces ------------------------------------------


class NetnsPair:
    """Two network namespaces joined by a veth pair; removed again on close."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns = (f"aeplb{tag}a", f"aeplb{tag}b")
        self.dev = (f"aeplb{tag}a", f"aeplb{tag}b")  # interface names: at most 15 chars
        self.addr = ("10.231.7.1", "10.231.7.2")

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)

    def _tc(self, *args: str) -> None:
        subprocess.run(["tc", *args], check=True, capture_output=True, text=True, timeout=10)

    def create(self) -> None:
        self.close()
        for ns in self.ns:
            self._ip("netns", "add", ns)
        self._ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for ns, dev, addr in zip(self.ns, self.dev, self.addr, strict=True):
            self._ip("link", "set", dev, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, how: str) -> None:
        if how == "link-down":  # the carrier drops on both ends
            self._ip("-n", self.ns[0], "link", "set", self.dev[0], "down")
        else:  # silent loss both ways; the link stays up
            for ns, dev in zip(self.ns, self.dev, strict=True):
                self._tc("-n", ns, "qdisc", "add", "dev", dev, "root", "blackhole")

    def restore(self, how: str) -> None:
        if how == "link-down":
            self._ip("-n", self.ns[0], "link", "set", self.dev[0], "up")
        else:
            for ns, dev in zip(self.ns, self.dev, strict=True):
                self._tc("-n", ns, "qdisc", "del", "dev", dev, "root")

    def close(self) -> None:
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        for dev in self.dev:  # the veth goes with its namespace, but asynchronously
            subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[NetnsPair]:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("network namespaces need root on Linux")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` (iproute2) is not installed")
    pair = NetnsPair()
    try:
        pair.create()
    except subprocess.CalledProcessError as exc:
        pair.close()
        pytest.skip(f"the kernel refused a netns/veth setup: {' '.join(exc.cmd)}: {exc.stderr}")
    try:
        yield pair
    finally:
        pair.close()


async def _netns_rank(rank: int, master: str, port: int, flags: Path) -> dict[str, Any]:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master}:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    comm = aeplb.create_communicator("gloo", timeout=DEADLINE)
    bufs = _big_batch(comm, rank, 2)
    result: dict[str, Any] = {"rank": rank, "error": None}

    async def run() -> None:
        started = time.monotonic()
        try:
            await comm.execute()
        except LIVE_ERRORS as exc:
            result.update(
                error=type(exc).__name__, elapsed=time.monotonic() - started, at=time.time()
            )

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.sleep(0.05)
        if rank == 0:
            assert comm.statistics().in_flight == 1, "the transfer ended before the cut"
            (flags / "ready").write_text("")
    result["pieces_from_peer"] = _pieces(bufs[1 - rank])
    (flags / f"failed{rank}").write_text("")
    if result["error"] is not None:
        _check_broken(comm, 1 - rank)
        await comm.aclose()
        while not (flags / "restored").exists():
            await anyio.sleep(0.01)
        started = time.monotonic()
        group = dist.new_group([0, 1], backend="gloo", use_local_synchronization=True)
        result["recovered"] = await _verified_exchange(group, salt=5)
        result["recover_s"] = time.monotonic() - started
    return result


def _netns_main(argv: list[str]) -> None:
    rank, master, port, flags = int(argv[0]), argv[1], int(argv[2]), Path(argv[3])
    try:
        result = anyio.run(_netns_rank, rank, master, port, flags)
    except BaseException as exc:
        result = {"rank": rank, "crash": repr(exc)}
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the old group still has abandoned Gloo ops; do not wait on them


def _wait_for(path: Path, procs: list[subprocess.Popen[str]], limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if any(p.poll() is not None for p in procs):
            return False
        time.sleep(0.001)
    return False


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["link-down", "blackhole"])
def test_network_cut_between_namespaces(netns: NetnsPair, tmp_path: Path, how: str) -> None:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": netns.dev[rank], "OMP_NUM_THREADS": "1"}
        cmd = ["ip", "netns", "exec", netns.ns[rank], sys.executable, "-m", "tests.test_faults"]
        cmd += [str(rank), netns.addr[0], str(port), str(tmp_path)]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        assert _wait_for(tmp_path / "ready", procs, 60), "the ranks never started the transfer"
        netns.cut(how)
        cut_at = time.time()
        for rank in range(2):
            assert _wait_for(tmp_path / f"failed{rank}", procs, DEADLINE + MARGIN + 5)
        netns.restore(how)
        (tmp_path / "restored").write_text("")
        outputs = [p.communicate(timeout=30)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, out[-3000:]
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    for r in results:
        assert "crash" not in r, r
        assert r["error"] in ("TransferTimeoutError", "BrokenCommunicatorError"), r
        assert r["elapsed"] <= DEADLINE + MARGIN, r
        assert r["recovered"], r
    detect = [round(r["at"] - cut_at, 3) for r in results]
    print(f"\ncut ({how}): {[r['error'] for r in results]} {detect} s after the cut; {results}")


if __name__ == "__main__":
    _netns_main(sys.argv[1:])
