"""The shared-memory mailbox that the ipc backend's ranks talk through (CPU only).

Multi-process tests run real spawned ranks; the torch.distributed group only agrees on the
file's name.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import torch.distributed as dist

from aeplb.transports._mailbox import Mailbox, PeerExitedError

from .multirank import RankPool

SMALL = (256, 64)  # payload bytes per channel, per kind: most messages span many frames


def _shared_path(rank: int) -> str:
    name = [f"/dev/shm/aeplb-test-{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    assert isinstance(name[0], str)
    return name[0]


def _open(rank: int, world: int, caps: tuple[int, ...] = SMALL) -> Mailbox:
    path = _shared_path(rank)
    if rank == 0:
        Mailbox.create(path, caps, world)
    dist.barrier()
    box = Mailbox(path, rank, caps, world)
    dist.barrier()
    if rank == 0:
        os.unlink(path)
    return box


def _message(src: int, dst: int, round_: int, size: int) -> bytes:
    return random.Random(f"{src}-{dst}-{round_}").randbytes(size)


def all_to_all(rank: int, world: int, rounds: int) -> int:
    box = _open(rank, world)
    sizes = random.Random(7)
    moved = 0
    try:
        for r in range(rounds):
            # the same size table on every rank: sizes[src][dst]
            table = [
                [sizes.choice([0, 1, 31, 224, 225, 1000, 5000]) for _ in range(world)]
                for _ in range(world)
            ]
            peers = [p for p in range(world) if p != rank]
            out = {p: _message(rank, p, r, table[rank][p]) for p in peers}
            got = box.exchange(r % 2, out, peers, time.monotonic() + 30)
            for p in peers:
                assert got[p] == _message(p, rank, r, table[p][rank]), (r, p)
                moved += len(got[p])
    finally:
        box.close()
    return moved


def test_all_to_all_messages_larger_than_a_channel(world4: RankPool) -> None:
    """Every rank sends every other one at once, most messages many frames long."""
    moved = world4.run(all_to_all, 60, timeout=120)
    assert all(m > 0 for m in moved)


def wait_for_dead_peer(rank: int, world: int) -> float:
    path = _shared_path(rank)
    if rank == 0:
        Mailbox.create(path, SMALL, world)
    dist.barrier()
    pids = [0] * world
    dist.all_gather_object(pids, os.getpid())

    def alive(peer: int) -> bool:
        try:
            os.kill(pids[peer], 0)
        except ProcessLookupError:
            return False
        return True

    box = Mailbox(path, rank, SMALL, world, alive)
    dist.barrier()
    if rank == 1:
        os._exit(0)  # gone without a word
    os.unlink(path)
    start = time.monotonic()
    with pytest.raises(PeerExitedError, match="local rank 1"):
        box.recv(0, 1, time.monotonic() + 60)
    box.close()
    return time.monotonic() - start


def test_a_peer_that_exits_is_noticed_before_the_deadline(world2: RankPool) -> None:
    took = world2.run(wait_for_dead_peer, allow_dead=True, timeout=60)
    assert took[0] is not None and took[0] < 5


@pytest.fixture
def pair() -> Iterator[tuple[Mailbox, Mailbox]]:
    path = os.path.join(tempfile.gettempdir(), f"aeplb-test-{uuid.uuid4().hex}")
    Mailbox.create(path, SMALL, 2)
    a, b = Mailbox(path, 0, SMALL, 2), Mailbox(path, 1, SMALL, 2)
    os.unlink(path)
    yield a, b
    a.close()
    b.close()


def test_timeout_names_the_silent_peer(pair: tuple[Mailbox, Mailbox]) -> None:
    a, _ = pair
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"local rank\(s\) \[1\]"):
        a.recv(0, 1, time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - start < 5


def test_writer_waits_for_the_reader_then_times_out(pair: tuple[Mailbox, Mailbox]) -> None:
    a, b = pair
    a.send(1, 1, b"x" * 10, None)  # fits one frame: returns without the reader
    with pytest.raises(TimeoutError):
        a.send(1, 1, b"y" * 10, time.monotonic() + 0.2)  # previous frame unread
    assert b.recv(1, 0, time.monotonic() + 1) == b"x" * 10


def test_liveness_check_fails_fast() -> None:
    path = os.path.join(tempfile.gettempdir(), f"aeplb-test-{uuid.uuid4().hex}")
    Mailbox.create(path, SMALL, 2)
    box = Mailbox(path, 0, SMALL, 2, alive=lambda peer: False)
    os.unlink(path)
    start = time.monotonic()
    with pytest.raises(PeerExitedError):
        box.recv(0, 1, time.monotonic() + 30)
    assert time.monotonic() - start < 2
    box.close()


def test_half_written_frame_is_not_taken(pair: tuple[Mailbox, Mailbox]) -> None:
    """A reader that sees the counter before the frame (weak memory order) looks again."""
    a, b = pair
    base = b._channel(0, 0, 1)
    words = np.frombuffer(a._mm, dtype=np.int64)
    words[base >> 3] = 1  # counter says frame 1 is there; the frame area is still zeros
    assert b._try_read(0, 0) is None
    a._mm[base + 128 : base + 160] = b"\x01" + b"\x00" * 31  # right seq, bad crc
    assert b._try_read(0, 0) is None
    del words
    a.send(0, 1, b"hello", None)  # now the real frame 1
    assert b.recv(0, 0, time.monotonic() + 1) == b"hello"


def test_empty_and_frame_boundary_messages(pair: tuple[Mailbox, Mailbox]) -> None:
    a, b = pair
    payload = random.Random(3).randbytes(1000)
    for size in [0, 1, 256 - 33, 256 - 32, 256 - 31, 256, 2 * 224, len(payload)]:
        got: list[bytes] = []
        reader = threading.Thread(
            target=lambda got=got: got.append(b.recv(0, 0, time.monotonic() + 5))
        )
        reader.start()
        assert a.exchange(0, {1: payload[:size]}, [], time.monotonic() + 5) == {}
        reader.join()
        assert got == [payload[:size]]
