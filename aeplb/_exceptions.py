from __future__ import annotations


class AEPLBError(Exception):
    """Base class of every error aeplb raises on purpose."""


class InvalidTransferError(AEPLBError, ValueError):
    """Raised when an argument is wrong: the message names it and says how to fix it.

    Raised before anything moves (when an op is queued, or when ``execute()`` checks the
    batch), so the communicator stays usable.
    """


class TransferError(AEPLBError):
    """Raised when a batch could not complete."""


class TransferTimeoutError(TransferError, TimeoutError):
    """Raised when a batch missed its deadline.

    The backend may still hold buffers of the abandoned batch, so the communicator is
    broken afterwards: create a new one (on a new process group for NCCL).
    """


class PeerMismatchError(TransferError):
    """Raised on every rank when the ranks' op lists do not pair up.

    Detected by the manifest exchange before any data moves, so the communicator stays
    usable: fix the op lists and execute again.
    """


class ClosedCommunicatorError(AEPLBError):
    """Raised when a communicator is used after you closed it."""


class BrokenCommunicatorError(AEPLBError):
    """Raised when a peer or the backend failed and the communicator can no longer be used.

    ``__cause__`` holds the backend's own error. Create a new communicator.
    """


class BusyCommunicatorError(AEPLBError, RuntimeError):
    """Raised when ``execute()`` is called while another ``execute()`` on the same
    communicator is still being awaited."""


class BackendUnavailableError(AEPLBError, RuntimeError):
    """Raised when the requested backend cannot run here; the message says what is missing."""
