from __future__ import annotations

import time

import torch

from ._exceptions import InvalidTransferError

# Polling for a CUDA event with a deadline: each sleep is about 1/16 of the time waited so
# far, within these bounds, so a poll delays a batch by at most ~6 % (plus the minimum)
# while a long wait still costs little CPU.
_POLL_MIN_S = 20e-6
_POLL_MAX_S = 1e-3
_POLL_FRACTION = 1 / 16


def resolve_device(device: torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        raise InvalidTransferError(f"expected a CUDA device, got {device}")
    index: int | None = device.index  # None for plain "cuda": the current device
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def check_cuda_tensor(tensor: torch.Tensor, device: torch.device, verb: str, backend: str) -> None:
    if tensor.device != device:
        raise InvalidTransferError(
            f"{verb}: the {backend} backend of this communicator moves tensors on {device}, "
            f"got one on {tensor.device}; move it with tensor.to({str(device)!r}) or create "
            "the communicator with that device"
        )


def record_ready(device: torch.device) -> torch.cuda.Event:
    """Marks the caller's current stream position; the transfer waits on it, not the host."""
    event = new_event()
    event.record(torch.cuda.current_stream(device))
    return event


def wait_event(event: torch.cuda.Event, deadline: float | None) -> None:
    """Blocks this (worker) thread until ``event`` completes or ``deadline`` passes."""
    if deadline is None:
        event.synchronize()
        return
    began = time.monotonic()
    while not event.query():  # type: ignore[no-untyped-call]
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError("the CUDA work of the batch did not complete before the deadline")
        time.sleep(min(max((now - began) * _POLL_FRACTION, _POLL_MIN_S), _POLL_MAX_S))


def check_stream(stream: object, device: torch.device) -> torch.cuda.Stream | None:
    if stream is None:
        return None
    if not isinstance(stream, torch.cuda.Stream):
        raise InvalidTransferError(
            f"set_stream: expected a torch.cuda.Stream or None, got {type(stream).__name__}"
        )
    if stream.device != device:
        raise InvalidTransferError(
            f"set_stream: the stream is on {stream.device} but this communicator uses {device}"
        )
    return stream


def new_event(*, blocking: bool = False) -> torch.cuda.Event:
    """``blocking``: a host wait sleeps in the driver instead of spinning."""
    return torch.cuda.Event(blocking=blocking)  # type: ignore[no-untyped-call]


def new_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
