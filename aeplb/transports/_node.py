"""The ranks of one node: which ranks share this machine, and a shared-memory mailbox
among them.

A mailbox exchange between processes of one machine costs tens of microseconds, where a
round trip through Gloo's TCP or an NCCL all-gather (with its copies to and from the GPU)
costs about half a millisecond: the manifest check of every batch goes through one when
the whole group sits on one node.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._mailbox import Mailbox

SHM_DIR = "/dev/shm"
# Payload bytes of the manifest channel: a frame holds 8 KiB; longer messages take several.
_GATHER_CAPACITY = 8 << 10


def node_key() -> str:
    """Names this machine (and boot), so ranks can tell who shares it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def identity() -> dict[str, Any]:
    """What a rank tells the others at set-up: its node, pid namespace, pid and a token."""
    return {
        "node": node_key(),
        "pidns": pid_namespace(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
    }


def gather(obj: object, group: dist.ProcessGroup, device: torch.device | None) -> list[Any]:
    """``all_gather_object`` over ``group`` (under ``device`` for a group that uses CUDA)."""
    out: list[Any] = [None] * dist.get_world_size(group)
    if device is None or device.type != "cuda":
        dist.all_gather_object(out, obj, group=group)
    else:
        with torch.cuda.device(device):
            dist.all_gather_object(out, obj, group=group)
    return out


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _liveness(
    infos: Sequence[dict[str, Any]], local: list[int], rank: int
) -> Callable[[int], bool]:
    """Whether the process of a local rank (by mailbox index) still exists."""
    same_pids = all(infos[r]["pidns"] == infos[rank]["pidns"] for r in local)
    pids = [infos[r]["pid"] for r in local]

    def alive(peer: int) -> bool:
        if not same_pids:
            return True  # another container's pids mean nothing here
        try:
            os.kill(pids[peer], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    return alive


def open_mailbox(
    rank: int,
    infos: Sequence[dict[str, Any]],
    capacities: Sequence[int],
    agree: Callable[[str], list[str]],
    problem: str = "",
) -> tuple[Mailbox | None, list[str]]:
    """Maps a mailbox shared by the ranks on this rank's node; collective over the group.

    ``infos`` are every rank's :func:`identity`, ``problem`` what already went wrong here
    (then this rank maps nothing), and ``agree(problem)`` every rank's problem ('' for
    none), gathered over the group. Returns the mailbox (None for a rank alone on its
    node) and the problems, the same on every rank: where there are any, no mailbox.
    """
    me = infos[rank]["node"]
    local = [r for r, info in enumerate(infos) if info["node"] == me]
    index = local.index(rank)
    alone = len(local) == 1
    path = os.path.join(SHM_DIR, f"aeplb-{infos[local[0]]['token']}")
    creator = index == 0 and not alone
    if creator and not problem:
        try:
            Mailbox.create(path, capacities, len(local))
        except OSError as exc:
            problem = f"rank {rank}: cannot create {path}: {exc}"
    problems = [p for p in agree(problem) if p]
    mailbox = None
    if not problems and not alone:
        try:
            mailbox = Mailbox(path, index, capacities, len(local), _liveness(infos, local, rank))
        except OSError as exc:
            problem = f"rank {rank}: cannot map {path}: {exc}"
        problems = [p for p in agree(problem) if p]
    if creator:
        _unlink(path)  # every rank has it mapped (or failed): nothing to leak on a crash
    if problems and mailbox is not None:
        mailbox.close()
        mailbox = None
    return mailbox, problems


class NodeGather:
    """All-gathers small CPU tensors through a mailbox, among ranks that all share a node.

    Args:
        mailbox: The node's mailbox.
        kind: Its channel for gathers.
        rank: This rank, within the group.
        indices: Mailbox index of every other rank, by group rank.
        world_size: Ranks in the group.
    """

    def __init__(
        self, mailbox: Mailbox, kind: int, rank: int, indices: dict[int, int], world_size: int
    ) -> None:
        self.mailbox = mailbox
        self._kind = kind
        self._rank = rank
        self._indices = indices
        self._world_size = world_size

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        """[world, *local.shape]: every rank's ``local``, by group rank."""
        data = local.contiguous().numpy().tobytes()
        peers = list(self._indices.values())
        got = self.mailbox.exchange(self._kind, dict.fromkeys(peers, data), peers, deadline)
        out = torch.empty((self._world_size, *local.shape), dtype=local.dtype)
        out[self._rank] = local
        for peer, index in self._indices.items():
            row = torch.frombuffer(bytearray(got[index]), dtype=local.dtype)
            out[peer] = row.view(local.shape)
        return out

    def close(self) -> None:
        self.mailbox.close()


def _digest(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True
    )


def node_gather(
    all_gather: Callable[[torch.Tensor], torch.Tensor], rank: int, world_size: int
) -> NodeGather | None:
    """A :class:`NodeGather` when every rank of the group runs on this node, else None (the
    same answer on every rank); collective, through ``all_gather`` (the transport's, with
    its deadline), so a missing peer ends in that deadline, never in a hang.
    """
    me = identity()
    token = int(me["token"][:15], 16)  # fits an int64; only needs to differ between groups
    row = [_digest(me["node"]), _digest(me["pidns"]), me["pid"], token]
    rows = all_gather(torch.tensor(row, dtype=torch.int64)).tolist()
    if world_size < 2 or any(r[0] != rows[0][0] for r in rows):
        return None
    infos = [
        {"node": str(node), "pidns": str(ns), "pid": pid, "token": f"{tok:x}"}
        for node, ns, pid, tok in rows
    ]

    def agree(problem: str) -> list[str]:
        flags = all_gather(torch.tensor([1 if problem else 0], dtype=torch.int64))
        return [
            f"rank {r} could not share memory" for r in flags.flatten().nonzero().flatten().tolist()
        ]

    mailbox, problems = open_mailbox(rank, infos, [_GATHER_CAPACITY], agree)
    if mailbox is None or problems:
        return None
    indices = {r: r for r in range(world_size) if r != rank}  # every rank is local
    return NodeGather(mailbox, 0, rank, indices, world_size)
