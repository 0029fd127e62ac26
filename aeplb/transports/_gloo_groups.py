"""The Gloo groups a ``gloo`` communicator posts on, and waiting on their work.

A communicator never posts on the caller's group: it makes groups of its own at creation
(see :func:`private_groups`), with their own connections, which it drops when it closes
or breaks.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Protocol, cast

import torch
import torch.distributed as dist


class Channel(Protocol):
    """A Gloo group made for one communicator (see ``private_groups``)."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int, /) -> dist.Work: ...
    def recv(self, tensors: list[torch.Tensor], src: int, tag: int, /) -> dist.Work: ...
    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], /
    ) -> dist.Work: ...


def remaining(deadline: float | None) -> timedelta | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed before the transfer finished")
    return timedelta(seconds=left)


def wait_work(work: dist.Work, deadline: float | None) -> None:
    """Waits for a Gloo work item, turning Gloo's timeout into TimeoutError."""
    left = remaining(deadline)
    try:
        ok = work.wait() if left is None else work.wait(left)
    except RuntimeError as exc:
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            raise TimeoutError(str(exc)) from exc
        raise
    if ok is False:
        raise TimeoutError("the deadline passed before the transfer finished")


# Private groups made so far in this process (for tests: a refused call makes none).
groups_made = 0


def private_groups(
    group: dist.ProcessGroup, rank: int, world_size: int, count: int, timeout: float | None
) -> list[Channel]:
    """``count`` Gloo groups of ``group``'s members, for one communicator alone.

    Collective over ``group``. A communicator never posts on the caller's group: two
    communicators on one group would match each other's messages (same peers, same tags),
    and the model's own traffic could too. Rank 0 draws the groups' name and sends it to
    the others through ``group``, so the name is new whatever this process made before
    (a per-process count of groups went out of step when a rank was replaced and the
    group made anew, and both ranks then waited for each other forever).

    They are not registered with torch.distributed, so dropping them closes their
    connections. ``timeout`` (seconds; None: torch's default for Gloo) bounds the set-up.
    """
    global groups_made
    deadline = None if timeout is None else time.monotonic() + timeout
    name = torch.tensor([uuid.uuid4().int >> 65 if rank == 0 else 0], dtype=torch.int64)
    work = dist.broadcast(name, dist.get_global_rank(group, 0), group=group, async_op=True)
    assert work is not None
    wait_work(work, deadline)
    # the store every rank reached at init_process_group: no public accessor returns it
    store = dist.distributed_c10d._get_default_store()
    prefix = f"aeplb/gloo/{int(name.item()):x}"
    left = timedelta(minutes=30) if deadline is None else remaining(deadline)
    assert left is not None
    groups_made += count
    prefixed = dist.PrefixStore  # type: ignore[attr-defined]  # public; not in __all__
    stores = [prefixed(f"{prefix}/{k}/", store) for k in range(count)]
    return [cast(Channel, dist.ProcessGroupGloo(s, rank, world_size, left)) for s in stores]
