"""Bad inputs across the public API: each raises its typed error, naming the argument.

In-process: create_communicator runs on a one-rank Gloo group of this process, and
the queueing layer and rearrange_experts run on the fake transport (nothing executes there
unless a case gets past validation, which the fake makes visible). The policy and the planner
are fuzzed with hypothesis: arbitrary shapes, ranks and placements must either give a valid
result or raise InvalidTransferError, never anything else.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aeplb
from aeplb import Communicator, InvalidTransferError

from .fakes import FakeTransport
from .test_plan import simulate
from .test_policy import check_invariants

NAN, INF = math.nan, math.inf
BAD_TIMEOUTS = [-1, 0, -0.5, "5", True, NAN, INF, -INF, 1e300, [1]]


def _aeplb_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("aeplb")}


def fake_comm(rank: int = 1, world: int = 4) -> tuple[Communicator, FakeTransport]:
    fake = FakeTransport(rank, world)
    return Communicator(fake, check_peers=False), fake


# -- create_communicator -----------------------------------------------------------------

CREATE_CASES: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"backend": "mpi"}, InvalidTransferError, "backend"),
    ({"backend": None}, InvalidTransferError, "backend"),
    ({"backend": "GLOO"}, InvalidTransferError, "backend"),
    *[({"timeout": t}, InvalidTransferError, "timeout") for t in BAD_TIMEOUTS],
    ({"device": "gpu7"}, InvalidTransferError, "device"),
    ({"device": 3.5}, InvalidTransferError, "device"),
    ({"group": "world"}, InvalidTransferError, "group"),
    ({"group": object()}, InvalidTransferError, "group"),
    ({"group": 0}, InvalidTransferError, "group"),
    ({"check_peers": "no"}, InvalidTransferError, "check_peers"),
    ({"check_peers": 1}, InvalidTransferError, "check_peers"),
    ({"check_peers": None}, InvalidTransferError, "check_peers"),
    ({"warm_up": "yes"}, InvalidTransferError, "warm_up"),
    ({"warm_up": 0}, InvalidTransferError, "warm_up"),
    ({"chunk_bytes": 0}, InvalidTransferError, "chunk_bytes"),
    ({"chunk_bytes": -8}, InvalidTransferError, "chunk_bytes"),
    ({"chunk_bytes": 1.5}, InvalidTransferError, "chunk_bytes"),
    ({"chunk_bytes": True}, InvalidTransferError, "chunk_bytes"),
    ({"staging_bytes": 0}, InvalidTransferError, "staging_bytes"),
    ({"staging_bytes": 10}, InvalidTransferError, "staging_bytes"),
    ({"stripes": 0}, InvalidTransferError, "stripes"),
    ({"stripes": "2"}, InvalidTransferError, "stripes"),
    ({"stripes": True}, InvalidTransferError, "stripes"),
    ({"enqueue_on": "thread"}, InvalidTransferError, "enqueue_on"),
    ({"enqueue_on": "caller"}, InvalidTransferError, "enqueue_on"),  # gloo has no caller mode
    ({"frobnicate": True}, TypeError, "frobnicate"),
    ({"max_ops_per_group": 8}, TypeError, "max_ops_per_group"),  # an NCCL option on gloo
    ({"nccl_library": "libnccl.so"}, TypeError, "nccl_library"),
    ({"device": "cuda"}, aeplb.BackendUnavailableError, "cuda"),  # gloo staging, no CUDA
    ({"backend": "nccl"}, aeplb.BackendUnavailableError, "nccl"),
    ({"backend": "pynccl"}, aeplb.BackendUnavailableError, "pynccl"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "name"), CREATE_CASES, ids=[repr(k)[1:-1] for k, _, _ in CREATE_CASES]
)
def test_create_communicator(
    one_rank_group: None, kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    needs_cuda = kwargs.get("backend") in ("nccl", "pynccl") or kwargs.get("device") == "cuda"
    if needs_cuda and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = {"backend": "gloo", **kwargs}
    before = _aeplb_threads()
    with pytest.raises(error, match=name):
        aeplb.create_communicator(**args)
    assert _aeplb_threads() <= before, "a rejected communicator left a worker thread"


def test_unknown_option_is_refused_before_the_transport_exists(one_rank_group: None) -> None:
    from aeplb.transports import _gloo_groups

    before = _gloo_groups.groups_made
    with pytest.raises(TypeError, match="frobnicate"):
        aeplb.create_communicator("gloo", stripes=3, frobnicate=True)
    assert _gloo_groups.groups_made == before, "groups were made for a rejected call"


@pytest.mark.anyio
async def test_create_communicator_good_inputs_still_work(one_rank_group: None) -> None:
    good: list[dict[str, Any]] = [
        {},
        {"timeout": 5},
        {"timeout": 1e6},
        {"device": "cpu"},
        {"check_peers": False},
        {"warm_up": False},
    ]
    for kwargs in good:
        async with aeplb.create_communicator("gloo", **kwargs) as comm:
            buf = torch.zeros(3)
            comm.add_send(torch.arange(3.0), 0)
            comm.add_recv(buf, 0)
            await comm.execute()
            assert torch.equal(buf, torch.arange(3.0))
    group = dist.new_group([0], backend="gloo")
    async with aeplb.create_communicator("gloo", group=group, timeout=5) as comm:
        assert (comm.rank, comm.world_size) == (0, 1)


# -- add_send / add_recv ---------------------------------------------------------------------

T = torch.arange(16.0).reshape(4, 4)


def _sparse() -> torch.Tensor:
    return T.to_sparse()


def _sparse_csr() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.zeros(2, 2).to_sparse_csr()


OP_CASES: list[tuple[Any, Any, str]] = [
    # tensor, peer, the argument the message must name
    ([1.0, 2.0], 0, "tensor must be a torch.Tensor"),
    (np.ones(3), 0, "tensor must be a torch.Tensor"),
    (None, 0, "tensor must be a torch.Tensor"),
    (3.0, 0, "tensor must be a torch.Tensor"),
    (T.t(), 0, "tensor .*not contiguous"),
    (T[:, 1], 0, "tensor .*not contiguous"),
    (_sparse(), 0, "tensor has layout"),
    (T, -1, "{rank}=-1 is out of range"),
    (T, 4, "{rank}=4 is out of range"),
    (T, 10**20, "{rank}=.* is out of range"),
    (T, True, "{rank} must be an int"),
    (T, "1", "{rank} must be an int"),
    (T, 1.0, "{rank} must be an int"),
    (T, None, "{rank} must be an int"),
    (T, np.int64(1), "{rank} must be an int"),
    (T, torch.tensor(1), "{rank} must be an int"),
]


@pytest.mark.parametrize(
    ("tensor", "peer", "pattern"),
    OP_CASES,
    ids=[f"{i}-{type(t).__name__}-{p!r}" for i, (t, p, _) in enumerate(OP_CASES)],
)
@pytest.mark.parametrize("verb", ["add_send", "add_recv"])
def test_queue_op(verb: str, tensor: Any, peer: Any, pattern: str) -> None:
    comm, _ = fake_comm()
    comm.add_send(torch.ones(2), 0)  # something already queued stays queued
    rank_arg = "dst_rank" if verb == "add_send" else "src_rank"
    with pytest.raises(InvalidTransferError, match=f"{verb}: " + pattern.format(rank=rank_arg)):
        getattr(comm, verb)(tensor, peer)
    assert comm.pending == 1, "a rejected op must not be queued"
    comm.clear()


def test_queue_op_takes_subclasses() -> None:
    """A Parameter and an int subclass rank pass; the rank is queued as a plain int."""
    import enum

    class Peer(enum.IntEnum):
        ONE = 1

    comm, _ = fake_comm(rank=0)
    weight = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    comm.add_send(weight, Peer.ONE)
    comm.add_recv(torch.ones(2), 1)
    assert comm.pending == 2
    row = comm._queue.rows[:6]
    assert row[0] == 1 and type(row[0]) is int
    assert row[-1] == weight.data_ptr()
    comm.clear()


@pytest.mark.parametrize(
    "tensor",
    [torch.empty(3, device="meta"), _sparse_csr()],
    ids=["meta", "sparse-csr"],
)
@pytest.mark.parametrize("verb", ["add_send", "add_recv"])
def test_queue_op_on_gloo(one_rank_group: None, verb: str, tensor: torch.Tensor) -> None:
    """Checks that only the transport can make (devices), on the real Gloo transport."""
    comm = aeplb.create_communicator("gloo", timeout=5)
    with pytest.raises(InvalidTransferError, match=verb):
        getattr(comm, verb)(tensor, 0)
    assert comm.pending == 0
    with pytest.raises(InvalidTransferError, match="set_stream"):
        comm.set_stream("stream")  # type: ignore[arg-type]
    comm.blocking().close()


@pytest.mark.anyio
async def test_batch_ops_are_checked_like_queue_ops() -> None:
    comm, fake = fake_comm()
    async with comm.batch() as b:
        with pytest.raises(InvalidTransferError, match="dst_rank=9"):
            b.add_send(T, 9)
        with pytest.raises(InvalidTransferError, match=r"tensor must be a torch\.Tensor"):
            b.add_recv("buffer", 0)
        assert b.pending == 0
    assert fake.batches == [[]]
    await comm.aclose()


# -- execute / batch / blocking timeouts -------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
async def test_execute_timeout(timeout: Any) -> None:
    comm, fake = fake_comm()
    buf = torch.zeros(4)
    comm.add_send(torch.ones(4), 2)
    comm.add_recv(buf, 2)
    with pytest.raises(InvalidTransferError, match="execute: timeout"):
        await comm.execute(timeout=timeout)
    with pytest.raises(InvalidTransferError, match="batch: timeout"):
        comm.batch(timeout=timeout)
    with pytest.raises(InvalidTransferError, match="execute: timeout"):
        comm.blocking().execute(timeout=timeout)
    # nothing ran, the queue is intact and the communicator still works
    assert comm.pending == 2 and fake.batches == []
    stats = comm.statistics()
    assert not stats.broken and stats.batches_failed == 0 and stats.last_error is None
    await comm.execute(timeout=5)
    assert torch.equal(buf, torch.full((4,), 7.0))
    await comm.aclose()


@pytest.mark.anyio
async def test_unknown_keyword_arguments_are_type_errors() -> None:
    comm, _ = fake_comm()
    with pytest.raises(TypeError, match="deadline"):
        await comm.execute(deadline=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="tag"):
        comm.add_send(T, 0, tag=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        comm.batch(5)  # type: ignore[misc]
    with pytest.raises(TypeError, match="stream"):
        aeplb.rebalance_experts([[1.0]], 1, 1, 1, 1, stream=None)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        aeplb.plan_rearrangement([[0]], [[0]], 0, 1)  # type: ignore[misc]
    with pytest.raises(TypeError, match="callback"):
        await aeplb.rearrange_experts(comm, [], torch.zeros(0, 1), [], callback=1)  # type: ignore[call-arg]
    await comm.aclose()


# -- rebalance_experts ---------------------------------------------------------------------

LOAD = [[3.0, 1.0, 4.0, 1.0], [5.0, 9.0, 2.0, 6.0]]
POLICY_CASES: list[tuple[Any, dict[str, Any], str]] = [
    (None, {}, "load"),
    ("hot", {}, "load"),
    (torch.ones(2, 4, 2), {}, "load"),
    (torch.ones(0, 4), {}, "load"),
    ([[1.0, 2.0], [3.0]], {}, "load"),  # ragged
    ([[1.0, -INF, 0.0, 0.0]], {}, "load"),
    (LOAD, {"num_replicas": 0}, "num_replicas"),
    (LOAD, {"num_replicas": "8"}, "num_replicas"),
    (LOAD, {"num_replicas": 8.0}, "num_replicas"),
    (LOAD, {"num_replicas": None}, "num_replicas"),
    (LOAD, {"num_replicas": 3}, "num_replicas"),  # fewer slots than experts
    (LOAD, {"num_replicas": 6}, "num_replicas"),  # not a multiple of 4 GPUs
    (LOAD, {"num_groups": -2}, "num_groups"),
    (LOAD, {"num_groups": 3, "num_nodes": 1}, "num_groups"),  # 4 experts, 3 groups
    (LOAD, {"num_nodes": 0}, "num_nodes"),
    (LOAD, {"num_nodes": 3}, "num_gpus"),  # 4 GPUs over 3 nodes
    (LOAD, {"num_gpus": False}, "num_gpus"),
    (LOAD, {"current": [[0, 1, 2, 3]]}, "current"),  # one layer, two expected
    (LOAD, {"current": [[0.0] * 8] * 2}, "current"),
    (LOAD, {"current": [[0, 1, 2, 3, 0, 1, 2, 9]] * 2}, "current"),
    (LOAD, {"current": "now"}, "current"),
]


@pytest.mark.parametrize(
    ("load", "kwargs", "name"),
    POLICY_CASES,
    ids=[f"{i}-{n}" for i, (_, _, n) in enumerate(POLICY_CASES)],
)
def test_rebalance_experts(load: Any, kwargs: dict[str, Any], name: str) -> None:
    args: dict[str, Any] = {"num_replicas": 8, "num_groups": 2, "num_nodes": 1, "num_gpus": 4}
    args.update(kwargs)
    with pytest.raises(InvalidTransferError, match=name):
        aeplb.rebalance_experts(load, **args)


SIZE = st.one_of(
    st.integers(-2, 24),
    st.integers(-2, 24).map(np.int64),
    st.sampled_from([True, False, None, 2.0, "4", 1e9]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(0, 3),
    experts=st.integers(0, 10),
    values=st.sampled_from(["ints", "floats", "negative", "nan", "bool", "text"]),
    ndim=st.sampled_from([2, 2, 2, 1, 3]),
    sizes=st.tuples(SIZE, SIZE, SIZE, SIZE),
    current=st.sampled_from([None, "random", "shape", "float"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_rebalance_experts(
    layers: int,
    experts: int,
    values: str,
    ndim: int,
    sizes: tuple[Any, Any, Any, Any],
    current: str | None,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    shape = {2: (layers, experts), 1: (experts,), 3: (layers, experts, 2)}[ndim]
    load: Any = rng.integers(0, 100, shape).astype(np.float64)
    if values == "floats":
        load = torch.from_numpy(load * 0.37)
    elif values == "negative" and load.size:
        load.flat[0] = -1.0
    elif values == "nan" and load.size:
        load.flat[-1] = np.nan
    elif values == "bool":
        load = load > 50
    elif values == "text":
        load = load.astype(str).tolist()
    replicas = sizes[0]
    cur: Any = None
    if current is not None and isinstance(replicas, int) and 0 < replicas < 64:
        cols = replicas + (1 if current == "shape" else 0)
        cur = rng.integers(0, max(experts, 1), (layers, cols))
        cur = cur.astype(np.float64) if current == "float" else cur
    try:
        placement = aeplb.rebalance_experts(load, *sizes, current=cur)
    except InvalidTransferError:
        return
    # accepted: then it is a valid placement
    arr = np.asarray(load.numpy() if isinstance(load, torch.Tensor) else load, dtype=np.float64)
    check_invariants(placement, arr, int(sizes[0]), int(sizes[3]))


# -- plan_rearrangement ----------------------------------------------------------------------

PLAN_CASES: list[tuple[Any, Any, dict[str, Any], str]] = [
    (None, [[0, 1]], {}, "old_phy2log"),
    ([[0, 1]], "new", {}, "new_phy2log"),
    ([[0, 1]], [[0, 1], [1, 0]], {}, "new_phy2log: shape"),
    (np.zeros((2, 0), np.int64), np.zeros((2, 0), np.int64), {}, "old_phy2log"),
    ([[[0, 1]]], [[[0, 1]]], {}, "old_phy2log"),
    ([[0, 1]], [[True, False]], {}, "new_phy2log"),
    ([[0, 1]], torch.tensor([[0, 1]], dtype=torch.complex64), {}, "new_phy2log"),
    ([[0, 1]], [[0, 1]], {"rank": "0"}, "rank"),
    ([[0, 1]], [[0, 1]], {"rank": None}, "rank"),
    ([[0, 1]], [[0, 1]], {"world_size": 2.0}, "world_size"),
    ([[0, 1]], [[0, 1]], {"world_size": 3}, "world_size"),
    ([[0, 1]], [[0, 2]], {}, "needs expert 2"),
]


@pytest.mark.parametrize(
    ("old", "new", "kwargs", "name"),
    PLAN_CASES,
    ids=[f"{i}-{n}" for i, (_, _, _, n) in enumerate(PLAN_CASES)],
)
def test_plan_rearrangement(old: Any, new: Any, kwargs: dict[str, Any], name: str) -> None:
    args: dict[str, Any] = {"rank": 0, "world_size": 1}
    args.update(kwargs)
    with pytest.raises(InvalidTransferError, match=name):
        aeplb.plan_rearrangement(old, new, **args)


RANK = st.one_of(st.integers(-2, 6), st.sampled_from([True, None, 1.0, "1", np.int64(1)]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(0, 3),
    slots=st.integers(0, 8),
    new_cols=st.sampled_from([0, 0, 0, 1]),
    ids=st.sampled_from(["small", "sparse", "negative", "float", "torch"]),
    rank=RANK,
    world=RANK,
    mutate=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_fuzz_plan_rearrangement(
    layers: int,
    slots: int,
    new_cols: int,
    ids: str,
    rank: Any,
    world: Any,
    mutate: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    old: Any = rng.integers(0, max(slots // 2, 1), (layers, slots))
    new: Any = old.copy()
    if slots:  # move experts around, sometimes to one no old slot holds
        mask = rng.random(new.shape) < mutate
        new[mask] = rng.integers(0, max(slots, 1), int(mask.sum()))
    new = np.concatenate([new, np.zeros((layers, new_cols), np.int64)], axis=1)
    if ids == "sparse":
        old, new = old * 100003 + 11, new * 100003 + 11
    elif ids == "negative" and new.size:
        new.flat[0] = -3
    elif ids == "float":
        new = new.astype(np.float32)
    elif ids == "torch":
        old, new = torch.from_numpy(old), torch.from_numpy(new).to(torch.int32)
    try:
        plan = aeplb.plan_rearrangement(old, new, rank=rank, world_size=world)
    except InvalidTransferError:
        return
    # accepted: every rank's plan together reaches the new placement
    w = int(world)
    plans = [aeplb.plan_rearrangement(old, new, rank=r, world_size=w) for r in range(w)]
    assert plans[int(rank)] == plan
    o, n = np.asarray(old), np.asarray(new)
    np.testing.assert_array_equal(simulate(o, n, plans), n)


# -- rearrange_experts -------------------------------------------------------------------------

OLD = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
NEW = torch.tensor([[1, 0, 2, 3], [3, 2, 0, 1]])


def _weights() -> list[list[torch.Tensor]]:
    return [
        [torch.full((2, 3), float(layer)), torch.ones(2, dtype=torch.int64)] for layer in (0, 1)
    ]


REARRANGE_CASES: list[tuple[dict[str, Any], str]] = [
    ({"comm": None}, "comm: expected an aeplb.Communicator"),
    ({"comm": "blocking"}, "comm: expected an aeplb.Communicator"),
    ({"expert_weights": torch.zeros(2, 2, 3)}, "expert_weights: expected a sequence"),
    ({"expert_weights": None}, "expert_weights: expected a sequence"),
    ({"expert_weights": "weights"}, "expected 2 layers"),
    ({"expert_weights": [[torch.zeros(2, 3)]]}, "expected 2 layers"),
    ({"expert_weights": [[torch.zeros(2, 3)], [1.0]]}, r"expert_weights\[1\]\[0\]: expected"),
    ({"expert_weights": [[torch.zeros(2, 3)], [torch.zeros(())]]}, r"\[1\]\[0\]: expected"),
    ({"expert_weights": [[torch.zeros(2, 3)], [torch.zeros(3, 2)]]}, r"holds this rank's 2"),
    ({"expert_weights": [[torch.zeros(2, 3)], [torch.zeros(3, 2).t()]]}, "not contiguous"),
    ({"expert_weights": [[torch.zeros(2, 3)], [T[:2].to_sparse()]]}, r"\[1\]\[0\]: is not contig"),
    ({"old_phy2log": OLD.tolist()}, "old_phy2log: expected the live integer"),
    ({"old_phy2log": OLD.float()}, "old_phy2log: expected the live integer"),
    ({"new_phy2log": NEW[:1]}, "new_phy2log: shape"),
    ({"new_phy2log": NEW.float()}, "new_phy2log: expected an integer"),
    ({"new_phy2log": NEW + 5}, "needs expert"),
    ({"new_phy2log": "new"}, "new_phy2log"),
    ({"on_layer": 5}, "on_layer: expected a callable"),
    ({"on_progress": "log"}, "on_progress: expected a callable"),
    ({"log2phy": torch.zeros(2, 4)}, "log2phy: expected a 3-D integer"),
    ({"log2phy": torch.zeros(2, 4, 1)}, "log2phy: expected a 3-D integer"),
    ({"log2phy": torch.zeros(2, 2, 1, dtype=torch.int64)}, "log2phy: shape"),
    ({"logcnt": torch.zeros(2, 4, 1, dtype=torch.int64)}, "logcnt: expected a 2-D"),
    ({"logcnt": [[1, 1, 1, 1]] * 2}, "logcnt: expected a 2-D"),
    ({"layers_in_flight": 0}, "layers_in_flight"),
    ({"layers_in_flight": True}, "layers_in_flight"),
    ({"layers_in_flight": 1.5}, "layers_in_flight"),
    *[({"timeout": t}, "timeout") for t in BAD_TIMEOUTS],
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("override", "pattern"),
    REARRANGE_CASES,
    ids=[f"{i}-{next(iter(o))}" for i, (o, _) in enumerate(REARRANGE_CASES)],
)
async def test_rearrange_experts(override: dict[str, Any], pattern: str) -> None:
    comm, fake = fake_comm(rank=0, world=2)
    weights = _weights()
    live = OLD.clone()
    args: dict[str, Any] = {
        "comm": comm,
        "expert_weights": weights,
        "old_phy2log": live,
        "new_phy2log": NEW,
        "check_placements": False,
    }
    args.update(override)
    if args["comm"] == "blocking":
        args["comm"] = comm.blocking()
    with pytest.raises(InvalidTransferError, match=pattern):
        await aeplb.rearrange_experts(**args)
    # nothing moved, nothing was committed, nothing stayed queued
    assert fake.batches == [] and comm.pending == 0
    assert torch.equal(live, OLD)
    for layer, ws in enumerate(weights):
        assert torch.equal(ws[0], torch.full((2, 3), float(layer)))
    # and the same call with good arguments runs
    stats = await aeplb.rearrange_experts(comm, weights, live, NEW, check_placements=False)
    assert stats.layers_changed == 2 and torch.equal(live, NEW)
    await comm.aclose()


@pytest.mark.anyio
async def test_rearrange_with_queued_ops_is_refused() -> None:
    comm, fake = fake_comm(rank=0, world=2)
    comm.add_send(torch.ones(1), 1)
    weights = _weights()
    with pytest.raises(InvalidTransferError, match="comm: has 1 queued op"):
        await aeplb.rearrange_experts(comm, weights, OLD.clone(), NEW)
    # Only the placement agreement ran (one int64 pair each way, so that the peers stop too),
    # apart from the queued op, which stays queued.
    assert comm.pending == 1 and fake.batches == [[2, 2]]
    for layer, ws in enumerate(weights):
        assert torch.equal(ws[0], torch.full((2, 3), float(layer)))
    await comm.aclose()
