from __future__ import annotations

import re


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


# "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] " and the like
_SOURCE_LOCATION = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|cu|h|hpp):\d+\]\s*")
_MAX_DETAIL = 200


def short_error(exc: BaseException) -> str:
    """A backend error as one short line for aeplb's own messages: its first sentence or
    line, without C++ source locations or Gloo's chatter; ``__cause__`` keeps it whole."""
    text = _SOURCE_LOCATION.sub("", str(exc)).replace("GLHF!", "")
    text = text.encode("ascii", "ignore").decode()  # Gloo signs off with an emoji
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = " ".join(lines[0].split()) if lines else type(exc).__name__
    if len(first) > _MAX_DETAIL:
        end = first.find(". ", 40)
        first = first[: end + 1] if 0 < end < _MAX_DETAIL else first[: _MAX_DETAIL - 3] + "..."
    return first
