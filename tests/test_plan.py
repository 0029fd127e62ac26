from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aeplb._exceptions import InvalidTransferError
from aeplb.plan import (
    LayerBytes,
    LocalCopy,
    RearrangementPlan,
    Recv,
    Send,
    plan_rearrangement,
)

Case = tuple[np.ndarray, np.ndarray, int]


@st.composite
def placements(draw: st.DrawFn) -> Case:
    """Random (old, new, world_size) where every new expert exists in the old layer."""
    world = draw(st.integers(1, 8))
    slots = draw(st.integers(1, 6))
    num_layers = draw(st.integers(1, 3))
    num_phy = world * slots
    num_experts = draw(st.integers(1, num_phy))
    cells = num_layers * num_phy
    old = np.array(
        draw(st.lists(st.integers(0, num_experts - 1), min_size=cells, max_size=cells))
    ).reshape(num_layers, num_phy)
    # Each new slot either keeps its expert or takes the one of some old slot of the layer.
    sources = draw(
        st.lists(st.one_of(st.none(), st.integers(0, num_phy - 1)), min_size=cells, max_size=cells)
    )
    new = old.copy()
    for i, src in enumerate(sources):
        if src is not None:
            layer, slot = divmod(i, num_phy)
            new[layer, slot] = old[layer, src]
    # Sparse, large ids must work as well as 0..E-1.
    if draw(st.booleans()):
        old, new = old * 1000 + 7, new * 1000 + 7
    return old, new, world


def simulate(old: np.ndarray, new: np.ndarray, plans: list[RearrangementPlan]) -> np.ndarray:
    """Apply all ranks' plans to weights encoded as expert ids; return the result [L, R]."""
    world = len(plans)
    num_layers, num_phy = old.shape
    slots = num_phy // world
    out = np.full_like(old, -1)
    for layer in range(num_layers):
        olds = [old[layer, r * slots : (r + 1) * slots] for r in range(world)]
        lps = [p.layers[layer] for p in plans]
        for r, lp in enumerate(lps):
            mine = out[layer, r * slots : (r + 1) * slots]
            filled: Counter[int] = Counter()
            for s in lp.keep:
                mine[s] = olds[r][s]
                filled[s] += 1
            for copy in lp.local_copies:
                mine[copy.dst_slot] = olds[r][copy.src_slot]
                filled[copy.dst_slot] += 1
            for recv in lp.recvs:
                # Pair with the sender's sends to r by position: the ordering contract.
                from_src = [s for s in lps[recv.src_rank].sends if s.dst_rank == r]
                to_me = [v for v in lp.recvs if v.src_rank == recv.src_rank]
                send = from_src[to_me.index(recv)]
                assert len(from_src) == len(to_me)
                assert send.expert == recv.expert
                payload = olds[recv.src_rank][send.src_slot]
                for s in recv.dst_slots:
                    mine[s] = payload
                    filled[s] += 1
            assert sorted(filled) == list(range(slots))
            assert set(filled.values()) == {1}, "every slot is written exactly once"
    return out


@settings(max_examples=150, deadline=None)
@given(placements())
def test_all_ranks_reach_the_new_placement(case: Case) -> None:
    old, new, world = case
    plans = [plan_rearrangement(old, new, rank=r, world_size=world) for r in range(world)]
    np.testing.assert_array_equal(simulate(old, new, plans), new)

    num_layers, num_phy = old.shape
    slots = num_phy // world
    for layer in range(num_layers):
        lps = [p.layers[layer] for p in plans]
        changed = bool((old[layer] != new[layer]).any())
        assert {lp.changed for lp in lps} == {changed}
        busy = any(lp.local_copies or lp.recvs or lp.sends for lp in lps)
        assert busy == changed
        sends_by_holder: Counter[tuple[int, int]] = Counter()
        for r, lp in enumerate(lps):
            assert lp.layer == layer
            held = set(old[layer, r * slots : (r + 1) * slots].tolist())
            assert lp.sends == tuple(sorted(lp.sends, key=lambda s: (s.dst_rank, s.expert)))
            assert lp.recvs == tuple(sorted(lp.recvs, key=lambda v: (v.src_rank, v.expert)))
            for recv in lp.recvs:
                assert recv.expert not in held, "never receive an expert already held"
                assert recv.src_rank != r
            assert len({v.expert for v in lp.recvs}) == len(lp.recvs), "receive once"
            for send in lp.sends:
                assert old[layer, r * slots + send.src_slot] == send.expert
                sends_by_holder[(send.expert, r)] += 1
            assert lp.num_sent == len(lp.sends)
            assert lp.num_received == len(lp.recvs)
        # Sends of each expert are spread evenly over the ranks that held it.
        for expert in {e for e, _ in sends_by_holder}:
            holders = {r for r in range(world) if expert in old[layer, r * slots : (r + 1) * slots]}
            counts = [sends_by_holder[(expert, r)] for r in holders]
            assert max(counts) - min(counts) <= 1
    assert sum(p.num_sent for p in plans) == sum(p.num_received for p in plans)


@settings(max_examples=30, deadline=None)
@given(placements())
def test_torch_and_numpy_inputs_agree(case: Case) -> None:
    old, new, world = case
    rank = world - 1
    a = plan_rearrangement(old, new, rank=rank, world_size=world)
    b = plan_rearrangement(
        torch.from_numpy(old), torch.from_numpy(new.astype(np.int32)), rank=rank, world_size=world
    )
    assert a == b


def test_worked_example() -> None:
    # 2 ranks x 3 slots. Rank 0: [0, 1, 2] -> [0, 2, 3]; rank 1: [3, 3, 4] -> [1, 1, 3].
    old = np.array([[0, 1, 2, 3, 3, 4]])
    new = np.array([[0, 2, 3, 1, 1, 3]])
    p0 = plan_rearrangement(old, new, rank=0, world_size=2)
    p1 = plan_rearrangement(old, new, rank=1, world_size=2)
    l0, l1 = p0.layers[0], p1.layers[0]
    assert l0.keep == (0,)
    assert l0.local_copies == (LocalCopy(2, 1),)
    assert l0.recvs == (Recv(1, 3, (2,)),)
    assert l0.sends == (Send(1, 1, 1),)
    assert l1.keep == ()
    assert l1.local_copies == (LocalCopy(0, 2),)
    assert l1.recvs == (Recv(0, 1, (0, 1)),)
    assert l1.sends == (Send(0, 3, 0),)
    assert l0.changed
    assert l1.changed
    assert p0.bytes_per_layer(100) == (LayerBytes(sent=100, received=100),)
    assert (p0.rank, p0.world_size, p0.slots_per_rank) == (0, 2, 3)


def test_unchanged_layer_is_idle_on_every_rank() -> None:
    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = np.array([[0, 1, 2, 3], [1, 0, 2, 3]])
    for rank in range(2):
        plan = plan_rearrangement(old, new, rank=rank, world_size=2)
        first, second = plan.layers
        assert not first.changed
        assert first.keep == (0, 1)
        assert first.local_copies == first.recvs == first.sends == ()
        assert second.changed
    # Rank 1 has nothing to do on layer 1 but must still know the layer runs.
    assert plan.layers[1].keep == (0, 1)


def test_receivers_spread_over_holders() -> None:
    # Expert 0 held by ranks 0 and 1; ranks 2..5 all need it: two sends per holder.
    old = np.array([[0, 1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    new = np.array([[0, 1, 0, 2, 0, 4, 0, 6, 0, 8, 0, 10]])
    sent = [plan_rearrangement(old, new, rank=r, world_size=6).num_sent for r in range(6)]
    assert sent[:2] == [2, 2]
    assert sum(sent) == 4


@pytest.mark.parametrize(
    ("old", "new", "kwargs", "match"),
    [
        ([[0, 1]], [[0, 1, 1]], {}, "shape"),
        ([0, 1], [0, 1], {}, "old_phy2log"),
        ([[0, 1]], [[0.0, 1.0]], {}, "new_phy2log.*dtype"),
        (torch.tensor([[0.0, 1.0]]), [[0, 1]], {}, "old_phy2log.*dtype"),
        ([[0, 1]], [[0, -1]], {}, "new_phy2log.*negative"),
        ([[0, 1]], [[0, 1]], {"rank": 2}, "rank"),
        ([[0, 1]], [[0, 1]], {"rank": -1}, "rank"),
        ([[0, 1]], [[0, 1]], {"world_size": 0}, "world_size"),
        ([[0, 1, 2]], [[0, 1, 2]], {"world_size": 2}, "world_size"),
        ([[0, 1]], [[0, 1]], {"rank": 1.0}, "rank"),
        ([[0, 1]], [[0, 1]], {"world_size": True}, "world_size"),
        ([[0, 1], [2, 3]], [[0, 1], [2, 5]], {}, "layer 1 needs expert 5"),
    ],
)
def test_validation(old: object, new: object, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"rank": 0, "world_size": 1}
    args.update(kwargs)
    with pytest.raises(InvalidTransferError, match=match):
        plan_rearrangement(old, new, **args)  # type: ignore[arg-type]


def test_bytes_per_layer_validates() -> None:
    plan = plan_rearrangement([[0, 1]], [[1, 0]], rank=0, world_size=2)
    assert plan.bytes_per_layer(8) == (LayerBytes(8, 8),)
    with pytest.raises(InvalidTransferError, match="expert_bytes"):
        plan.bytes_per_layer(-1)


def test_full_size_plan_is_fast_enough() -> None:
    rng = np.random.default_rng(0)
    old = np.stack([rng.permutation(np.arange(288) % 256) for _ in range(58)])
    new = np.stack([rng.permutation(row) for row in old])
    plans = [plan_rearrangement(old, new, rank=r, world_size=32) for r in range(32)]
    np.testing.assert_array_equal(simulate(old, new, plans), new)
