"""CUDA transports on real GPUs: one rank per GPU, NCCL and Gloo process groups.

Skipped without two GPUs; AEPLB_REQUIRE_GPU=1 turns the skips into failures.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import aeplb

from .conftest import require_gpu
from .multirank import RankPool
from .payloads import payload, seed_of
from .ticker import Ticker

pytestmark = pytest.mark.gpu

BACKENDS = ["ipc", "nccl", "pynccl", "gloo"]
PG = "cpu:gloo,cuda:nccl"
FP8 = getattr(torch, "float8_e4m3fn", torch.uint8)


def gpu_payload(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype == FP8 and dtype != torch.uint8:
        return payload(seed, shape, torch.float32, "cuda").to(dtype)
    return payload(seed, shape, dtype, "cuda")


def same_bytes(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    a = got.contiguous().view(-1).view(torch.uint8).cpu()
    b = want.contiguous().view(-1).view(torch.uint8).cpu()
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        raise AssertionError(f"{what}: {bad.numel()} of {a.numel()} bytes differ")


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device="cuda")


# NCCL refuses two ranks of one communicator on one GPU; these backends share one fine, so
# a machine with a single GPU runs their tests with both ranks on it.
SHARE_A_GPU = frozenset({"ipc", "gloo"})


@pytest.fixture
def gpus2(world2: RankPool, request: pytest.FixtureRequest) -> RankPool:
    """Two ranks, on two GPUs where there are two; on one for backends that share it."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    shares = backend in SHARE_A_GPU or request.node.get_closest_marker("shares_a_gpu")
    require_gpu(1 if shares else 2)
    return world2


# -- rank functions -------------------------------------------------------------------


async def swap(
    comm: aeplb.Communicator, rank: int, peer: int, specs: list[tuple[tuple[int, ...], torch.dtype]]
) -> aeplb.TransferStats:
    """Sends ``peer`` a payload per (shape, dtype) and receives as many from it, in one batch
    with whatever else is queued; checks every byte received."""
    bufs = []
    for i, (shape, dtype) in enumerate(specs):
        comm.add_send(gpu_payload(seed_of(rank, peer, i), shape, dtype), peer)
        bufs.append(poisoned(shape, dtype))
        comm.add_recv(bufs[-1], peer)
    stats = await comm.execute()
    for i, (buf, (shape, dtype)) in enumerate(zip(bufs, specs, strict=True)):
        same_bytes(buf, gpu_payload(seed_of(peer, rank, i), shape, dtype), f"tensor {i}")
    return stats


async def exchange(
    rank: int,
    world: int,
    backend: str,
    dtype_name: str,
    layout: str,
    options: dict[str, object] | None = None,
) -> float:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": FP8, "u8": torch.uint8}[
        dtype_name
    ]
    peer = 1 - rank
    shapes = [(32 << 20,)] if layout == "one-large" else [(1000 + 37 * i,) for i in range(150)]
    async with aeplb.create_communicator(backend, timeout=120, **(options or {})) as comm:
        assert comm.backend == backend
        # a self-send rides along: a device copy, never a network op
        mine = gpu_payload(seed_of(rank, rank, 0), (4097,), dtype)
        got_mine = poisoned((4097,), dtype)
        comm.add_send(mine, rank)
        comm.add_recv(got_mine, rank)
        stats = await swap(comm, rank, peer, [(shape, dtype) for shape in shapes])
        same_bytes(got_mine, mine, "self-send")
        assert stats.num_copies == 1
        return stats.seconds


def _shapes(layout: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    if layout == "one-dtype-many":  # packed without a byte view per tensor
        return [((1 + i % 13, 3 + i % 7), torch.bfloat16) for i in range(400)]
    if layout == "one-dtype-1d":  # ... and unpacked by one split_with_sizes_copy
        return [((1 + (37 * i) % 3001,), torch.uint8) for i in range(400)]
    dtypes = [torch.float32, torch.bfloat16, FP8, torch.int64]  # mixed: a view per tensor
    return [((5 + i % 11, 1 + i % 3), dtypes[i % 4]) for i in range(300)]


async def packing(rank: int, world: int, backend: str, layout: str, options: dict[str, Any]) -> int:
    """Pieces that start and end inside tensors, in both packing paths, checked byte by byte;
    returns the staging memory used."""
    peer = 1 - rank
    async with aeplb.create_communicator(backend, timeout=120, **options) as comm:
        if layout == "views-of-one":
            # back-to-back slices of one tensor each way: sent in place, no staging
            src = gpu_payload(seed_of(rank, peer, 0), (3 << 20,), torch.bfloat16)
            dst = poisoned((3 << 20,), torch.bfloat16)
            cuts = [0, 1000, 5000, 1 << 20, (3 << 20) - 7, 3 << 20]
            for a, b in itertools.pairwise(cuts):
                comm.add_send(src[a:b], peer)
                comm.add_recv(dst[a:b], peer)
            await comm.execute()
            same_bytes(dst, gpu_payload(seed_of(peer, rank, 0), (3 << 20,), torch.bfloat16))
        else:
            for _ in range(2):  # the second batch reuses the staging slots
                await swap(comm, rank, peer, _shapes(layout))
        return int(comm._transport.staging_bytes)  # type: ignore[attr-defined]


async def gloo_lanes(rank: int, world: int) -> int:
    """Staged pieces cycle through the two slots of each (direction, stripe) lane, with CPU
    tensors (sent in place) in the same streams; returns the pinned memory held."""
    peer = 1 - rank
    chunk = 64 << 10
    options = {"stripes": 3, "chunk_bytes": chunk, "staging_bytes": 12 * chunk}
    async with aeplb.create_communicator("gloo", timeout=120, **options) as comm:
        for batch in range(2):  # the second batch reuses the slots
            specs = [(3000 + 4099 * i, FP8 if i % 3 else torch.float32) for i in range(40)]
            sent, bufs = [], []
            for i, (n, dtype) in enumerate(specs):
                where = "cpu" if i % 7 == 3 else "cuda"
                seed = seed_of(rank, peer, 100 * batch + i)
                sent.append(gpu_payload(seed, (n,), dtype).to(where))
                comm.add_send(sent[-1], peer)
                bufs.append(torch.zeros(n, dtype=dtype, device=where))
                comm.add_recv(bufs[-1], peer)
            await comm.execute()
            for i, (n, dtype) in enumerate(specs):
                want = gpu_payload(seed_of(peer, rank, 100 * batch + i), (n,), dtype)
                same_bytes(bufs[i], want, f"batch {batch} tensor {i}")
        return int(comm._transport.staging_bytes)  # type: ignore[attr-defined]


async def stream_ordering(rank: int, world: int, backend: str) -> None:
    """A kernel writes the send tensor on the caller's stream right before execute()."""
    peer = 1 - rank
    n = 8 << 20
    async with aeplb.create_communicator(backend, timeout=120) as comm:
        src = gpu_payload(seed_of(rank, peer, 0), (n,), torch.float32)
        out = torch.zeros(n, device="cuda")
        torch.cuda._sleep(200_000_000)  # keep the caller's stream busy (~0.1 s)
        out.copy_(src)  # queued behind the sleep: the transfer must wait for it
        buf = poisoned((n,), torch.float32)
        comm.add_send(out, peer)
        comm.add_recv(buf, peer)
        await comm.execute()
        # execute() returned: the data is visible to any stream without a synchronize
        other = torch.cuda.Stream()
        with torch.cuda.stream(other):
            check = buf.clone()
        other.synchronize()
        same_bytes(check, gpu_payload(seed_of(peer, rank, 0), (n,), torch.float32))


async def allocator_reuse(rank: int, world: int, backend: str) -> None:
    """Tensors the caller drops while the transfer is queued are not handed out again."""
    peer = 1 - rank
    n = 16 << 20
    async with aeplb.create_communicator(backend, timeout=120) as comm:
        keep = poisoned((n,), torch.float32)
        torch.cuda._sleep(200_000_000)  # the transfer waits for this on the caller's stream
        send = gpu_payload(seed_of(rank, peer, 0), (n,), torch.float32)
        comm.add_send(send, peer)
        comm.add_recv(keep, peer)
        async with anyio.create_task_group() as tg:
            tg.start_soon(comm.execute)
            await anyio.lowlevel.checkpoint()
            del send  # the caller frees it while the transfer is in flight
            # the allocator would hand the freed block to this tensor on the same stream
            garbage = [torch.full((n,), -1.0, device="cuda") for _ in range(4)]
        del garbage
        same_bytes(keep, gpu_payload(seed_of(peer, rank, 0), (n,), torch.float32))


async def loop_stall(rank: int, world: int, backend: str, nbytes: int) -> dict[str, float]:
    peer = 1 - rank
    n = nbytes // 2
    async with aeplb.create_communicator(backend, timeout=300) as comm:
        src = gpu_payload(seed_of(rank, peer, 0), (n,), torch.bfloat16)
        buf = poisoned((n,), torch.bfloat16)
        comm.add_send(src, peer)
        comm.add_recv(buf, peer)
        ticker = Ticker()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await anyio.sleep(0.02)
            stats = await comm.execute()
            ticker.done = True
        same_bytes(buf, gpu_payload(seed_of(peer, rank, 0), (n,), torch.bfloat16))
        ticker.stalls.sort()
        return {
            "transfer_s": stats.seconds,
            "GBps_per_direction": nbytes / stats.seconds / 1e9,
            "max_stall_ms": ticker.stalls[-1] * 1e3,
            "p99_stall_ms": ticker.stalls[int(0.99 * (len(ticker.stalls) - 1))] * 1e3,
            "ticks": len(ticker.stalls),
        }


async def mismatch(rank: int, world: int, backend: str) -> str:
    peer = 1 - rank
    async with aeplb.create_communicator(backend, timeout=60) as comm:
        if rank == 0:
            comm.add_send(gpu_payload(1, (100,), torch.float32), peer)
            comm.add_send(gpu_payload(2, (100,), torch.float32), peer)
        else:
            comm.add_recv(poisoned((100,), torch.float32), peer)
        with pytest.raises(aeplb.PeerMismatchError) as info:
            await comm.execute()
        buf = poisoned((10,), torch.float32)
        comm.add_send(gpu_payload(seed_of(rank, peer, 3), (10,), torch.float32), peer)
        comm.add_recv(buf, peer)
        await comm.execute()
        same_bytes(buf, gpu_payload(seed_of(peer, rank, 3), (10,), torch.float32))
        return str(info.value)


async def deadline(rank: int, world: int, backend: str) -> float:
    """Rank 1 never executes; rank 0 fails at its deadline and aborts, never hangs."""
    comm = aeplb.create_communicator(backend, timeout=3)
    if rank == 1:
        await anyio.sleep(8)
        return 0.0
    comm.add_send(gpu_payload(1, (1 << 20,), torch.float32), 1)
    start = time.monotonic()
    with pytest.raises(aeplb.TransferTimeoutError):
        await comm.execute()
    elapsed = time.monotonic() - start
    assert comm.statistics().broken
    await comm.aclose()
    return elapsed


async def first_batch(rank: int, world: int, backend: str) -> float:
    """The first batch after creation runs in time: NCCL's lazy setup (0.2 to 0.7 s on the
    first batch before the warm-up) now happens while the communicator is created."""
    device = torch.device("cuda", torch.cuda.current_device())
    comm = aeplb.create_communicator(backend, device=device, timeout=0.3)
    assert comm.statistics().batches_completed == 0  # the warm-up is not counted
    stats = await swap(comm, rank, 1 - rank, [((1 << 20,), torch.bfloat16)])
    assert comm.statistics().batches_completed == 1
    await comm.aclose()
    return stats.seconds


async def gloo_plain_cuda(rank: int, world: int) -> int:
    """device="cuda" (no index) means the current device, as in torch."""
    comm = aeplb.create_communicator("gloo", device="cuda", timeout=60)
    await swap(comm, rank, 1 - rank, [((4096,), torch.bfloat16), ((3, 5), torch.float32)])
    held = int(comm._transport.staging_bytes)  # type: ignore[attr-defined]
    await comm.aclose()
    return held


def blocking(rank: int, world: int, backend: str) -> None:
    peer = 1 - rank
    comm = aeplb.create_communicator(backend, timeout=60)
    legacy = comm.blocking()
    stream = torch.cuda.Stream()
    legacy.set_stream(stream)
    buf = poisoned((12345,), torch.bfloat16)
    legacy.add_send(gpu_payload(seed_of(rank, peer, 0), (12345,), torch.bfloat16), peer)
    legacy.add_recv(buf, peer)
    legacy.execute()
    same_bytes(buf, gpu_payload(seed_of(peer, rank, 0), (12345,), torch.bfloat16))
    legacy.close()


async def auto_and_bad_device(rank: int, world: int) -> str:
    comm = aeplb.create_communicator("auto")
    assert comm.backend == "ipc"  # both GPUs on one node
    with pytest.raises(aeplb.InvalidTransferError, match="moves tensors on cuda"):
        comm.add_send(torch.ones(3), 1 - rank)
    if torch.cuda.device_count() > 1:
        other = torch.ones(3, device=f"cuda:{1 - rank}")
        with pytest.raises(aeplb.InvalidTransferError, match="cuda:"):
            comm.add_send(other, 1 - rank)
    await comm.aclose()
    cpu = aeplb.create_communicator("auto", device="cpu")
    assert cpu.backend == "gloo"
    await cpu.aclose()
    return comm.backend


# -- tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bf16", "fp8", "fp32"])
@pytest.mark.parametrize("layout", ["one-large", "many"])
def test_exchange(gpus2: RankPool, backend: str, dtype: str, layout: str) -> None:
    gpus2.run(exchange, backend, dtype, layout, backend="asyncio", pg_backend=PG, timeout=180)


@pytest.mark.parametrize("backend", ["nccl", "pynccl"])
@pytest.mark.parametrize("coalesce", [False, True])
def test_small_chunks_reuse_staging_slots(gpus2: RankPool, backend: str, coalesce: bool) -> None:
    # 1 MiB chunks and a 2-chunk pool: every slot is reused many times within one batch
    options = {"coalesce": coalesce, "chunk_bytes": 1 << 20, "staging_bytes": 2 << 20}
    gpus2.run(exchange, backend, "bf16", "many", options, backend="asyncio", pg_backend=PG)


@pytest.mark.shares_a_gpu
def test_gloo_lanes_cycle_slots_over_stripes(gpus2: RankPool) -> None:
    held = gpus2.run(gloo_lanes, backend="asyncio", pg_backend=PG)
    assert held == [12 * (64 << 10)] * 2, "six lanes of two slots, within staging_bytes"


@pytest.mark.parametrize("backend", ["nccl", "pynccl"])
@pytest.mark.parametrize("layout", ["one-dtype-many", "one-dtype-1d", "mixed-many", "views-of-one"])
def test_packing_paths(gpus2: RankPool, backend: str, layout: str) -> None:
    # 9999-byte pieces: most start and end inside a tensor, many off the dtype's alignment;
    # for 1-D tensors, pieces of about 130 tensors that start and end inside one
    options = {"chunk_bytes": 9999, "staging_bytes": 100000}
    if layout == "one-dtype-1d":
        options = {"chunk_bytes": 200003, "staging_bytes": 1 << 20}
    staging = gpus2.run(packing, backend, layout, options, backend="asyncio", pg_backend=PG)
    if layout == "views-of-one":
        assert staging == [0, 0], "back-to-back views of one tensor need no staging"
    whole = {"chunk_bytes": 64 << 20, "staging_bytes": 128 << 20}  # one piece per stream
    if layout != "views-of-one":
        gpus2.run(packing, backend, layout, whole, backend="trio", pg_backend=PG)


@pytest.mark.parametrize("backend", ["nccl", "pynccl"])
def test_enqueue_on_caller_thread(gpus2: RankPool, backend: str) -> None:
    options = {"enqueue_on": "caller", "check_peers": False}
    for layout in ("one-large", "many"):
        gpus2.run(exchange, backend, "bf16", layout, options, backend="trio", pg_backend=PG)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_ordering(gpus2: RankPool, backend: str) -> None:
    gpus2.run(stream_ordering, backend, backend="trio", pg_backend=PG)


@pytest.mark.parametrize("backend", BACKENDS)
def test_allocator_reuse(gpus2: RankPool, backend: str) -> None:
    gpus2.run(allocator_reuse, backend, backend="asyncio", pg_backend=PG)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_loop_stall_1gb(gpus2: RankPool, backend: str, loop: str) -> None:
    results = gpus2.run(loop_stall, backend, 1 << 30, backend=loop, pg_backend=PG, timeout=300)
    for rank, r in enumerate(results):
        print(f"STALL {backend} {loop} rank {rank}: {r}")
        assert r["max_stall_ms"] < max(r["transfer_s"] * 1e3 / 4, 5.0), r


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatch(gpus2: RankPool, backend: str) -> None:
    messages = gpus2.run(mismatch, backend, backend="asyncio", pg_backend=PG)
    assert all("rank 0 sends 2 tensor(s)" in m for m in messages)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deadline(gpus2: RankPool, backend: str) -> None:
    elapsed = gpus2.run(deadline, backend, backend="asyncio", pg_backend=PG, timeout=90)[0]
    assert 2.9 < elapsed < 3 + 3, elapsed


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_batch_meets_a_short_deadline(gpus2: RankPool, backend: str) -> None:
    seconds = gpus2.run(first_batch, backend, backend="asyncio", pg_backend=PG, timeout=90)
    print(f"FIRST {backend}: {[round(s * 1e3, 2) for s in seconds]} ms")


@pytest.mark.shares_a_gpu
def test_gloo_device_cuda_means_the_current_device(gpus2: RankPool) -> None:
    held = gpus2.run(gloo_plain_cuda, backend="asyncio", pg_backend=PG)
    assert all(h > 0 for h in held), "the CUDA tensors were staged through the pinned pool"


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocking_facade(gpus2: RankPool, backend: str) -> None:
    gpus2.run(blocking, backend, pg_backend=PG)


@pytest.mark.shares_a_gpu
def test_auto_and_wrong_device(gpus2: RankPool) -> None:
    assert gpus2.run(auto_and_bad_device, backend="asyncio", pg_backend=PG) == ["ipc"] * 2
