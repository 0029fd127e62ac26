"""Thin ctypes binding to NVIDIA's libnccl (point-to-point subset).

Nothing here touches libnccl or CUDA at import time, so the module imports on machines
without either; everything fails on first use with ``BackendUnavailableError`` instead.

Pointers, streams and communicator handles are plain ints (``tensor.data_ptr()``,
``torch.cuda.Stream.cuda_stream``). ctypes releases the GIL around every foreign call, so a
blocking call (``ncclCommInitRank``, ``ncclCommDestroy``) stalls only its own thread.

The CUDA device is per host thread: call ``torch.cuda.set_device(dev)`` in the very thread
that calls ``NCCLComm.init`` (a worker thread does not inherit the main thread's device), and
pass streams of that same device to ``send``/``recv``.

Sending every tensor as ``DataType.UINT8`` with ``as_bytes_count(tensor)`` elements works for
any dtype on any NCCL version (point-to-point copies bytes; the peer must post the same
count), which is why ``nccl_dtype`` is only needed by callers that want typed ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final

import torch

from aeplb._exceptions import BackendUnavailableError

__all__ = [
    "ENV_VAR",
    "NCCL_UNIQUE_ID_BYTES",
    "RESULT_NAMES",
    "DataType",
    "NCCLComm",
    "NCCLError",
    "NCCLLibrary",
    "UniqueId",
    "as_bytes_count",
    "find_library",
    "nccl_dtype",
    "result_name",
]

ENV_VAR: Final = "AEPLB_NCCL_LIBRARY"
NCCL_UNIQUE_ID_BYTES: Final = 128
_SONAME: Final = "libnccl.so.2"

# ncclResult_t (nccl.h). ncclTimeout only exists in recent releases; older ones never return it.
NCCL_SUCCESS: Final = 0
NCCL_IN_PROGRESS: Final = 7
RESULT_NAMES: Final[dict[int, str]] = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
    8: "ncclTimeout",
}


def result_name(code: int) -> str:
    """The ncclResult_t enumerator's name for ``code``."""
    return RESULT_NAMES.get(code, f"ncclResult({code})")


class DataType(enum.IntEnum):
    """ncclDataType_t values (nccl.h)."""

    INT8 = 0
    UINT8 = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    FLOAT16 = 6
    FLOAT32 = 7
    FLOAT64 = 8
    BFLOAT16 = 9
    # Added in NCCL 2.24; older libraries reject them with ncclInvalidArgument.
    FLOAT8E4M3 = 10
    FLOAT8E5M2 = 11


_FP8_MIN_VERSION: Final = (2, 24, 0)

# Only bit-identical formats: the fnuz fp8 variants and bool have no NCCL twin, so they go
# through the byte path rather than being silently reinterpreted by a reduction later.
_TORCH_TO_NCCL: Final[dict[torch.dtype, DataType]] = {
    torch.int8: DataType.INT8,
    torch.uint8: DataType.UINT8,
    torch.int32: DataType.INT32,
    torch.uint32: DataType.UINT32,
    torch.int64: DataType.INT64,
    torch.uint64: DataType.UINT64,
    torch.float16: DataType.FLOAT16,
    torch.float32: DataType.FLOAT32,
    torch.float64: DataType.FLOAT64,
    torch.bfloat16: DataType.BFLOAT16,
    torch.float8_e4m3fn: DataType.FLOAT8E4M3,
    torch.float8_e5m2: DataType.FLOAT8E5M2,
}


def nccl_dtype(dtype: torch.dtype, version: tuple[int, int, int] | None = None) -> DataType:
    """NCCL's data type for ``dtype``.

    Pass ``version`` (``NCCLLibrary.version()``) to refuse the fp8 types on NCCL < 2.24.
    Raises ``ValueError`` for dtypes NCCL lacks: send those as bytes (``as_bytes_count``).
    """
    nccl = _TORCH_TO_NCCL.get(dtype)
    if nccl is None:
        raise ValueError(
            f"NCCL has no data type for {dtype}; send the tensor as bytes instead: "
            "dtype=DataType.UINT8, count=as_bytes_count(tensor)"
        )
    if (
        nccl in (DataType.FLOAT8E4M3, DataType.FLOAT8E5M2)
        and version is not None
        and version < _FP8_MIN_VERSION
    ):
        raise ValueError(
            f"{dtype} needs NCCL >= 2.24 but the loaded libnccl is "
            f"{'.'.join(map(str, version))}; send the tensor as bytes instead: "
            "dtype=DataType.UINT8, count=as_bytes_count(tensor)"
        )
    return nccl


def as_bytes_count(tensor: torch.Tensor) -> int:
    """Element count to send ``tensor`` as ``DataType.UINT8`` from ``tensor.data_ptr()``."""
    # A strided view's bytes are not one run starting at data_ptr(), so NCCL would move the
    # wrong memory; make the caller copy it to a contiguous buffer first.
    if not tensor.is_contiguous():
        raise ValueError("tensor is not contiguous; pass tensor.contiguous() instead")
    return tensor.numel() * tensor.element_size()


class UniqueId(ctypes.Structure):
    """ncclUniqueId: 128 opaque bytes that rank 0 makes and every rank passes to init."""

    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]

    def to_bytes(self) -> bytes:
        # Not self.internal: reading a c_char array stops at its first NUL byte.
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> UniqueId:
        raw = bytes(data)
        if len(raw) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id is {NCCL_UNIQUE_ID_BYTES} bytes, got {len(raw)}")
        return cls.from_buffer_copy(raw)

    def to_tensor(self) -> torch.Tensor:
        """A CPU uint8 tensor of the id, e.g. to broadcast over a Gloo group."""
        return torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> UniqueId:
        if tensor.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 tensor, got {tensor.dtype}")
        return cls.from_bytes(tensor.detach().cpu().contiguous().numpy().tobytes())


class NCCLError(RuntimeError):
    """An NCCL call returned something other than ncclSuccess."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def name(self) -> str:
        return result_name(self.code)

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call cls(message) and fail on the extra argument.
        return (type(self), (self.code, str(self)))


_INSTALL_HINT: Final = (
    "Install PyTorch's CUDA build (it depends on the nvidia-nccl-cu12 or nvidia-nccl-cu13 "
    "wheel) or that wheel alone (pip install nvidia-nccl-cu13, or -cu12 for CUDA 12), or "
    f"pass the library's path explicitly or set {ENV_VAR}=/path/to/{_SONAME}."
)


def _resolve_given(path: str, origin: str) -> str:
    # A bare name is a soname for dlopen's own search; anything with a slash must exist now
    # so that a typo is reported as such instead of as an obscure dlopen error.
    if os.sep not in path and (os.altsep is None or os.altsep not in path):
        return path
    if os.path.isdir(path):
        for name in (_SONAME, "libnccl.so"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise BackendUnavailableError(
            f"{origin} {path!r} is a directory without {_SONAME} in it. {_INSTALL_HINT}"
        )
    if not os.path.exists(path):
        raise BackendUnavailableError(f"{origin} {path!r} does not exist. {_INSTALL_HINT}")
    return path


def _loaded_library_paths() -> list[str]:
    # Reusing the copy torch already mapped keeps one NCCL per process (two copies work but
    # double the host threads and can disagree on versions).
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            mapped = parts[5].strip()
            name = os.path.basename(mapped)
            if name.startswith("libnccl.so") and mapped not in found and os.path.isfile(mapped):
                found.append(mapped)
    return found


def _wheel_dirs(search_path: Sequence[str] | None = None) -> list[str]:
    """Directories where the nvidia-nccl-cu12/cu13 wheels put libnccl.so.2."""
    # Both wheels install nvidia/nccl/lib/libnccl.so.2 (cu13 moved the CUDA libraries to
    # nvidia/cu13/lib but kept NCCL where it was); the cuXX dirs are checked just in case.
    subdirs = (("nccl", "lib"), ("cu13", "lib"), ("cu12", "lib"))
    roots: list[str] = [
        os.path.join(entry or os.curdir, "nvidia")
        for entry in (sys.path if search_path is None else search_path)
    ]
    if search_path is None:
        # Editable or unusual installs can place the namespace package off sys.path.
        for name in ("nvidia.nccl", "nvidia"):
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                continue
            for loc in (spec.submodule_search_locations or []) if spec else []:
                roots.append(os.path.dirname(loc) if name == "nvidia.nccl" else loc)
    dirs: list[str] = []
    for root in roots:
        for sub in subdirs:
            candidate = os.path.join(root, *sub)
            if candidate not in dirs:
                dirs.append(candidate)
    return dirs


def find_library(path: str | None = None) -> str:
    """Locate libnccl: explicit ``path`` > ``$AEPLB_NCCL_LIBRARY`` > the copy already loaded
    in this process > the nvidia-nccl wheel > ``LD_LIBRARY_PATH`` > the linker cache.

    Raises ``BackendUnavailableError`` naming every place it looked.
    """
    if path:
        return _resolve_given(path, "the explicit NCCL library path")
    env = os.environ.get(ENV_VAR)
    if env:
        return _resolve_given(env, f"${ENV_VAR}")

    tried: list[str] = []
    loaded = _loaded_library_paths()
    if loaded:
        return loaded[0]
    tried.append("libnccl already loaded in this process (none)")

    wheel_dirs = _wheel_dirs()
    for directory in wheel_dirs:
        candidate = os.path.join(directory, _SONAME)
        if os.path.isfile(candidate):
            return candidate
    tried.append(f"the nvidia-nccl wheel layout nvidia/nccl/lib/{_SONAME} under sys.path")

    for directory in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, _SONAME)
        if directory and os.path.isfile(candidate):
            return candidate
    tried.append(f"{_SONAME} in $LD_LIBRARY_PATH")

    system = ctypes.util.find_library("nccl")
    if system:
        return system
    tried.append('ctypes.util.find_library("nccl") (the ldconfig cache)')

    raise BackendUnavailableError(
        f"libnccl not found; tried {ENV_VAR} (unset), " + ", ".join(tried) + f". {_INSTALL_HINT}"
    )


_cdll_cache: dict[str, ctypes.CDLL] = {}
_cdll_lock = threading.Lock()


def _open(path: str) -> ctypes.CDLL:
    key = os.path.realpath(path) if os.sep in path else path
    with _cdll_lock:
        cdll = _cdll_cache.get(key)
        if cdll is None:
            try:
                cdll = ctypes.CDLL(path)
            except OSError as exc:
                raise BackendUnavailableError(
                    f"could not load NCCL library {path!r}: {exc}. {_INSTALL_HINT}"
                ) from exc
            _cdll_cache[key] = cdll
        return cdll


def _decode_version(code: int) -> tuple[int, int, int]:
    # NCCL_VERSION() switched encodings after 2.8: X*1000+Y*100+Z before, X*10000+Y*100+Z after.
    if code < 10000:
        return code // 1000, (code % 1000) // 100, code % 100
    return code // 10000, (code % 10000) // 100, code % 100


_c_comm = ctypes.c_void_p
_c_stream = ctypes.c_void_p
_c_result = ctypes.c_int

# name -> (restype, argtypes); every one returns ncclResult_t except the two string getters.
_SIGNATURES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "ncclGetVersion": (_c_result, [ctypes.POINTER(ctypes.c_int)]),
    "ncclGetUniqueId": (_c_result, [ctypes.POINTER(UniqueId)]),
    # The id is passed by value (a 128-byte struct), not by pointer.
    "ncclCommInitRank": (
        _c_result,
        [ctypes.POINTER(_c_comm), ctypes.c_int, UniqueId, ctypes.c_int],
    ),
    "ncclCommDestroy": (_c_result, [_c_comm]),
    "ncclCommAbort": (_c_result, [_c_comm]),
    "ncclCommGetAsyncError": (_c_result, [_c_comm, ctypes.POINTER(_c_result)]),
    "ncclGroupStart": (_c_result, []),
    "ncclGroupEnd": (_c_result, []),
    "ncclSend": (
        _c_result,
        [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _c_comm, _c_stream],
    ),
    "ncclRecv": (
        _c_result,
        [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, _c_comm, _c_stream],
    ),
    "ncclGetErrorString": (ctypes.c_char_p, [_c_result]),
    "ncclGetLastError": (ctypes.c_char_p, [_c_comm]),
}
# Added in NCCL 2.13; older libraries still work, with less detailed errors.
_OPTIONAL: Final = frozenset({"ncclGetLastError"})


class NCCLLibrary:
    """A loaded libnccl with typed entry points; each call raises ``NCCLError`` on failure.

    The shared object is loaded once per path; instances are cheap and thread-safe, but NCCL
    itself wants a communicator driven from one thread at a time.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = find_library(path)
        cdll = _open(self.path)
        self._fns: dict[str, Any] = {}
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                # Indexing (not getattr) gives this instance its own function objects, so
                # setting argtypes cannot race with another instance on the same CDLL.
                fn = cdll[name]
            except AttributeError:
                if name in _OPTIONAL:
                    continue
                raise BackendUnavailableError(
                    f"{self.path} has no {name}; aeplb needs NCCL >= 2.7 (send/recv). "
                    f"{_INSTALL_HINT}"
                ) from None
            fn.restype = restype
            fn.argtypes = argtypes
            self._fns[name] = fn

    def __repr__(self) -> str:
        return f"NCCLLibrary({self.path!r})"

    def error_string(self, code: int) -> str:
        raw = self._fns["ncclGetErrorString"](code)
        return raw.decode(errors="replace") if raw else ""

    def last_error(self, comm: int | None = None) -> str:
        """NCCL's last error message ('' when unknown or before NCCL 2.13)."""
        fn = self._fns.get("ncclGetLastError")
        if fn is None:
            return ""
        raw = fn(comm)
        return raw.decode(errors="replace") if raw else ""

    def _check(self, fn_name: str, code: int, comm: int | None = None) -> None:
        if code == NCCL_SUCCESS:
            return
        message = f"{fn_name} failed: {result_name(code)} ({code}): {self.error_string(code)}"
        detail = self.last_error(comm)
        if detail:
            message += f" ({detail.strip()})"
        raise NCCLError(code, message)

    def version_code(self) -> int:
        out = ctypes.c_int()
        self._check("ncclGetVersion", self._fns["ncclGetVersion"](ctypes.byref(out)))
        return int(out.value)

    def version(self) -> tuple[int, int, int]:
        return _decode_version(self.version_code())

    def get_unique_id(self) -> UniqueId:
        uid = UniqueId()
        self._check("ncclGetUniqueId", self._fns["ncclGetUniqueId"](ctypes.byref(uid)))
        return uid

    def comm_init_rank(self, world_size: int, unique_id: UniqueId, rank: int) -> int:
        """Raw ncclCommInitRank; blocks until all ``world_size`` ranks have joined."""
        handle = _c_comm()
        code = self._fns["ncclCommInitRank"](ctypes.byref(handle), world_size, unique_id, rank)
        self._check("ncclCommInitRank", code)
        if not handle.value:
            raise NCCLError(3, "ncclCommInitRank succeeded but returned a NULL communicator")
        return int(handle.value)

    def comm_destroy(self, comm: int) -> None:
        self._check("ncclCommDestroy", self._fns["ncclCommDestroy"](comm), comm)

    def comm_abort(self, comm: int) -> None:
        self._check("ncclCommAbort", self._fns["ncclCommAbort"](comm), comm)

    def comm_get_async_error(self, comm: int) -> int:
        out = _c_result()
        code = self._fns["ncclCommGetAsyncError"](comm, ctypes.byref(out))
        self._check("ncclCommGetAsyncError", code, comm)
        return int(out.value)

    def group_start(self) -> None:
        self._check("ncclGroupStart", self._fns["ncclGroupStart"]())

    def group_end(self) -> None:
        self._check("ncclGroupEnd", self._fns["ncclGroupEnd"]())

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """``group_start()`` ... ``group_end()``; the end runs even if the body raises."""
        self.group_start()
        try:
            yield
        finally:
            self.group_end()

    def send(self, ptr: int, count: int, dtype: int, peer: int, comm: int, stream: int) -> None:
        code = self._fns["ncclSend"](ptr, count, dtype, peer, comm, stream)
        self._check("ncclSend", code, comm)

    def recv(self, ptr: int, count: int, dtype: int, peer: int, comm: int, stream: int) -> None:
        code = self._fns["ncclRecv"](ptr, count, dtype, peer, comm, stream)
        self._check("ncclRecv", code, comm)


class NCCLComm:
    """One rank's blocking NCCL communicator. Not thread-safe: drive it from one thread."""

    def __init__(self, lib: NCCLLibrary, handle: int, world_size: int, rank: int) -> None:
        self.lib = lib
        self._handle: int | None = handle
        self.world_size = world_size
        self.rank = rank

    @classmethod
    def init(
        cls,
        lib: NCCLLibrary,
        unique_id: UniqueId | bytes | bytearray | memoryview,
        world_size: int,
        rank: int,
    ) -> NCCLComm:
        """Join the communicator named by ``unique_id`` (from rank 0's ``get_unique_id()``).

        Binds to the calling thread's current CUDA device, so call
        ``torch.cuda.set_device(dev)`` in this same thread first. Blocks until every rank
        has called it.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        uid = unique_id if isinstance(unique_id, UniqueId) else UniqueId.from_bytes(unique_id)
        return cls(lib, lib.comm_init_rank(world_size, uid, rank), world_size, rank)

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def handle(self) -> int:
        if self._handle is None:
            # Passing a freed ncclComm_t to NCCL is a use-after-free, not an error code.
            raise NCCLError(5, "NCCLComm used after destroy() or abort()")
        return self._handle

    def _check_peer(self, peer: int, count: int) -> None:
        if not 0 <= peer < self.world_size:
            raise ValueError(f"peer {peer} is outside a world of size {self.world_size}")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")

    def send(self, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        """Enqueue ``count`` elements at device pointer ``ptr`` on CUDA stream ``stream``."""
        handle = self.handle
        self._check_peer(peer, count)
        self.lib.send(ptr, count, dtype, peer, handle, stream)

    def recv(self, ptr: int, count: int, dtype: int, peer: int, stream: int) -> None:
        handle = self.handle
        self._check_peer(peer, count)
        self.lib.recv(ptr, count, dtype, peer, handle, stream)

    def async_error(self) -> int:
        """ncclCommGetAsyncError's result code: 0 while healthy (compare with ``RESULT_NAMES``)."""
        return self.lib.comm_get_async_error(self.handle)

    def abort(self) -> None:
        """Free the communicator without waiting for pending work. No-op once closed."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self.lib.comm_abort(handle)

    def destroy(self) -> None:
        """Free the communicator once its work has completed. No-op once closed."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self.lib.comm_destroy(handle)

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else hex(self._handle)
        return f"NCCLComm(rank={self.rank}, world_size={self.world_size}, {state})"
