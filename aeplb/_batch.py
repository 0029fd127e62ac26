from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import torch

from ._ops import OpQueue
from ._stats import TransferStats

if TYPE_CHECKING:
    from ._communicator import Communicator


class Batch:
    """Ops collected inside ``async with comm.batch() as b:``.

    On normal exit the ops run as one batch and ``b.stats`` holds the result; if the block
    raises, the ops are discarded and nothing is sent.
    """

    def __init__(self, communicator: Communicator, timeout: float | None) -> None:
        self._comm = communicator
        self._timeout = timeout
        self._ops = OpQueue()
        self.stats: TransferStats | None = None

    @property
    def pending(self) -> int:
        """Ops collected so far."""
        return len(self._ops)

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        """Adds sending ``tensor`` to ``dst_rank`` to this batch."""
        self._comm._enqueue(self._ops, False, tensor, dst_rank)

    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None:
        """Adds receiving into ``tensor`` from ``src_rank`` to this batch."""
        self._comm._enqueue(self._ops, True, tensor, src_rank)

    async def __aenter__(self) -> Batch:
        self._comm._check_usable()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ops, self._ops = self._ops, OpQueue()
        if exc_type is None:
            self.stats = await self._comm._execute_ops(ops, self._timeout)
