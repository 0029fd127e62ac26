"""Lets the event loop's thread in while a worker thread runs a long Python loop.

A thread running Python keeps the GIL until CPython's switch interval (5 ms by default)
forces it to let a waiting thread in, and a loop of short torch calls releases and takes it
back too quickly for a waiting thread to get it. Either way the event loop's thread, waking
from its poll, waits: per-op loops over thousands of tensors stalled it for 2 to 4 ms.
"""

from __future__ import annotations

import time

# Run this long, then pause: the event loop waits at most about a slice for the GIL.
_SLICE_S = 0.0005
# Long enough for a thread woken by the GIL's release to take it (the sleep, with the
# kernel's timer slack, lasts about 60 to 80 us).
_PAUSE_S = 20e-6


class Slicer:
    """Call once per step of a long loop; it pauses about every 0.5 ms of the loop.

    Start one per loop: a loop shorter than a slice never pauses.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = time.perf_counter() + _SLICE_S

    def __call__(self) -> None:
        if time.perf_counter() >= self._next:
            time.sleep(_PAUSE_S)  # releases the GIL; a waiting thread takes it
            self._next = time.perf_counter() + _SLICE_S
