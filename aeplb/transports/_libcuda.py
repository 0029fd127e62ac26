"""Thin ctypes binding to the CUDA driver (libcuda): the IPC and copy subset.

torch exposes interprocess events but not interprocess memory handles for arbitrary
pointers, nor a way to copy between raw device pointers without a tensor on the peer's
device (which would create a CUDA context on the peer's GPU in this process). The driver
API does both, from the primary context torch already uses.

Nothing here loads libcuda at import time; everything fails on first use with
``BackendUnavailableError`` instead. Pointers and streams are plain ints
(``tensor.data_ptr()``, ``torch.cuda.Stream.cuda_stream``). ctypes releases the GIL around
every foreign call.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Final, NamedTuple

import numpy as np

from .._exceptions import BackendUnavailableError

_SONAME: Final = "libcuda.so.1"
IPC_HANDLE_BYTES: Final = 64

CUDA_SUCCESS: Final = 0
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: Final = 1

# CUpointer_attribute (cuda.h)
_ATTR_BUFFER_ID: Final = 7
_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE: Final = 10
_ATTR_RANGE_START_ADDR: Final = 11
_ATTR_RANGE_SIZE: Final = 12


class CUDAError(RuntimeError):
    """Raised when a driver call fails; ``code`` is the CUresult."""

    def __init__(self, call: str, code: int, text: str) -> None:
        super().__init__(f"{call} failed: {text} (CUresult {code})")
        self.code = code


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_hint", _MemLocation),
        ("dst_loc_hint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


# CUmemcpySrcAccessOrder: the sources are read in stream order, like cuMemcpyAsync
_SRC_ACCESS_ORDER_STREAM: Final = 1

# Functions called with plain Python ints: 64-bit pointers and sizes need declaring.
_ARGTYPES: Final[dict[str, list[Any]]] = {
    "cuMemcpyDtoDAsync_v2": [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p],
    "cuMemcpyBatchAsync": [ctypes.c_void_p] * 3
    + [ctypes.c_size_t]
    + [ctypes.c_void_p] * 2
    + [ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p],
}


class Allocation(NamedTuple):
    """The driver allocation a pointer lies in."""

    buffer_id: int  # unique within the owning process's lifetime
    base: int
    size: int
    ipc_capable: bool


class Driver:
    """The loaded libcuda, one per process."""

    _instance: Driver | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            self._lib = ctypes.CDLL(_SONAME)
        except OSError as exc:
            raise BackendUnavailableError(
                f"backend='ipc' needs the CUDA driver library {_SONAME}, which could not be "
                f"loaded ({exc}); it ships with the NVIDIA driver"
            ) from exc
        self._fn: dict[str, Any] = {}
        self._context_ready = threading.local()
        self._call("cuInit", ctypes.c_uint(0))

    @classmethod
    def get(cls) -> Driver:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _function(self, name: str) -> Any:
        fn = self._fn.get(name)
        if fn is None:
            try:
                fn = getattr(self._lib, name)
            except AttributeError as exc:
                raise BackendUnavailableError(
                    f"the CUDA driver here has no {name}; update the NVIDIA driver"
                ) from exc
            fn.restype = ctypes.c_int
            if name in _ARGTYPES:
                fn.argtypes = _ARGTYPES[name]
            self._fn[name] = fn
        return fn

    def _call(self, name: str, *args: Any) -> None:
        code = self._function(name)(*args)
        if code != CUDA_SUCCESS:
            raise CUDAError(name, code, self.error_string(code))

    def error_string(self, code: int) -> str:
        text = ctypes.c_char_p()
        try:
            self._lib.cuGetErrorString(ctypes.c_int(code), ctypes.byref(text))
        except Exception:  # pragma: no cover - the lookup itself must never mask the error
            return "unknown error"
        return text.value.decode() if text.value else "unknown error"

    def use_primary_context(self, ordinal: int) -> None:
        """Makes ``ordinal``'s primary context (torch's) current on this thread."""
        done: set[int] = getattr(self._context_ready, "ordinals", set())
        if ordinal in done:
            return
        device = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(device), ctypes.c_int(ordinal))
        ctx = ctypes.c_void_p()
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), device)
        self._call("cuCtxSetCurrent", ctx)
        self._context_ready.ordinals = done | {ordinal}

    def allocation(self, ptr: int) -> Allocation:
        """Where ``ptr`` lies: one driver call for all four attributes."""
        scratch = getattr(self._context_ready, "scratch", None)
        if scratch is None:
            attrs = (ctypes.c_int * 4)(
                _ATTR_BUFFER_ID,
                _ATTR_RANGE_START_ADDR,
                _ATTR_RANGE_SIZE,
                _ATTR_IS_LEGACY_CUDA_IPC_CAPABLE,
            )
            values = (ctypes.c_uint64 * 4)()
            data = (ctypes.c_void_p * 4)(*(ctypes.addressof(values) + 8 * i for i in range(4)))
            fn = self._function("cuPointerGetAttributes")
            scratch = self._context_ready.scratch = (attrs, values, data, fn)
        attrs, values, data, fn = scratch
        # 8 zeroed bytes each: the capable flag is written as a 1-byte bool or an int
        ctypes.memset(values, 0, 32)
        code = fn(4, attrs, data, ctypes.c_uint64(ptr))
        if code != CUDA_SUCCESS:
            raise CUDAError("cuPointerGetAttributes", code, self.error_string(code))
        return Allocation(values[0], values[1], values[2], bool(values[3] & 0xFF))

    def ipc_handle(self, base: int) -> bytes:
        handle = _IpcMemHandle()
        self._call("cuIpcGetMemHandle", ctypes.byref(handle), ctypes.c_uint64(base))
        return ctypes.string_at(ctypes.addressof(handle), IPC_HANDLE_BYTES)  # NULs included

    def ipc_open(self, handle: bytes) -> int:
        """Maps a peer's allocation into this context; returns its address here."""
        if len(handle) != IPC_HANDLE_BYTES:
            raise ValueError(f"an IPC memory handle has {IPC_HANDLE_BYTES} bytes")
        raw = _IpcMemHandle()
        ctypes.memmove(ctypes.addressof(raw), handle, IPC_HANDLE_BYTES)
        ptr = ctypes.c_uint64()
        self._call(
            "cuIpcOpenMemHandle_v2",
            ctypes.byref(ptr),
            raw,
            ctypes.c_uint(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
        )
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        self._call("cuIpcCloseMemHandle", ctypes.c_uint64(ptr))

    def copy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Device-to-device copy on ``stream``; across GPUs it runs on the copy engines."""
        code = self._function("cuMemcpyDtoDAsync_v2")(dst, src, nbytes, stream)
        if code != CUDA_SUCCESS:
            raise CUDAError("cuMemcpyDtoDAsync_v2", code, self.error_string(code))

    @property
    def has_copy_batch(self) -> bool:
        """Whether the driver has cuMemcpyBatchAsync (CUDA 12.8 and later)."""
        try:
            self._function("cuMemcpyBatchAsync")
        except BackendUnavailableError:
            return False
        return True

    def copy_batch_async(
        self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int
    ) -> None:
        """Many device-to-device copies in one call (``cuMemcpyBatchAsync``, 12.8 ABI).

        The arrays hold one pointer or byte count per copy. The batch runs in stream order;
        copies within it may run in any order, so they must not overlap each other.
        """
        n = len(dsts)
        if not n:
            return
        fn = self._function("cuMemcpyBatchAsync")
        arrays = [np.ascontiguousarray(a, dtype=np.uint64) for a in (dsts, srcs, sizes)]
        if any(len(a) != n for a in arrays):
            raise ValueError("copy_batch_async needs as many sources and sizes as destinations")
        attrs = _MemcpyAttributes(_SRC_ACCESS_ORDER_STREAM)
        first = ctypes.c_size_t(0)
        failed = ctypes.c_size_t(0)
        code = fn(
            *(a.ctypes.data for a in arrays),
            n,
            ctypes.byref(attrs),
            ctypes.byref(first),
            1,
            ctypes.byref(failed),
            stream,
        )
        if code != CUDA_SUCCESS:
            raise CUDAError(
                f"cuMemcpyBatchAsync (copy {failed.value} of {n})", code, self.error_string(code)
            )
