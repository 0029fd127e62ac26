"""Checks of arguments shared by the communicator, its creation and the rearrangement."""

from __future__ import annotations

from ._exceptions import InvalidTransferError

# The warm-up's deadline is at least this: NCCL's setup at scale takes seconds.
WARM_UP_MIN_TIMEOUT = 120.0

# Longest deadline accepted: backends turn the remaining time into C integers of
# milliseconds (Gloo overflows past about 24 days); None waits without a deadline.
MAX_TIMEOUT = 1e6


def timeout_ok(timeout: object) -> bool:
    """Whether ``timeout`` is None or a positive number of seconds up to MAX_TIMEOUT."""
    return timeout is None or (
        not isinstance(timeout, bool)
        and isinstance(timeout, (int, float))
        and 0 < timeout <= MAX_TIMEOUT  # also refuses NaN
    )


def check_timeout(timeout: object, where: str) -> float | None:
    if timeout is None:
        return None
    if not timeout_ok(timeout):
        raise InvalidTransferError(
            f"{where}: timeout must be a positive number of seconds up to {MAX_TIMEOUT:g} "
            f"(or None for no deadline), got {timeout!r}"
        )
    return float(timeout)  # type: ignore[arg-type]  # timeout_ok checked it


def set_up_timeout(timeout: float | None) -> float | None:
    """The deadline of set-up work: the timeout, but NCCL's set-up at scale takes
    seconds, so at least WARM_UP_MIN_TIMEOUT; none without a timeout."""
    return None if timeout is None else max(timeout, WARM_UP_MIN_TIMEOUT)


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidTransferError(
            f"create_communicator: {name} must be True or False, got {value!r}"
        )
    return value
