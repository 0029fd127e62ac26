"""rearrange_experts over real Gloo ranks: every slot checked against the target placement."""

from __future__ import annotations

import time
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
import torch

import aeplb
from aeplb.rearrange import expected_bytes

from .multirank import RankPool
from .payloads import assert_same, payload
from .ticker import Ticker

# Per k: dtype and slot shape. Odd layers get one more row, so shapes differ across layers.
KINDS = [(torch.float32, (4, 3)), (torch.bfloat16, (5,)), (torch.uint8, (2, 3, 2))]


def slot_shape(layer: int, k: int, scale: int = 1) -> tuple[int, ...]:
    shape = KINDS[k][1]
    return (shape[0] * scale + layer % 2, *shape[1:])


def seed(layer: int, expert: int, k: int, salt: int) -> int:
    return ((salt * 1009 + layer) * 1009 + expert) * 7 + k


def encoding(layer: int, expert: int, k: int, salt: int, scale: int = 1) -> torch.Tensor:
    return payload(seed(layer, expert, k, salt), slot_shape(layer, k, scale), KINDS[k][0])


def make_weights(
    rank: int, world: int, phy2log: torch.Tensor, salt: int, scale: int = 1
) -> list[list[torch.Tensor]]:
    num_layers, num_phy = phy2log.shape
    slots = num_phy // world
    weights = []
    for layer in range(num_layers):
        row = phy2log[layer, rank * slots : (rank + 1) * slots].tolist()
        weights.append(
            [
                torch.stack([encoding(layer, e, k, salt, scale) for e in row])
                for k in range(len(KINDS))
            ]
        )
    return weights


def check_layers(
    rank: int,
    world: int,
    weights: list[list[torch.Tensor]],
    phy2log: torch.Tensor,
    salt: int,
    layers: range | list[int] | None = None,
    scale: int = 1,
) -> None:
    """Every slot of the given layers holds exactly the encoding of phy2log's expert."""
    slots = phy2log.shape[1] // world
    for layer in range(phy2log.shape[0]) if layers is None else layers:
        for s in range(slots):
            expert = int(phy2log[layer, rank * slots + s])
            for k, w in enumerate(weights[layer]):
                want = encoding(layer, expert, k, salt, scale)
                assert_same(w[s], want, f"rank {rank} layer {layer} slot {s} k {k}")


def tables(phy2log: torch.Tensor, num_experts: int, maxcnt: int) -> tuple[torch.Tensor, ...]:
    """log2phy (slots ascending, -1 padded) and logcnt of a placement."""
    num_layers = phy2log.shape[0]
    log2phy = torch.full((num_layers, num_experts, maxcnt), -1, dtype=torch.int64)
    logcnt = torch.zeros((num_layers, num_experts), dtype=torch.int64)
    for layer in range(num_layers):
        for slot, e in enumerate(phy2log[layer].tolist()):
            log2phy[layer, e, logcnt[layer, e]] = slot
            logcnt[layer, e] += 1
    return log2phy, logcnt


def ptrs(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


# -- placements (built in the test process, shipped to the ranks) -----------------------


def hand_built(world: int, slots: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 unchanged; 1 every rank receives from every other; 2 duplicates on one rank;
    3 a local cycle (every copy source is overwritten); 4 random with replicas."""
    num_phy = world * slots
    base = np.arange(num_phy)
    old = np.stack([base] * 5)
    new = old.copy()
    for r in range(world):
        for j in range(slots):
            src = (r + 1 + j) % world
            new[1, r * slots + j] = src * slots + (j + r) % slots
        nxt = (r + 1) % world
        new[2, r * slots + 0] = new[2, r * slots + 1] = nxt * slots  # received once, twice
        new[2, r * slots + 2] = r * slots + 3  # a replica of an expert this rank keeps
        for j in range(slots):
            new[3, r * slots + j] = r * slots + (j + 1) % slots
    rng = np.random.default_rng(world)
    old[4] = rng.integers(0, num_phy, num_phy)
    old[4, : num_phy // 2] = np.arange(num_phy // 2)
    new[4] = rng.choice(np.unique(old[4]), num_phy)
    return torch.from_numpy(old), torch.from_numpy(new)


def random_pair(world: int, seed_: int, current: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed_)
    num_layers, num_experts, num_phy = 4, 8, 12 if world == 2 else 16
    load = rng.integers(1, 1000, (num_layers, num_experts))
    old = aeplb.rebalance_experts(load, num_phy, 4, 2, world).phy2log
    load2 = rng.integers(1, 1000, (num_layers, num_experts))
    cur = old if current else None
    new = aeplb.rebalance_experts(load2, num_phy, 4, 2, world, current=cur).phy2log
    return old, new


def all_changed(world: int, num_layers: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer changes and every rank receives from its neighbour on every layer."""
    num_phy = world * 3
    old = torch.arange(num_phy).repeat(num_layers, 1)
    new = old.roll(3, dims=1).clone()
    return old, new


# -- rank functions ------------------------------------------------------------------


async def run_cases(rank: int, world: int, cases: list[Any], salt: int) -> list[dict[str, Any]]:
    out = []
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        for name, old, new, depth in cases:
            out.append(await one_case(comm, rank, world, name, old, new, depth, salt))
    return out


async def one_case(
    comm: aeplb.Communicator,
    rank: int,
    world: int,
    name: str,
    old: torch.Tensor,
    new: torch.Tensor,
    depth: int,
    salt: int,
) -> dict[str, Any]:
    num_experts = int(max(old.max(), new.max())) + 1
    maxcnt = max(int(torch.bincount(row).max()) for row in torch.cat([old, new]))
    live = old.clone()
    log2phy, logcnt = tables(old, num_experts, maxcnt)
    weights = make_weights(rank, world, old, salt)
    before = ptrs(live, log2phy, logcnt, *(w for ws in weights for w in ws))
    plan = aeplb.plan_rearrangement(old, new, rank=rank, world_size=world)
    want = expected_bytes(plan, weights)
    calls: list[Any] = []

    async def on_layer(layer: int) -> None:
        # Called right after the commit: this layer is new, the next changed one still old.
        assert torch.equal(live[layer], new[layer])
        check_layers(rank, world, weights, new, salt, [layer])
        later = [lp.layer for lp in plan.layers[layer + 1 :] if lp.changed]
        if later:
            assert torch.equal(live[later[0]], old[later[0]])
            check_layers(rank, world, weights, old, salt, [later[0]])
        calls.append(("layer", layer))
        await anyio.lowlevel.checkpoint()

    stats = await aeplb.rearrange_experts(
        comm,
        weights,
        live,
        new,
        on_layer=on_layer,
        on_progress=lambda done, total: calls.append(("progress", done, total)),
        log2phy=log2phy,
        logcnt=logcnt,
        layers_in_flight=depth,
        timeout=20,
    )
    check_layers(rank, world, weights, new, salt)
    new_log2phy, new_logcnt = tables(new, num_experts, maxcnt)
    assert torch.equal(live, new), name
    assert torch.equal(log2phy, new_log2phy) and torch.equal(logcnt, new_logcnt), name
    assert ptrs(live, log2phy, logcnt, *(w for ws in weights for w in ws)) == before
    changed = [lp.layer for lp in plan.layers if lp.changed]
    assert [c[1] for c in calls if c[0] == "layer"] == changed
    assert [c[1:] for c in calls if c[0] == "progress"] == [
        (d, len(plan.layers)) for d in range(1, len(plan.layers) + 1)
    ]
    assert (stats.bytes_sent, stats.bytes_received, stats.bytes_copied_locally) == tuple(want)
    assert stats.layers == len(plan.layers) and stats.layers_changed == len(changed)
    assert len(stats.layer_seconds) == len(changed)
    assert 0 <= stats.transfer_seconds <= stats.seconds
    digest = [float(w.double().sum()) for ws in weights for w in ws]
    return {"name": name, "depth": depth, "digest": digest, "bytes": tuple(want)}


class Boom(Exception):
    pass


async def failing_on_layer(rank: int, world: int, depth: int, salt: int) -> list[int]:
    """on_layer raises at layer 2 on every rank: 0..2 new, 3.. exactly old."""
    old, new = all_changed(world)
    live = old.clone()
    log2phy, logcnt = tables(old, int(old.max()) + 1, 1)
    weights = make_weights(rank, world, old, salt)
    seen: list[int] = []

    def on_layer(layer: int) -> None:
        seen.append(layer)
        if layer == 2:
            raise Boom("injected")

    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        with pytest.raises(Boom, match="injected"):
            await aeplb.rearrange_experts(
                comm, weights, live, new, on_layer=on_layer, log2phy=log2phy, logcnt=logcnt,
                layers_in_flight=depth,
            )  # fmt: skip
        check_layers(rank, world, weights, new, salt, range(3))
        check_layers(rank, world, weights, old, salt, range(3, 6))
        assert torch.equal(live[:3], new[:3]) and torch.equal(live[3:], old[3:])
        mixed = torch.cat([new[:3], old[3:]])
        mixed_tables = tables(mixed, int(old.max()) + 1, 1)
        assert all(torch.equal(a, b) for a, b in zip((log2phy, logcnt), mixed_tables, strict=True))
        assert comm.statistics().in_flight == 0, "the in-flight transfer must be waited for"
        # the communicator is still usable: finish the job
        await aeplb.rearrange_experts(comm, weights, live, new, log2phy=log2phy, logcnt=logcnt)
        check_layers(rank, world, weights, new, salt)
        assert torch.equal(live, new)
    return seen


async def mismatched_target(rank: int, world: int, check: bool, salt: int) -> str:
    """Rank 1 is given a different target for layer 3, so layer 3's op lists do not pair."""
    old, new = all_changed(world)
    if rank == 1:
        new = new.clone()
        slots = 3
        # rank 1 now also wants an expert of rank 0 that rank 0 will not send it
        new[3, slots + 1] = 2 if int(new[3, slots]) != 2 else 1
    live = old.clone()
    weights = make_weights(rank, world, old, salt)
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        expected = aeplb.PeerMismatchError if not check else aeplb.InvalidTransferError
        with pytest.raises(expected) as info:
            await aeplb.rearrange_experts(comm, weights, live, new, check_placements=check)
        done = 3 if not check else 0
        check_layers(rank, world, weights, new, salt, range(done))
        check_layers(rank, world, weights, old, salt, range(done, 6))
        assert torch.equal(live[:done], new[:done]) and torch.equal(live[done:], old[done:])
        assert not comm.statistics().broken
    return str(info.value)


async def cancelled(rank: int, world: int, how: str, depth: int, salt: int) -> dict[str, Any]:
    """Cancel on every rank, then a second call with the same target finishes the job."""
    old, new = all_changed(world)
    # Bigger layers for "during-transfer", so that the cancel lands while layer 1 is on the
    # wire; the outcome does not depend on it (the host is cancelled before commit 1 anyway).
    scale = 16384 if how == "during-transfer" else 1
    in_flight_at_cancel = []
    live = old.clone()
    weights = make_weights(rank, world, old, salt, scale)
    async with (
        aeplb.create_communicator("gloo", timeout=30) as comm,
        anyio.create_task_group() as tg,
    ):
        with anyio.CancelScope() as scope:

            async def cancel_soon() -> None:
                await anyio.sleep(0.002)
                in_flight_at_cancel.append(comm.statistics().in_flight)
                scope.cancel()

            async def on_layer(layer: int) -> None:
                if how == "from-on_layer" and layer == 1:
                    scope.cancel()
                elif how == "move_on_after" and layer == 0:
                    await anyio.sleep(30)  # the deadline fires here on every rank
                elif how == "during-transfer" and layer == 0:
                    tg.start_soon(cancel_soon)  # fires while layer 1 is on the wire

            if how == "move_on_after":
                scope.deadline = anyio.current_time() + 1.0
            await aeplb.rearrange_experts(
                comm, weights, live, new, on_layer=on_layer, layers_in_flight=depth
            )
        assert scope.cancelled_caught
        assert comm.statistics().in_flight == 0
        committed = [int(torch.equal(live[layer], new[layer])) for layer in range(6)]
        done = sum(committed)
        assert committed == [1] * done + [0] * (6 - done), committed
        check_layers(rank, world, weights, new, salt, range(done), scale)
        check_layers(rank, world, weights, old, salt, range(done, 6), scale)
        stats = await aeplb.rearrange_experts(comm, weights, live, new, layers_in_flight=depth)
        assert stats.layers_changed == 6 - done
        check_layers(rank, world, weights, new, salt, scale=scale)
        assert torch.equal(live, new)
    return {"done": done, "in_flight_at_cancel": in_flight_at_cancel}


async def loop_stall(rank: int, world: int, salt: int) -> dict[str, float]:
    old, new = all_changed(world, num_layers=8)
    scale = 24576  # about 5 MB of weights per layer per rank, all of it moves
    live = old.clone()
    weights = make_weights(rank, world, old, salt, scale)
    ticker = Ticker()

    async with aeplb.create_communicator("gloo", timeout=60) as comm:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            await anyio.sleep(0.01)
            stats = await aeplb.rearrange_experts(comm, weights, live, new)
            ticker.done = True
        check_layers(rank, world, weights, new, salt, scale=scale)
    return {
        "seconds": stats.seconds,
        "mb": stats.bytes_received / 1e6,
        "max_stall": max(ticker.stalls),
        "ticks": len(ticker.stalls),
    }


async def cuda_stream_order(rank: int, world: int, salt: int) -> dict[str, float]:
    """CUDA weights and tables: commits are queued on the caller's stream, never synced."""
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    old, new = hand_built(world)
    num_experts = int(max(old.max(), new.max())) + 1
    maxcnt = max(int(torch.bincount(row).max()) for row in torch.cat([old, new]))
    live = old.to(dev)
    log2phy, logcnt = (t.to(dev) for t in tables(old, num_experts, maxcnt))
    weights = [[w.to(dev) for w in ws] for ws in make_weights(rank, world, old, salt)]
    before = ptrs(live, log2phy, logcnt, *(w for ws in weights for w in ws))
    ticker = Ticker()

    stream = torch.cuda.Stream(dev)
    async with aeplb.create_communicator("gloo", timeout=60) as comm:
        with torch.cuda.stream(stream):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker.run)
                # A serving stream has cached memory; a fresh one would cudaMalloc for the
                # clones below, which can wait for the GPU.
                warm = [torch.empty(1 << 10, device=dev), torch.empty(16 << 20, device=dev)]
                del warm
                torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work queued ahead of us
                seen_before = [w.clone() for ws in weights for w in ws]
                stats = await aeplb.rearrange_experts(
                    comm, weights, live, new, log2phy=log2phy, logcnt=logcnt
                )
                seen_after = [w.clone() for ws in weights for w in ws]
                ticker.done = True
        stream.synchronize()
    flat_old = [w for ws in make_weights(rank, world, old, salt) for w in ws]
    for got, want in zip(seen_before, flat_old, strict=True):
        assert_same(got.cpu(), want, "queued before the call: all old")
    cpu = [[w.cpu() for w in ws] for ws in weights]
    check_layers(rank, world, cpu, new, salt)
    flat_new = [w for ws in cpu for w in ws]
    for got, want in zip(seen_after, flat_new, strict=True):
        assert_same(got.cpu(), want, "queued after the call: all new")
    want_tables = tables(new, num_experts, maxcnt)
    assert torch.equal(live.cpu(), new)
    assert torch.equal(log2phy.cpu(), want_tables[0]) and torch.equal(logcnt.cpu(), want_tables[1])
    assert ptrs(live, log2phy, logcnt, *(w for ws in weights for w in ws)) == before
    return {"seconds": stats.seconds, "max_stall": max(ticker.stalls)}


async def validation(rank: int, world: int) -> list[str]:
    old, new = all_changed(world, num_layers=2)
    live = old.clone()
    weights = make_weights(rank, world, old, 0)
    snapshot = [[w.clone() for w in ws] for ws in weights]
    messages = []
    async with aeplb.create_communicator("gloo", timeout=30) as comm:
        bad_new = new.clone()
        bad_new[1, 0] = 99
        transposed = torch.empty(3, 3).t()
        cases: list[tuple[dict[str, Any], str]] = [
            ({"expert_weights": weights[:1]}, "expected 2 layers"),
            ({"expert_weights": [weights[0], weights[1][0]]}, r"expert_weights\[1\]: expected"),
            ({"expert_weights": [weights[0], []]}, r"expert_weights\[1\]: is empty"),
            ({"expert_weights": [weights[0], [weights[1][0][:2]]]}, "dim 0 holds this rank's 3"),
            ({"expert_weights": [weights[0], [transposed]]}, "not contiguous"),
            ({"new_phy2log": new[:1]}, "new_phy2log: shape"),
            ({"new_phy2log": bad_new}, "needs expert 99"),
            ({"old_phy2log": old.tolist()}, "old_phy2log: expected the live integer"),
            ({"layers_in_flight": 0}, "layers_in_flight"),
            ({"timeout": -1}, "timeout"),
            ({"log2phy": torch.full((2, 6, 1), -1)[:, :3]}, "log2phy: shape"),
            ({"logcnt": torch.zeros(2, 6)}, "logcnt: expected"),
        ]
        args = {"expert_weights": weights, "old_phy2log": live, "new_phy2log": new}
        for override, pattern in cases:
            with pytest.raises(aeplb.InvalidTransferError, match=pattern) as info:
                await aeplb.rearrange_experts(comm, **{**args, **override})  # type: ignore[arg-type]
            messages.append(str(info.value))
            assert comm.pending == 0
        # a layer that needs two replicas where log2phy has room for one
        dup_new = new.clone()
        dup_new[0, 1] = dup_new[0, 0]
        with pytest.raises(aeplb.InvalidTransferError, match="maxcnt >= 2"):
            await aeplb.rearrange_experts(
                comm, weights, live, dup_new, log2phy=torch.full((2, 6, 1), -1)
            )
        comm.add_send(weights[0][0][0], 1 - rank)
        with pytest.raises(aeplb.InvalidTransferError, match="1 queued op"):
            await aeplb.rearrange_experts(comm, weights, live, new)
        comm.clear()
        for ws, ss in zip(weights, snapshot, strict=True):
            for w, s in zip(ws, ss, strict=True):
                assert_same(w, s, "nothing may move on a validation error")
        assert torch.equal(live, old)
        await aeplb.rearrange_experts(comm, weights, live, new)  # and it still works
        check_layers(rank, world, weights, new, 0)
    return messages


async def rejected_on_one_rank(rank: int, world: int) -> list[dict[str, Any]]:
    """Rank 1 passes one bad argument per case, rank 0 good ones; both record what they raised.

    Then both check that nothing moved and that the communicator still runs a rearrangement
    and a plain batch.
    """
    old, new = all_changed(world, num_layers=2)
    live = old.clone()
    weights = make_weights(rank, world, old, 0)
    snapshot = [[w.clone() for w in ws] for ws in weights]
    bad_new = new.clone()
    bad_new[1, 0] = 99
    bad: dict[str, dict[str, Any]] = {
        "expert-id": {"new_phy2log": bad_new},
        "shape": {"new_phy2log": new[:1]},
        "weights-not-a-list": {"expert_weights": 5},
        "queued-op": {},
        "timeout": {"timeout": -1},
    }
    out = []
    async with aeplb.create_communicator("gloo", timeout=20) as comm:
        for case, override in bad.items():
            args = {"expert_weights": weights, "old_phy2log": live, "new_phy2log": new}
            if rank == 1:
                args.update(override)
                if case == "queued-op":
                    comm.add_send(weights[0][0][0], 0)
            error: BaseException | None = None
            started = time.perf_counter()
            try:
                await aeplb.rearrange_experts(comm, **args)  # type: ignore[arg-type]
            except aeplb.AEPLBError as exc:
                error = exc
            seconds = time.perf_counter() - started
            out.append(
                {
                    "case": case,
                    "error": type(error).__name__,
                    "message": str(error),
                    "seconds": seconds,
                    "left_queued": comm.clear(),
                }
            )
            for ws, ss in zip(weights, snapshot, strict=True):
                for w, s in zip(ws, ss, strict=True):
                    assert_same(w, s, f"{case}: nothing may move when a rank rejects")
            assert torch.equal(live, old), case
        await aeplb.rearrange_experts(comm, weights, live, new)
        check_layers(rank, world, weights, new, 0)
        got = torch.zeros(3)
        async with comm.batch() as b:
            b.add_send(torch.full((3,), float(rank)), 1 - rank)
            b.add_recv(got, 1 - rank)
        assert torch.equal(got, torch.full((3,), float(1 - rank)))
    return out


# -- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_every_slot_matches_the_new_placement(
    world: int, world2: RankPool, world4: RankPool, anyio_backend: str
) -> None:
    pool = world2 if world == 2 else world4
    rand_old, rand_new = random_pair(world, 1)
    cur_old, cur_new = random_pair(world, 2, current=True)
    hand_old, hand_new = hand_built(world)
    cases = [
        ("hand-built", hand_old, hand_new, 2),
        ("random-1", rand_old, rand_new, 1),
        ("random-3", rand_old, rand_new, 3),
        ("current", cur_old, cur_new, 2),
    ]
    results = pool.run(run_cases, cases, 11, backend=anyio_backend, timeout=60)
    for per_rank in results:
        by_name = {r["name"]: r for r in per_rank}
        assert by_name["random-1"]["digest"] == by_name["random-3"]["digest"]
        assert by_name["random-1"]["bytes"] == by_name["random-3"]["bytes"]
    sent = sum(per_rank[0]["bytes"][0] for per_rank in results)
    received = sum(per_rank[0]["bytes"][1] for per_rank in results)
    assert sent == received > 0


def test_hand_built_placements_move_between_every_pair_and_duplicate() -> None:
    old, new = hand_built(4)
    for rank in range(4):
        plan = aeplb.plan_rearrangement(old, new, rank=rank, world_size=4)
        assert not plan.layers[0].changed
        assert {r.src_rank for r in plan.layers[1].recvs} == {0, 1, 2, 3} - {rank}
        assert any(len(r.dst_slots) == 2 for r in plan.layers[2].recvs)
        assert plan.layers[2].local_copies and plan.layers[3].local_copies
        assert not plan.layers[3].recvs and not plan.layers[3].keep


@pytest.mark.parametrize("depth", [1, 2])
def test_failure_in_on_layer_leaves_later_layers_old(
    world2: RankPool, anyio_backend: str, depth: int
) -> None:
    assert world2.run(failing_on_layer, depth, 5, backend=anyio_backend) == [[0, 1, 2]] * 2


def test_failure_in_on_layer_4_ranks(world4: RankPool) -> None:
    assert world4.run(failing_on_layer, 2, 6, backend="trio") == [[0, 1, 2]] * 4


@pytest.mark.parametrize("check", [False, True])
def test_mismatched_target_fails_on_every_rank(world4: RankPool, check: bool) -> None:
    messages = world4.run(mismatched_target, check, 7, backend="asyncio")
    print(messages[0])
    if check:
        assert all("every rank must pass identical placements" in m for m in messages)


@pytest.mark.parametrize(
    ("how", "depth", "done"),
    [
        ("from-on_layer", 1, 2),
        ("from-on_layer", 2, 2),
        ("move_on_after", 2, 1),
        ("during-transfer", 2, 1),
    ],
)
def test_cancellation_is_consistent_and_resumable(
    world2: RankPool, anyio_backend: str, how: str, depth: int, done: int
) -> None:
    results = world2.run(cancelled, how, depth, 9, backend=anyio_backend)
    print(how, "batches in flight when cancelled:", [r["in_flight_at_cancel"] for r in results])
    assert [r["done"] for r in results] == [done, done]


def test_event_loop_stays_responsive(world2: RankPool, anyio_backend: str) -> None:
    results = world2.run(loop_stall, 3, backend=anyio_backend)
    for rank, r in enumerate(results):
        print(
            f"{anyio_backend} rank {rank}: {r['mb']:.1f} MB received in {r['seconds'] * 1e3:.0f} "
            f"ms, longest loop stall {r['max_stall'] * 1e3:.2f} ms over {r['ticks']} ticks"
        )
        assert r["ticks"] > 10
        assert r["max_stall"] < r["seconds"] / 4, r


@pytest.mark.gpu
def test_cuda_commits_follow_stream_order(world2: RankPool) -> None:
    from .conftest import require_gpu

    require_gpu(1)
    for rank, r in enumerate(world2.run(cuda_stream_order, 13, backend="asyncio")):
        print(f"cuda rank {rank}: {r['seconds'] * 1e3:.0f} ms, stall {r['max_stall'] * 1e3:.2f} ms")
        assert r["max_stall"] < 0.05, r


def test_validation_errors_move_nothing(world2: RankPool) -> None:
    messages = world2.run(validation, backend="asyncio")
    assert messages[0] == messages[1]


def test_expected_bytes_counts_duplicates_once_on_the_wire() -> None:
    old, new = hand_built(2)
    plan = aeplb.plan_rearrangement(old, new, rank=0, world_size=2)
    weights = make_weights(0, 2, old, 0)
    got = expected_bytes(plan, weights)
    assert got.sent > 0 and got.received > 0 and got.copied_locally > 0


REJECTED_BECAUSE = {
    "expert-id": "needs expert 99",
    "shape": "new_phy2log: shape",
    "weights-not-a-list": "expert_weights: expected a sequence",
    "queued-op": "comm: has 1 queued op",
    "timeout": "timeout: expected positive seconds",
}


def test_one_rank_rejecting_its_arguments_stops_every_rank_at_once(
    world2: RankPool, anyio_backend: str
) -> None:
    good, bad = world2.run(rejected_on_one_rank, backend=anyio_backend, timeout=120)
    for on_0, on_1 in zip(good, bad, strict=True):
        print(
            f"{on_0['case']}: rank 0 {on_0['error']} in {on_0['seconds']:.3f} s, "
            f"rank 1 {on_1['error']} in {on_1['seconds']:.3f} s"
        )
        assert on_1["error"] == "InvalidTransferError", on_1
        assert REJECTED_BECAUSE[on_1["case"]] in on_1["message"], on_1
        assert on_0["error"] == "PeerMismatchError", on_0
        assert "rank(s) [1] rejected their arguments" in on_0["message"], on_0
        # The communicator's timeout is 20 s: rank 0 must not have waited for it.
        assert on_0["seconds"] < 10 and on_1["seconds"] < 10, (on_0, on_1)
        assert on_0["left_queued"] == 0
        assert on_1["left_queued"] == (1 if on_1["case"] == "queued-op" else 0)
