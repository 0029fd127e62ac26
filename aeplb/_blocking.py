"""The reference four-method interface (add_send, add_recv, execute, set_stream), blocking."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from ._runtime import in_event_loop

if TYPE_CHECKING:
    from ._communicator import Communicator
    from ._stats import TransferStats


class BlockingCommunicator:
    """The reference four-method interface over a :class:`Communicator`.

    ``execute()`` blocks the calling thread until the batch is done, so code written for
    synchronous EPLB communicators runs unchanged.
    """

    def __init__(self, communicator: Communicator) -> None:
        self._comm = communicator

    @property
    def communicator(self) -> Communicator:
        """The awaitable communicator underneath."""
        return self._comm

    def add_send(self, tensor: torch.Tensor, dst_rank: int) -> None:
        """Queues sending ``tensor`` to ``dst_rank``."""
        self._comm.add_send(tensor, dst_rank)

    def add_recv(self, tensor: torch.Tensor, src_rank: int) -> None:
        """Queues receiving into ``tensor`` from ``src_rank``."""
        self._comm.add_recv(tensor, src_rank)

    def execute(self, timeout: float | None = None) -> TransferStats:
        """Runs every queued op as one batch, blocking until it is done.

        Called from a thread that runs an event loop, it blocks that loop too: it works
        (engines do it on purpose) and warns once per communicator; async code should
        ``await comm.communicator.execute()`` instead.
        """
        comm = self._comm
        if not comm._warned_blocking and in_event_loop():
            comm._warned_blocking = True
            warnings.warn(
                "BlockingCommunicator.execute() was called from a running event loop, which "
                "it blocks until the batch ends; use `await comm.execute()` to keep the loop "
                "serving",
                RuntimeWarning,
                stacklevel=2,
            )
        return comm._execute_blocking(timeout)

    def set_stream(self, stream: torch.cuda.Stream | None) -> None:
        """Runs later transfers on ``stream``."""
        self._comm.set_stream(stream)

    def close(self) -> None:
        """Closes the communicator, waiting for batches already handed to it."""
        self._comm._close_blocking()
