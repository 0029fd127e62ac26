from __future__ import annotations

import abc
import threading

import torch

from .. import _cuda
from .._ops import PreparedBatch, group_chunks
from ._base import Transport
from ._packing import DEFAULT_STAGING_BYTES, Packer, WireOp
from ._streams import as_bytes

# Large p2p groups are known to hang on the GPU; SGLang settled on 32 ops per group.
DEFAULT_MAX_OPS_PER_GROUP = 64


class CudaTransport(Transport):
    """Shared stream handling for transports of CUDA tensors.

    The batch runs on the communicator's stream after the caller's stream position captured
    at ``execute()``; completion is a CUDA event the worker thread waits on, so the host
    never synchronizes a whole stream and received data is visible to every stream when
    ``execute()`` returns. The job holds every tensor until that event completes, so the
    caching allocator cannot hand their memory out while the transfer runs.
    """

    # NCCL work can be enqueued on the thread that calls execute() (enqueue_on="caller").
    can_enqueue_on_caller = True

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        *,
        coalesce: bool = True,
        chunk_bytes: int | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        max_ops_per_group: int | None = DEFAULT_MAX_OPS_PER_GROUP,
    ) -> None:
        super().__init__(rank, world_size)
        self.device = device
        self._packer = Packer(device, chunk_bytes, staging_bytes, world_size) if coalesce else None
        self._max_ops = max_ops_per_group
        self._user_stream: torch.cuda.Stream | None = None
        self._own_stream: torch.cuda.Stream | None = None
        self._thread_ready = threading.local()

    def check_tensor(self, tensor: torch.Tensor, verb: str) -> None:
        _cuda.check_cuda_tensor(tensor, self.device, verb, self.name)

    def accepts(self, tensor: torch.Tensor) -> bool:
        # get_device() is an int; tensor.device builds a torch.device per call
        return tensor.is_cuda and tensor.get_device() == self.device.index

    def home_device(self) -> torch.device:
        return self.device

    def capture_ready(self) -> object | None:
        return _cuda.record_ready(self.device)

    def set_stream(self, stream: object | None) -> None:
        self._user_stream = _cuda.check_stream(stream, self.device)

    def stream(self) -> torch.cuda.Stream:
        if self._user_stream is not None:
            return self._user_stream
        if self._own_stream is None:
            self._own_stream = _cuda.new_stream(self.device)
        return self._own_stream

    def enter_thread(self) -> None:
        # The current device is per thread; the worker must set it before any CUDA call.
        if not getattr(self._thread_ready, "done", False):
            torch.cuda.set_device(self.device)
            self._thread_ready.done = True

    def run(self, batch: PreparedBatch, ready: object | None, deadline: float | None) -> None:
        self.enter_thread()
        self.wait(self.enqueue(batch, ready), deadline)

    def enqueue(self, batch: PreparedBatch, ready: object | None) -> torch.cuda.Event:
        """Puts the whole batch on the stream without waiting; returns its completion event."""
        stream = self.stream()
        with torch.cuda.stream(stream):
            self.start(batch, ready, stream)
            self.launch(batch, stream)
            done = _cuda.new_event()
            done.record(stream)
        return done

    @classmethod
    def start(cls, batch: PreparedBatch, ready: object | None, stream: torch.cuda.Stream) -> None:
        """Enqueues, on ``stream``, the wait for the caller's work and the self-copies."""
        cls.wait_ready(ready, stream)
        cls.self_copies(batch)

    @staticmethod
    def wait_ready(ready: object | None, stream: torch.cuda.Stream) -> None:
        if isinstance(ready, torch.cuda.Event):
            stream.wait_event(ready)

    @staticmethod
    def self_copies(batch: PreparedBatch) -> None:
        """Enqueues the batch's copies to itself on the current stream."""
        for src, dst in batch.copies:
            as_bytes(dst).copy_(as_bytes(src), non_blocking=True)

    def wait(self, done: torch.cuda.Event, deadline: float | None) -> None:
        try:
            _cuda.wait_event(done, deadline)
        except TimeoutError:
            self.abort()
            raise

    @property
    def staging_bytes(self) -> int:
        """Device memory held for packing (0 until a batch needed it)."""
        return 0 if self._packer is None else self._packer.staging_bytes

    def launch(self, batch: PreparedBatch, stream: torch.cuda.Stream) -> None:
        """Enqueues the network ops on ``stream`` (the current stream)."""
        if self._packer is not None:
            self._packer.run(batch, stream, self.post_group)
            return
        for chunk in group_chunks(batch.ops, self.world_size, self._max_ops):
            self.post_group([(op.kind, op.tensor, op.peer) for op in chunk])

    def all_gather(self, local: torch.Tensor, deadline: float | None) -> torch.Tensor:
        self.enter_thread()
        stream = self.stream()
        with torch.cuda.stream(stream):
            mine = local.to(self.device, non_blocking=True)
            out = torch.empty(
                (self.world_size, *local.shape), dtype=local.dtype, device=self.device
            )
            self.gather_into(mine, out)
            host = out.to("cpu", non_blocking=True)
            done = _cuda.new_event()
            done.record(stream)
        self.wait(done, deadline)
        return host

    @abc.abstractmethod
    def gather_into(self, mine: torch.Tensor, out: torch.Tensor) -> None:
        """Enqueues gathering every rank's ``mine`` into ``out`` on the current stream."""

    @abc.abstractmethod
    def post_group(self, ops: list[WireOp]) -> None:
        """Enqueues ops as one NCCL group on the current stream (never blocks the host)."""

    def abort(self) -> None:
        """Tears the backend down after a missed deadline so its kernels stop."""
