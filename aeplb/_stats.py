from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransferStats:
    """What one ``execute()`` moved and how long it took.

    Attributes:
        bytes_sent: Bytes sent to other ranks.
        bytes_received: Bytes received from other ranks.
        bytes_copied: Bytes copied locally (self-sends).
        num_sends: Network sends in the batch.
        num_recvs: Network receives in the batch.
        num_copies: Local copies in the batch.
        seconds: Wall time from the ``execute()`` call until the data was in place.
        transfer_seconds: Time the worker spent on this batch (excludes waiting behind
            earlier batches).
        check_seconds: Time spent on the peer manifest check (0.0 when it is off).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0
    num_sends: int = 0
    num_recvs: int = 0
    num_copies: int = 0
    seconds: float = 0.0
    transfer_seconds: float = 0.0
    check_seconds: float = 0.0

    @property
    def bytes_moved(self) -> int:
        """Bytes sent plus bytes received (network traffic seen by this rank)."""
        return self.bytes_sent + self.bytes_received


@dataclass(frozen=True)
class CommunicatorStatistics:
    """A snapshot of a communicator's cumulative counters and health.

    Attributes:
        backend: The transport's name (``"gloo"``, ``"nccl"``, ...).
        rank: This process's rank within the communicator's group.
        world_size: Ranks in the group.
        pending_ops: Ops queued and not yet executed.
        batches_completed: Batches that finished successfully.
        batches_failed: Batches that ended with an error.
        bytes_sent: Bytes sent by completed batches.
        bytes_received: Bytes received by completed batches.
        bytes_copied: Bytes copied locally by completed batches.
        in_flight: Batches handed to the worker and not finished (including batches whose
            awaiting task was cancelled).
        in_flight_seconds: Age of the oldest unfinished batch, 0.0 when none; a number that
            keeps growing is a stuck transfer.
        last_error: The most recent batch error, or None.
        closed: ``aclose()`` was called.
        broken: A failure left the communicator unusable.
    """

    backend: str
    rank: int
    world_size: int
    pending_ops: int
    batches_completed: int
    batches_failed: int
    bytes_sent: int
    bytes_received: int
    bytes_copied: int
    in_flight: int
    in_flight_seconds: float
    last_error: BaseException | None
    closed: bool
    broken: bool
