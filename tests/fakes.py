"""A fake transport for unit tests of the queueing layer (never evidence a backend works)."""

from __future__ import annotations

import threading

import torch

from aeplb._exceptions import InvalidTransferError
from aeplb._ops import OpKind, PreparedBatch, op_table
from aeplb.transports._base import Transport


class FakeTransport(Transport):
    """A one-rank-view transport: sends vanish, receives are filled with ``fill``.

    ``gate`` lets a test hold a batch "on the wire" until it sets the event.
    """

    name = "fake"

    def __init__(self, rank: int = 0, world_size: int = 2) -> None:
        super().__init__(rank, world_size)
        self.gate = threading.Event()
        self.gate.set()
        self.fill = 7.0
        self.threads: set[int] = set()
        self.batches: list[list[int]] = []  # numel of each op, no tensor references
        self.fail_with: BaseException | None = None
        self.closed = False
        self.streams: list[object] = []
        self.tables: list[tuple[object, object]] = []  # (batch.table, read again at run)

    def check_tensor(self, tensor: torch.Tensor, verb: str) -> None:
        if tensor.device.type != "cpu":
            raise InvalidTransferError(f"{verb}: fake transport is CPU only")

    def set_stream(self, stream: object | None) -> None:
        self.streams.append(stream)

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        raise AssertionError("unit tests run with check_peers=False")

    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        self.threads.add(threading.get_ident())
        self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        for src, dst in batch.copies:
            dst.view(-1).copy_(src.view(-1))
        for op in batch.ops:
            if op.kind is OpKind.RECV:
                op.tensor.fill_(self.fill)
        self.batches.append([op.tensor.numel() for op in batch.ops])
        self.tables.append((batch.table.copy(), op_table(batch.ops)))

    def close(self) -> None:
        self.closed = True
