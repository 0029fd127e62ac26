"""Inputs that used to crash a rank, move wrong data, hang or leak: each now moves correctly
or is refused with a clear error, and the communicator stays usable."""

from __future__ import annotations

import gc
import threading
import time
import warnings
from datetime import timedelta
from typing import Any

import anyio
import numpy as np
import pytest
import torch
import torch.distributed as dist

import aeplb
from aeplb import _communicator

from .conftest import require_gpu
from .multirank import RankPool, free_port
from .payloads import assert_same, payload, poisoned, seed_of
from .ticker import Ticker

GPU_PG = "cpu:gloo,cuda:nccl"

# -- rank functions (module level so spawned ranks can import them) --------------------


def _bytes_payload(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random non-zero bytes viewed as ``dtype``: works for dtypes with no kernels."""
    count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    g = torch.Generator().manual_seed(seed)
    top = 2 if dtype == torch.bool else 255  # a bool byte is 0 or 1
    raw = torch.randint(1 - (top == 2), top, (count,), generator=g, dtype=torch.int64)
    return raw.to(torch.uint8).view(dtype).view(shape)


def _unlike(t: torch.Tensor) -> torch.Tensor:
    """A receive buffer no byte of ``t`` equals (payload bytes are non-zero but bools')."""
    return torch.logical_not(t) if t.dtype == torch.bool else torch.zeros_like(t)


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def movable_dtypes() -> list[torch.dtype]:
    out = []
    for name in dir(torch):
        dtype = getattr(torch, name)
        if isinstance(dtype, torch.dtype) and dtype not in out and "qint" not in str(dtype):
            if "quint" in str(dtype):
                continue
            try:
                torch.empty(2, dtype=dtype).view(torch.uint8)
            except Exception:
                continue
            out.append(dtype)
    return sorted(out, key=str)


async def exchange_shapes(
    rank: int,
    world: int,
    shapes: list[tuple[int, ...]],
    salt: int,
    backend: str = "gloo",
    device: str = "cpu",
) -> int:
    """Both ranks send every dtype, as the given shapes, to each other; checked by bytes."""
    peer = 1 - rank
    async with aeplb.create_communicator(backend, timeout=60) as comm:
        checks = []
        for d, dtype in enumerate(movable_dtypes()):
            for i, shape in enumerate(shapes):
                sent = _bytes_payload(seed_of(rank, peer, i, salt + d), shape, dtype)
                comm.add_send(sent.to(device), peer)
                buf = _unlike(_bytes_payload(seed_of(peer, rank, i, salt + d), shape, dtype))
                buf = buf.to(device)
                comm.add_recv(buf, peer)
                checks.append((buf, seed_of(peer, rank, i, salt + d), shape, dtype))
            await comm.execute()
            for buf, seed, shape, dtype in checks:
                want = _as_u8(_bytes_payload(seed, shape, dtype))
                assert torch.equal(_as_u8(buf).cpu(), want), dtype
            checks.clear()
        return len(movable_dtypes())


async def scales_through_rearrange(rank: int, world: int, kind: str = "plain") -> None:
    """A weight [S, H] and a per-slot scale [S] of one dtype: one 0-d op per slot; as
    plain tensors, parameters that require grad, or inference tensors."""
    num_slots = 80
    rng = np.random.default_rng(7)
    old = torch.arange(num_slots).view(1, -1)
    new = torch.from_numpy(rng.permutation(num_slots)).view(1, -1)
    per = num_slots // world

    def weights(phy2log: torch.Tensor) -> list[list[torch.Tensor]]:
        row = phy2log[0, rank * per : (rank + 1) * per].tolist()
        w = torch.stack([payload(1000 + e, (6,)) for e in row])
        s = torch.stack([payload(5000 + e, ()) for e in row])
        return [[w, s]]

    mine = weights(old)
    if kind == "parameters":
        mine = [[torch.nn.Parameter(t) for t in mine[0]]]
    elif kind == "inference":
        with torch.inference_mode():
            mine = [[t.clone() for t in mine[0]]]
    async with aeplb.create_communicator("gloo", timeout=60) as comm:
        await aeplb.rearrange_experts(comm, mine, old.clone(), new)
    want = weights(new)
    assert_same(mine[0][0].detach(), want[0][0], "weights")
    assert_same(mine[0][1].detach(), want[0][1], "scales")


async def two_communicators_at_once(rank: int, world: int, rounds: int) -> None:
    """Two gloo communicators on the default group, used from two tasks at once."""
    peer = 1 - rank
    a = aeplb.create_communicator("gloo", timeout=60)
    b = aeplb.create_communicator("gloo", timeout=60)

    async def use(comm: aeplb.Communicator, salt: int) -> None:
        for r in range(rounds):
            size = 1000 + 37 * salt + r  # the two differ in size too (Gloo aborted on that)
            buf = poisoned((size,))
            comm.add_send(payload(seed_of(rank, peer, r, salt), (size,)), peer)
            comm.add_recv(buf, peer)
            await comm.execute()
            assert_same(buf, payload(seed_of(peer, rank, r, salt), (size,)), f"{salt}/{r}")

    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(use, a, 1)
        tg.start_soon(use, b, 2)


async def swap_through_one_tensor(rank: int, world: int) -> None:
    peer = 1 - rank
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        t = payload(seed_of(rank, peer, 0), (1000,))
        comm.add_send(t, peer)
        comm.add_recv(t, peer)
        with pytest.raises(aeplb.InvalidTransferError, match="reads and writes the same memory"):
            await comm.execute()
        # only rank 0 swaps now: rank 1 learns of it through the manifest
        if rank == 0:
            comm.add_send(t[:500], peer)
            comm.add_recv(t[250:750], peer)
            with pytest.raises(aeplb.InvalidTransferError, match="add_send #0"):
                await comm.execute()
        else:
            comm.add_send(payload(1, (500,)), peer)
            comm.add_recv(poisoned((500,)), peer)
            with pytest.raises(aeplb.PeerMismatchError, match=r"rank\(s\) \[0\] rejected"):
                await comm.execute()
        # still usable: the swap done right, through a copy
        got = poisoned((1000,))
        comm.add_send(t.clone(), peer)
        comm.add_recv(got, peer)
        await comm.execute()
        assert_same(got, payload(seed_of(peer, rank, 0), (1000,)), "after the refusals")


async def autograd_and_inference_receives(rank: int, world: int, count: int) -> None:
    peer = 1 - rank
    params = [torch.nn.Parameter(poisoned((3,))) for _ in range(count)]
    with torch.inference_mode():
        frozen = [poisoned((3,)) for _ in range(count)]
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        for i in range(2 * count):
            comm.add_send(payload(seed_of(rank, peer, i), (3,)), peer)
        for t in params + frozen:
            comm.add_recv(t, peer)
        await comm.execute()
        for i, t in enumerate(params + frozen):
            assert_same(t.detach(), payload(seed_of(peer, rank, i), (3,)), f"tensor {i}")
        assert all(p.grad_fn is None and p.requires_grad for p in params)


async def mixed_scalar_batch(rank: int, world: int) -> None:
    """69 1-D tensors and one 0-d tensor of one dtype, as the hardening report had it."""
    peer = 1 - rank
    shapes: list[tuple[int, ...]] = [(4,)] * 69 + [()]
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        bufs = []
        for i, shape in enumerate(shapes):
            comm.add_send(payload(seed_of(rank, peer, i), shape), peer)
            bufs.append(poisoned(shape))
            comm.add_recv(bufs[-1], peer)
        await comm.execute()
        for i, (buf, shape) in enumerate(zip(bufs, shapes, strict=True)):
            assert_same(buf, payload(seed_of(peer, rank, i), shape), f"tensor {i}")


async def many_receives_under_ticker(rank: int, world: int, count: int) -> float:
    """Rank 1 receives ``count`` one-element tensors; its loop's longest stall, in ms."""
    peer = 1 - rank
    async with aeplb.create_communicator("gloo", timeout=120) as comm:
        if rank == 0:
            for piece in payload(3, (count,)).split(1):  # views of one tensor: one piece
                comm.add_send(piece, peer)
            await comm.execute()
            return 0.0
        bufs = [poisoned((1,)) for _ in range(count)]
        for b in bufs:
            comm.add_recv(b, peer)
        gc.collect()
        ticker = Ticker()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await anyio.sleep(0.02)
            await comm.execute()
            ticker.done = True
        want = payload(3, (count,))
        got = torch.cat(bufs)
        assert_same(got, want, "the receives")
        return max(ticker.stalls) * 1e3


async def stripes_after_reinit(rank: int, world: int, port: int) -> str:
    """A group made anew after destroy/init gets a name an earlier group had; only rank 0
    had made a communicator on that earlier group (as a survivor beside a replacement)."""
    solo = dist.new_group([0])
    if rank == 0:
        async with aeplb.create_communicator("gloo", group=solo, stripes=2, timeout=10):
            pass
    old_name = solo.group_name if rank == 0 else ""
    dist.destroy_process_group()
    timeout = timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    pair = dist.new_group([0, 1])
    if rank == 0:
        assert pair.group_name == old_name, "torch named the new group differently"
    async with aeplb.create_communicator("gloo", group=pair, stripes=2, timeout=10) as comm:
        buf = poisoned((100,))
        comm.add_send(payload(seed_of(rank, 1 - rank, 0), (100,)), 1 - rank)
        comm.add_recv(buf, 1 - rank)
        await comm.execute()
        assert_same(buf, payload(seed_of(1 - rank, rank, 0), (100,)))
    return pair.group_name


async def late_peer(rank: int, world: int) -> float:
    """Rank 0's batch misses its deadline alone; rank 1 comes later, with a long deadline."""
    peer = 1 - rank
    async with aeplb.create_communicator("gloo", timeout=60) as comm:
        comm.add_send(payload(1, (100,)), peer)
        comm.add_recv(poisoned((100,)), peer)
        if rank == 0:
            with pytest.raises(aeplb.TransferTimeoutError):
                await comm.execute(timeout=1)
            await anyio.sleep(25)  # alive, so only the communicator can tell rank 1
            return 0.0
        await anyio.sleep(3)
        start = time.monotonic()
        with pytest.raises(aeplb.BrokenCommunicatorError):
            await comm.execute(timeout=20)
        return time.monotonic() - start


# -- tests -----------------------------------------------------------------------------


def test_a_late_peer_learns_at_once_that_the_batch_broke(world2: RankPool) -> None:
    # it waited until its own deadline, or until rank 0's process exited
    took = world2.run(late_peer, backend="asyncio", timeout=90)[1]
    assert took < 5, took


def test_zero_d_tensors_move(world2: RankPool) -> None:
    # 80 separately allocated 0-d tensors of one dtype crashed the worker (SIGSEGV)
    world2.run(exchange_shapes, [()] * 80, 0, backend="asyncio")


def test_every_dtype_moves_whatever_the_count(world2: RankPool) -> None:
    # 65 float4 tensors: "cat_serial_kernel not implemented"; sub-byte ints had no copy_
    counts = world2.run(exchange_shapes, [(3,)] * 70 + [(), (2, 2)], 100, backend="asyncio")
    assert counts[0] >= 20  # the standard dtypes, float8, float4, sub-byte ints, bits...


@pytest.mark.parametrize("kind", ["plain", "parameters", "inference"])
def test_scales_beside_weights_through_rearrange(world2: RankPool, kind: str) -> None:
    world2.run(scales_through_rearrange, kind, backend="asyncio")


def test_zero_d_among_many_one_d(world2: RankPool) -> None:
    world2.run(mixed_scalar_batch, backend="asyncio")


def test_two_communicators_on_one_group_keep_their_data(world2: RankPool) -> None:
    world2.run(two_communicators_at_once, 60, backend="asyncio", timeout=120)


def test_swap_through_one_tensor_is_refused(world2: RankPool, anyio_backend: str) -> None:
    world2.run(swap_through_one_tensor, backend=anyio_backend)


def test_receives_into_parameters_and_inference_tensors(world2: RankPool) -> None:
    world2.run(autograd_and_inference_receives, 100, backend="asyncio")


def test_stripes_after_reinitialising_the_group(world2: RankPool) -> None:
    world2.run(stripes_after_reinit, free_port(), backend="asyncio", timeout=60)


def test_many_one_element_receives_keep_the_loop_ticking(world2: RankPool) -> None:
    # 100,000 receives held the receiver's loop 350 to 420 ms (the GIL, in two calls
    # over every tensor). The bound leaves room for a loaded 2-core machine.
    stall_ms = world2.run(many_receives_under_ticker, 100_000, backend="asyncio", timeout=180)[1]
    print(f"longest stall with 100,000 one-element receives: {stall_ms:.1f} ms")
    assert stall_ms < 60, stall_ms


# -- one rank in this process ----------------------------------------------------------


def _aeplb_threads() -> int:
    return sum(t.name.startswith("aeplb") for t in threading.enumerate())


UNMOVABLE: list[tuple[str, Any, str]] = [
    ("conjugate view", lambda: torch.randn(4, dtype=torch.complex64).conj(), "resolve_conj"),
    ("negative view", lambda: torch.randn(1, dtype=torch.complex64).conj().imag, "resolve_neg"),
    ("nested", lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]), "unbind"),
    (
        "quantized",
        lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),
        "int_repr",
    ),
]


@pytest.mark.parametrize(("what", "make", "fix"), UNMOVABLE, ids=[u[0] for u in UNMOVABLE])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unmovable_tensors_are_refused_when_queued(
    one_rank_group: None, what: str, make: Any, fix: str
) -> None:
    comm = aeplb.create_communicator("gloo").blocking()
    plain = torch.randn(4)
    for _ in range(2):  # the second time, the dtype is known: the inline path
        for add in (comm.add_send, comm.add_recv):
            with pytest.raises(aeplb.InvalidTransferError, match=fix):
                add(make(), 0)
        comm.add_send(plain, 0)
        comm.add_recv(torch.empty(4), 0)
    assert comm.communicator.pending == 4
    comm.close()


def test_overlapping_self_copy_is_refused_and_nothing_is_lost(one_rank_group: None) -> None:
    comm = aeplb.create_communicator("gloo").blocking()
    t = payload(1, (20,))
    comm.add_send(t[:10], 0)
    comm.add_recv(t[5:15], 0)
    with pytest.raises(aeplb.InvalidTransferError, match="self-copy #0"):
        comm.execute()
    assert_same(t, payload(1, (20,)), "nothing moved")
    comm.close()


def test_execute_racing_close_is_a_closed_error(
    one_rank_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    comm = aeplb.create_communicator("gloo")
    real = _communicator.prepare

    def close_meanwhile(*args: Any) -> Any:  # another thread closes inside the window
        closer = threading.Thread(target=comm.blocking().close)
        closer.start()
        closer.join()
        return real(*args)

    monkeypatch.setattr(_communicator, "prepare", close_meanwhile)
    with pytest.raises(aeplb.ClosedCommunicatorError):
        comm.blocking().execute()


def test_dropped_communicators_release_their_threads(one_rank_group: None) -> None:
    gc.collect()
    before = _aeplb_threads()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(20):
            aeplb.create_communicator("gloo")  # dropped at once, never closed
        gc.collect()
    assert sum(issubclass(w.category, ResourceWarning) for w in seen) == 20
    deadline = time.monotonic() + 10
    while _aeplb_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aeplb_threads() == before


@pytest.mark.anyio
async def test_blocking_execute_in_a_loop_warns_once(one_rank_group: None) -> None:
    comm = aeplb.create_communicator("gloo")
    blocking = comm.blocking()
    with pytest.warns(RuntimeWarning, match="await comm.execute"):
        blocking.execute()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocking.execute()  # once per communicator
    await comm.aclose()


def test_blocking_execute_outside_a_loop_does_not_warn(one_rank_group: None) -> None:
    comm = aeplb.create_communicator("gloo").blocking()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comm.execute()
    comm.close()


def test_backend_errors_are_shortened() -> None:
    from aeplb._exceptions import short_error

    text = (
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
        "[127.0.0.1]:23720: Connection reset by peer. GLHF! \U0001f3d6\ufe0f\nmore"
    )
    assert short_error(RuntimeError(text)) == (
        "Read error [127.0.0.1]:23720: Connection reset by peer."
    )


# -- CUDA ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.shares_a_gpu
@pytest.mark.parametrize("backend", ["ipc", "gloo"])
def test_gpu_zero_d_and_every_dtype(world2: RankPool, backend: str) -> None:
    require_gpu(1)
    shapes: list[tuple[int, ...]] = [()] * 80 + [(3,)] * 69 + [(2, 2)]
    world2.run(exchange_shapes, shapes, 7, backend, "cuda", backend="asyncio", pg_backend=GPU_PG)


@pytest.mark.gpu
@pytest.mark.shares_a_gpu
def test_gpu_swap_is_refused_in_band(world2: RankPool) -> None:
    require_gpu(1)
    world2.run(swap_on_cuda, backend="asyncio", pg_backend=GPU_PG)


@pytest.mark.gpu
def test_gpu_second_nccl_communicator_on_one_group_is_refused() -> None:
    require_gpu(1)
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    torch.cuda.set_device(0)
    dist.init_process_group(GPU_PG, store=dist.HashStore(), rank=0, world_size=1)
    try:
        first = aeplb.create_communicator("nccl").blocking()
        with pytest.raises(aeplb.InvalidTransferError, match="new_group"):
            aeplb.create_communicator("nccl")
        other = aeplb.create_communicator("nccl", group=dist.new_group([0], backend="nccl"))
        other.blocking().close()
        first.close()
        aeplb.create_communicator("nccl").blocking().close()  # the group is free again
    finally:
        dist.destroy_process_group()


async def swap_on_cuda(rank: int, world: int) -> None:
    peer = 1 - rank
    async with aeplb.create_communicator("ipc", timeout=30) as comm:
        t = payload(seed_of(rank, peer, 0), (1000,), device="cuda")
        comm.add_send(t, peer)
        comm.add_recv(t, peer)
        with pytest.raises(aeplb.InvalidTransferError, match="reads and writes the same memory"):
            await comm.execute()
        got = poisoned((1000,)).cuda()
        comm.add_send(t.clone(), peer)
        comm.add_recv(got, peer)
        await comm.execute()
        want = payload(seed_of(peer, rank, 0), (1000,), device="cuda")  # CUDA's generator
        assert_same(got.cpu(), want.cpu(), "after the refusal")
