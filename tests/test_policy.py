from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aeplb._exceptions import InvalidTransferError
from aeplb.policy import Placement, rebalance_experts

REF_LOAD = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
FLOAT_MAX = float(np.finfo(np.float64).max)
# DeepSeek EPLB README's answer for REF_LOAD, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
REF_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def gpu_loads(load: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """[L, num_gpus] load per GPU, each expert's load split evenly over its replicas."""
    num_layers, num_experts = load.shape
    logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    per_slot = np.take_along_axis(load / np.maximum(logcnt, 1), phy2log, axis=1)
    return per_slot.reshape(num_layers, num_gpus, -1).sum(-1)


def check_invariants(
    placement: Placement, load: np.ndarray, num_replicas: int, num_gpus: int
) -> None:
    phy2log, log2phy, logcnt = (t.numpy() for t in placement)
    num_layers, num_experts = load.shape
    assert phy2log.shape == (num_layers, num_replicas)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int64
    assert logcnt.shape == (num_layers, num_experts)
    assert (logcnt >= 1).all()
    assert (logcnt.sum(1) == num_replicas).all()
    assert log2phy.shape == (num_layers, num_experts, logcnt.max())
    for layer in range(num_layers):
        counts = np.bincount(phy2log[layer], minlength=num_experts)
        np.testing.assert_array_equal(counts, logcnt[layer])
        for expert in range(num_experts):
            slots = log2phy[layer, expert]
            valid = slots[slots >= 0]
            assert (slots[len(valid) :] == -1).all(), "padding must trail"
            assert len(valid) == logcnt[layer, expert]
            assert sorted(valid.tolist()) == np.flatnonzero(phy2log[layer] == expert).tolist()
    assert num_replicas % num_gpus == 0


def check_groups_on_one_node(phy2log: np.ndarray, num_groups: int, num_nodes: int, e: int) -> None:
    group_size = e // num_groups
    for row in phy2log:
        node_of_slot = np.arange(len(row)) // (len(row) // num_nodes)
        for group in range(num_groups):
            nodes = set(node_of_slot[row // group_size == group].tolist())
            assert len(nodes) == 1, f"group {group} spans nodes {nodes}"


def test_reference_case_no_worse_than_published_answer() -> None:
    load = np.array(REF_LOAD, dtype=np.float64)
    placement = rebalance_experts(torch.tensor(REF_LOAD), 16, 4, 2, 8)
    check_invariants(placement, load, 16, 8)
    check_groups_on_one_node(placement.phy2log.numpy(), 4, 2, 12)
    ours = gpu_loads(load, placement.phy2log.numpy(), 8).max(1)
    reference = gpu_loads(load, np.array(REF_PHY2LOG), 8).max(1)
    assert (ours <= reference + 1e-9).all(), (ours, reference)


def test_unpacks_as_triple_and_accepts_array_likes() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(REF_LOAD, 16, 4, 2, 8)
    again = rebalance_experts(np.array(REF_LOAD, dtype=np.int32), 16, 4, 2, 8)
    assert torch.equal(phy2log, again.phy2log)
    assert torch.equal(log2phy, again.log2phy)
    assert torch.equal(logcnt, again.logcnt)


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int, int]:
    num_nodes = draw(st.sampled_from([1, 2, 4]))
    gpus_per_node = draw(st.sampled_from([1, 2, 3]))
    num_gpus = num_nodes * gpus_per_node
    if num_nodes == 1 or draw(st.booleans()):
        num_groups = num_nodes * draw(st.integers(1, 3))
    else:
        num_groups = draw(st.sampled_from([g for g in (3, 5, 7) if g % num_nodes != 0]))
    num_experts = num_groups * draw(st.integers(1, 4))
    per_gpu = -(-num_experts // num_gpus) + draw(st.integers(0, 2))
    num_layers = draw(st.integers(1, 3))
    values = draw(
        st.lists(
            st.integers(0, 50), min_size=num_layers * num_experts, max_size=num_layers * num_experts
        )
    )
    load = np.array(values, dtype=np.float64).reshape(num_layers, num_experts)
    return load, per_gpu * num_gpus, num_groups, num_nodes, num_gpus


@settings(max_examples=60, deadline=None)
@given(problems())
def test_invariants(problem: tuple[np.ndarray, int, int, int, int]) -> None:
    load, num_replicas, num_groups, num_nodes, num_gpus = problem
    placement = rebalance_experts(
        torch.from_numpy(load), num_replicas, num_groups, num_nodes, num_gpus
    )
    check_invariants(placement, load, num_replicas, num_gpus)
    if num_groups % num_nodes == 0:
        check_groups_on_one_node(placement.phy2log.numpy(), num_groups, num_nodes, load.shape[1])
    again = rebalance_experts(load, num_replicas, num_groups, num_nodes, num_gpus)
    for a, b in zip(placement, again, strict=True):
        assert torch.equal(a, b), "must be deterministic"


@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(0, 2**32 - 1))
def test_current_reduces_moves_and_keeps_gpu_contents(
    problem: tuple[np.ndarray, int, int, int, int], seed: int
) -> None:
    load, num_replicas, num_groups, num_nodes, num_gpus = problem
    rng = np.random.default_rng(seed)
    # The placement in use: one for other loads, so that some slots can stay.
    other = rng.permutation(load, axis=1)
    current = rebalance_experts(other, num_replicas, num_groups, num_nodes, num_gpus).phy2log
    plain = rebalance_experts(load, num_replicas, num_groups, num_nodes, num_gpus)
    aligned = rebalance_experts(
        load, num_replicas, num_groups, num_nodes, num_gpus, current=current
    )
    check_invariants(aligned, load, num_replicas, num_gpus)
    assert torch.equal(aligned.logcnt, plain.logcnt)
    cur = current.numpy()
    plain_p, aligned_p = plain.phy2log.numpy(), aligned.phy2log.numpy()
    assert (aligned_p != cur).sum() <= (plain_p != cur).sum()
    per_gpu = num_replicas // num_gpus
    shape = (load.shape[0], num_gpus, per_gpu)
    np.testing.assert_array_equal(
        np.sort(aligned_p.reshape(shape), axis=-1), np.sort(plain_p.reshape(shape), axis=-1)
    )
    np.testing.assert_allclose(
        gpu_loads(load, aligned_p, num_gpus), gpu_loads(load, plain_p, num_gpus)
    )
    # Passing the result itself back as current must keep every slot.
    fixed = rebalance_experts(
        load, num_replicas, num_groups, num_nodes, num_gpus, current=aligned.phy2log
    )
    assert torch.equal(fixed.phy2log, aligned.phy2log)


def test_current_keeps_all_when_loads_unchanged_but_slots_shuffled() -> None:
    load = np.array(REF_LOAD, dtype=np.float64)
    base = rebalance_experts(load, 16, 4, 2, 8).phy2log.numpy()
    # Shuffle slots within each GPU (2 slots per GPU): a perfect alignment exists.
    shuffled = base.reshape(2, 8, 2)[:, :, ::-1].reshape(2, 16).copy()
    out = rebalance_experts(load, 16, 4, 2, 8, current=torch.from_numpy(shuffled))
    np.testing.assert_array_equal(out.phy2log.numpy(), shuffled)


def test_benchmark_sized_problem_is_valid() -> None:
    gen = torch.Generator().manual_seed(0)
    load = torch.rand(4, 256, generator=gen) ** 4 * 1000
    placement = rebalance_experts(load, 288, 8, 4, 32)
    check_invariants(placement, load.double().numpy(), 288, 32)
    check_groups_on_one_node(placement.phy2log.numpy(), 8, 4, 256)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_replicas": 18}, "num_replicas"),  # not a multiple of 8 GPUs
        ({"num_replicas": 8, "num_gpus": 4}, "num_replicas"),  # fewer slots than experts
        ({"num_gpus": 6, "num_replicas": 18, "num_nodes": 4}, "num_gpus"),
        ({"num_groups": 8, "num_nodes": 2}, "num_groups"),  # 12 experts, 8 groups
        ({"num_gpus": 0}, "num_gpus"),
        ({"num_nodes": True}, "num_nodes"),
        ({"num_groups": 2.0}, "num_groups"),
    ],
)
def test_bad_sizes(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_replicas": 16, "num_groups": 4, "num_nodes": 2, "num_gpus": 8}
    args.update(kwargs)
    with pytest.raises(InvalidTransferError, match=match):
        rebalance_experts(REF_LOAD, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "load",
    [
        [1.0, 2.0, 3.0, 4.0],
        [[[1.0, 2.0]]],
        [[1.0, -2.0, 3.0, 4.0]],
        [[1.0, float("nan"), 3.0, 4.0]],
        [[1.0, float("inf"), 3.0, 4.0]],
        [["a", "b", "c", "d"]],
        np.zeros((0, 4)),
    ],
)
def test_bad_load(load: object) -> None:
    with pytest.raises(InvalidTransferError, match="load"):
        rebalance_experts(load, 4, 1, 1, 2)


@pytest.mark.parametrize(
    "current",
    [
        np.zeros((2, 8), dtype=np.int64),  # wrong shape
        np.zeros((2, 16)),  # float
        torch.zeros(2, 16, dtype=torch.bool),
        np.full((2, 16), 12),  # expert id out of range
        np.full((2, 16), -1),
    ],
)
def test_bad_current(current: object) -> None:
    with pytest.raises(InvalidTransferError, match="current"):
        rebalance_experts(REF_LOAD, 16, 4, 2, 8, current=current)


@pytest.mark.filterwarnings("error")  # a cast that warns instead of refusing fails too
@pytest.mark.parametrize(
    ("load", "match"),
    [
        pytest.param(np.full((1, 6), 1e308), "layer 0's loads sum to more", id="sum-overflows"),
        pytest.param(
            [[1.0] * 6, [FLOAT_MAX / 2] * 3 + [0.0] * 3],
            "layer 1's loads sum to more",
            id="second-layer-sum-overflows",
        ),
        pytest.param(np.full((1, 6), 1 + 1j), r"complex values \(complex128\)", id="complex-array"),
        pytest.param(
            torch.full((1, 6), 1 + 1j), r"complex values \(torch.complex64\)", id="complex-tensor"
        ),
        pytest.param(
            np.array([[1, 2, 3, 4, 5, np.complex128(6)]], dtype=object),
            "complex values",
            id="complex-in-object-array",
        ),
        pytest.param(
            np.array([[1, 2, 3, 4, 5, "6"]], dtype=object),
            r"non-numeric values \(str\)",
            id="str-in-object-array",
        ),
        pytest.param(np.array([["1", "2", "3", "4", "5", "6"]]), "non-numeric", id="str-array"),
        pytest.param([[1, 2, 3, 4, 5, 10**400]], "too large for float64", id="int-beyond-float64"),
    ],
)
def test_load_must_be_real_with_finite_sums(load: object, match: str) -> None:
    with pytest.raises(InvalidTransferError, match=match) as info:
        rebalance_experts(load, 8, 1, 1, 2)
    assert "loads must be real, finite and non-negative" in str(info.value)


def test_loads_near_the_float64_maximum_with_a_finite_sum_still_work() -> None:
    for load in (np.full((1, 6), 1e307), np.array([[FLOAT_MAX / 2] * 2 + [0.0] * 4])):
        check_invariants(rebalance_experts(load, 8, 1, 1, 2), load, 8, 2)
    # Scaling by a power of two is exact, so the greedy choices are the same.
    scaled = rebalance_experts(np.array(REF_LOAD, dtype=np.float64) * 2.0**1010, 16, 4, 2, 8)
    assert torch.equal(scaled.phy2log, rebalance_experts(REF_LOAD, 16, 4, 2, 8).phy2log)
