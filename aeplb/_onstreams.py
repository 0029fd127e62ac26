"""Work a rearrangement does off the event loop, issuing CUDA work on the caller's streams."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
import torch

from ._runtime import transfer_mode

_T = TypeVar("_T")


def current_streams(devices: Iterable[torch.device]) -> list[torch.cuda.Stream]:
    cuda = {d for d in devices if d.type == "cuda"}
    return [torch.cuda.current_stream(d) for d in sorted(cuda, key=str)]


@contextlib.contextmanager
def on_streams(streams: list[torch.cuda.Stream]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for stream in streams:
            stack.enter_context(torch.cuda.stream(stream))
        yield


async def in_thread(streams: list[torch.cuda.Stream], fn: Callable[..., _T], *args: Any) -> _T:
    """Runs ``fn`` in a worker thread, issuing its CUDA work on the caller's streams."""

    def call() -> _T:
        with on_streams(streams), transfer_mode():
            return fn(*args)

    return await anyio.to_thread.run_sync(call)


async def host_copy(t: torch.Tensor) -> np.ndarray:
    if t.device.type == "cpu":
        return t.detach().clone().numpy()
    # A device-to-host copy waits for queued GPU work; keep that wait off the event loop.
    return await in_thread(current_streams([t.device]), lambda: t.detach().cpu().numpy())


def to_device(row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    row = row.to(like.dtype)
    if like.device.type == "cuda":
        # Pinned + non_blocking: a pageable copy would synchronize the caller's stream.
        return row.pin_memory().to(like.device, non_blocking=True)
    return row.to(like.device)
