from __future__ import annotations

import abc

import torch

from .._exceptions import InvalidTransferError
from .._ops import PreparedBatch


def check_positive(name: str, value: object) -> None:
    """Raises InvalidTransferError unless the option ``name`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidTransferError(f"{name} must be a positive int, got {value!r}")


class Transport(abc.ABC):
    """Moves one prepared batch between ranks.

    A transport knows nothing of experts or placements. ``check_tensor``,
    ``capture_ready`` and ``set_stream`` run on the caller's thread and never block;
    everything else runs on the communicator's worker thread, one call at a time.
    """

    name: str = "?"
    # True when run() checks batch.manifest itself, carried in messages it exchanges
    # anyway, so the communicator skips its own all-gather of the manifests.
    checks_in_band: bool = False
    # True when batches travel on the caller's process group: a second communicator on
    # that group would post the same (peer, tag) pairs, and the two would mix their data.
    posts_on_group: bool = False

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    @abc.abstractmethod
    def check_tensor(self, tensor: torch.Tensor, verb: str) -> None:
        """Raises InvalidTransferError if this transport cannot move ``tensor``."""

    def accepts(self, tensor: torch.Tensor) -> bool:
        """A quick yes for a tensor ``check_tensor`` would pass; False means "ask it"."""
        return False

    def home_device(self) -> torch.device:
        """Where this transport's tensors live unless told otherwise (its warm-up's)."""
        return torch.device("cpu")

    def capture_ready(self) -> object | None:
        """Marks the caller's current position in stream order (for CUDA transports)."""
        return None

    def set_stream(self, stream: object | None) -> None:  # noqa: B027 - optional hook
        """Uses ``stream`` for the transfer (CUDA transports)."""

    @abc.abstractmethod
    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        """Gathers a small CPU int64 tensor from every rank: [world, *local.shape]."""

    @abc.abstractmethod
    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        """Runs the batch; returns once received data is in place.

        Raises TimeoutError when ``deadline`` (a ``time.monotonic()`` value) passes.
        """

    def abandon(self) -> None:  # noqa: B027 - optional hook
        """Lets peers know at once that this rank will not finish its batches: called
        once, from any thread, when the communicator breaks; never blocks."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases what the transport holds (called on the worker thread)."""
