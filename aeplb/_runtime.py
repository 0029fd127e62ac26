from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import anyio
import torch

T = TypeVar("T")

_worker_ids = itertools.count()


class Job(Generic[T]):
    """A function queued on a Worker; completion is observable from threads and event loops."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._result: T | None = None
        self._error: BaseException | None = None
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def _run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self._result = self._fn()
        except BaseException as exc:
            self._error = exc
        self.finished_at = time.monotonic()
        self._fn = _noop  # drop references (tensors) as soon as the work is over
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` from the worker thread when done (at once if already done)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    async def wait_async(self) -> None:
        """Waits for completion without blocking the event loop (asyncio, uvloop or trio)."""
        if self.done():
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        call_soon = _loop_caller()

        def wake() -> None:
            try:
                call_soon(event.set)
            except Exception:  # the loop is gone; nobody is waiting any more
                pass

        self.add_done_callback(wake)
        await event.wait()


def in_event_loop() -> bool:
    """Whether this thread is running an asyncio (uvloop) or trio event loop now."""
    return _loop_caller_or_none() is not None


def _noop() -> Any:
    return None


def _loop_caller() -> Callable[[Callable[[], object]], object]:
    """Returns a thread-safe "run this soon on the current event loop" function.

    A direct wake-up costs one loop iteration, whereas waiting through a helper thread
    (``to_thread.run_sync(event.wait)``) ties up a pool thread per pending batch.
    """
    call_soon = _loop_caller_or_none()
    if call_soon is None:
        raise RuntimeError("no asyncio or trio event loop is running in this thread")
    return call_soon


def _loop_caller_or_none() -> Callable[[Callable[[], object]], object] | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return loop.call_soon_threadsafe
    trio = sys.modules.get("trio")  # a trio loop imported it; never import it here
    if trio is None:
        return None
    try:
        return trio.lowlevel.current_trio_token().run_sync_soon  # type: ignore[no-any-return]
    except RuntimeError:
        return None


def gil_slices(count: int, size: int) -> Iterator[int]:
    """The starts of ``size``-item slices of ``count`` items; between two slices the
    thread lets go of the GIL, so a thread waiting for it (the event loop's) takes it now
    rather than after the interpreter's switch interval. For work on thousands of items
    in C calls that hold the GIL throughout."""
    for start in range(0, count, size):
        if start:
            time.sleep(0)
        yield start


class WorkerStopped(RuntimeError):
    """Raised by ``Worker.submit`` once the worker was told to stop."""


def transfer_mode() -> torch.inference_mode:
    """The autograd mode aeplb's own threads move data in.

    Transfers are never recorded by autograd, as with the reference communicators, and
    inference mode (unlike ``no_grad``) also lets them write into inference tensors and into
    parameters that require grad. Thread-local: every thread that copies enters it.
    """
    return torch.inference_mode()


class Worker:
    """One daemon thread that runs jobs in submission order.

    Every backend call of a communicator happens on this thread, so NCCL sees one issuing
    thread per communicator and batches can never interleave.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._main, name=f"{name}-{next(_worker_ids)}", daemon=True
        )
        self._stopping = False
        # submit() and stop() from different threads: a job put after the stop marker
        # would never run, and whoever waits for it would wait forever
        self._lock = threading.Lock()
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(self, fn: Callable[[], T]) -> Job[T]:
        job = Job(fn)
        with self._lock:
            if self._stopping:
                raise WorkerStopped("worker is stopping")
            self._queue.put(job)
        return job

    def stop(self) -> None:
        """Lets queued jobs finish, then ends the thread (does not wait for it)."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._queue.put(None)

    def _main(self) -> None:
        with transfer_mode():
            while True:
                job = self._queue.get()
                if job is None:
                    return
                job._run()
