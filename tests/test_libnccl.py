from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import torch

from aeplb._exceptions import BackendUnavailableError
from aeplb.transports import _libnccl
from aeplb.transports._libnccl import (
    ENV_VAR,
    NCCL_UNIQUE_ID_BYTES,
    DataType,
    NCCLComm,
    NCCLError,
    NCCLLibrary,
    UniqueId,
    as_bytes_count,
    find_library,
    nccl_dtype,
    result_name,
)


def _require_gpu() -> None:
    if torch.cuda.is_available():
        return
    reason = "needs a CUDA GPU (torch.cuda.is_available() is False)"
    # CI on GPU machines sets this so that a broken CUDA setup cannot pass as all-skipped.
    if os.environ.get("AEPLB_REQUIRE_GPU") == "1":
        pytest.fail(f"AEPLB_REQUIRE_GPU=1 but this test {reason}")
    pytest.skip(reason)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


# --- find_library ---------------------------------------------------------------------------


def test_explicit_bogus_path_raises_helpful_error(no_env: None, tmp_path: Path) -> None:
    bogus = str(tmp_path / "nope" / "libnccl.so.2")
    with pytest.raises(BackendUnavailableError) as info:
        find_library(bogus)
    message = str(info.value)
    assert bogus in message
    assert "does not exist" in message
    assert ENV_VAR in message
    assert "nvidia-nccl-cu13" in message
    assert "nvidia-nccl-cu12" in message


def test_explicit_path_wins_over_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env.so"))
    with pytest.raises(BackendUnavailableError, match="explicit"):
        find_library(str(tmp_path / "explicit.so"))


def test_env_var_pointing_at_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing" / "libnccl.so.2")
    monkeypatch.setenv(ENV_VAR, missing)
    with pytest.raises(BackendUnavailableError) as info:
        find_library()
    assert missing in str(info.value)
    assert ENV_VAR in str(info.value)


def test_env_var_file_and_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "libnccl.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv(ENV_VAR, str(lib))
    assert find_library() == str(lib)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert find_library() == str(lib)


def test_env_var_directory_without_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="directory"):
        find_library()


def test_bare_soname_is_left_to_dlopen(no_env: None) -> None:
    assert find_library("libnccl.so.2") == "libnccl.so.2"


def test_wheel_layout_is_searched(tmp_path: Path) -> None:
    lib_dir = tmp_path / "nvidia" / "nccl" / "lib"
    assert str(lib_dir) in _libnccl._wheel_dirs([str(tmp_path)])


def test_wheel_layout_found(no_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib_dir = tmp_path / "nvidia" / "nccl" / "lib"
    lib_dir.mkdir(parents=True)
    (lib_dir / "libnccl.so.2").write_bytes(b"")
    monkeypatch.setattr(_libnccl, "_loaded_library_paths", list)
    monkeypatch.setattr(_libnccl, "_wheel_dirs", lambda: [str(lib_dir)])
    assert find_library() == str(lib_dir / "libnccl.so.2")


def test_nothing_found_lists_what_was_tried(no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_libnccl, "_loaded_library_paths", list)
    monkeypatch.setattr(_libnccl, "_wheel_dirs", list)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    with pytest.raises(BackendUnavailableError) as info:
        find_library()
    message = str(info.value)
    for expected in (ENV_VAR, "nvidia/nccl/lib", "LD_LIBRARY_PATH", "ldconfig", "pip install"):
        assert expected in message


def test_loading_a_non_library_raises(no_env: None, tmp_path: Path) -> None:
    fake = tmp_path / "libnccl.so.2"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(BackendUnavailableError, match="could not load"):
        NCCLLibrary(str(fake))


# --- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.int8, 0),
        (torch.uint8, 1),
        (torch.int32, 2),
        (torch.uint32, 3),
        (torch.int64, 4),
        (torch.uint64, 5),
        (torch.float16, 6),
        (torch.float32, 7),
        (torch.float64, 8),
        (torch.bfloat16, 9),
        (torch.float8_e4m3fn, 10),
        (torch.float8_e5m2, 11),
    ],
)
def test_dtype_mapping(dtype: torch.dtype, expected: int) -> None:
    assert nccl_dtype(dtype) == expected
    assert nccl_dtype(dtype, (2, 24, 3)) == expected


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.float8_e4m3fnuz])
def test_dtype_without_nccl_twin_points_to_bytes(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="as_bytes_count"):
        nccl_dtype(dtype)


def test_fp8_refused_on_old_nccl() -> None:
    with pytest.raises(ValueError, match=r"2\.24"):
        nccl_dtype(torch.float8_e4m3fn, (2, 21, 5))
    assert nccl_dtype(torch.bfloat16, (2, 21, 5)) == DataType.BFLOAT16


def test_as_bytes_count() -> None:
    assert as_bytes_count(torch.zeros(3, 5, dtype=torch.bfloat16)) == 30
    assert as_bytes_count(torch.zeros(7, dtype=torch.float8_e5m2)) == 7
    assert as_bytes_count(torch.zeros(0, dtype=torch.float32)) == 0
    with pytest.raises(ValueError, match="contiguous"):
        as_bytes_count(torch.zeros(4, 4).t())


def test_unique_id_bytes_round_trip() -> None:
    assert ctypes.sizeof(UniqueId) == NCCL_UNIQUE_ID_BYTES == 128
    # NUL bytes inside the id must survive: c_char arrays would truncate at them.
    raw = b"\x00\x01" + os.urandom(NCCL_UNIQUE_ID_BYTES - 4) + b"\x00\x00"
    uid = UniqueId.from_bytes(raw)
    assert uid.to_bytes() == raw
    assert UniqueId.from_bytes(bytearray(raw)).to_bytes() == raw
    assert UniqueId.from_bytes(memoryview(raw)).to_bytes() == raw
    tensor = uid.to_tensor()
    assert tensor.dtype == torch.uint8
    assert tensor.shape == (NCCL_UNIQUE_ID_BYTES,)
    assert UniqueId.from_tensor(tensor).to_bytes() == raw
    with pytest.raises(ValueError, match="128"):
        UniqueId.from_bytes(raw[:-1])
    with pytest.raises(ValueError, match="uint8"):
        UniqueId.from_tensor(tensor.to(torch.int32))


def test_result_names_and_error() -> None:
    assert result_name(0) == "ncclSuccess"
    assert result_name(4) == "ncclInvalidArgument"
    assert result_name(7) == "ncclInProgress"
    assert result_name(99) == "ncclResult(99)"
    err = NCCLError(2, "ncclSend failed: ncclSystemError (2): boom")
    assert isinstance(err, RuntimeError)
    assert err.name == "ncclSystemError"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, str(copy)) == (2, str(err))


def test_version_decoding() -> None:
    assert _libnccl._decode_version(2804) == (2, 8, 4)
    assert _libnccl._decode_version(20906) == (2, 9, 6)
    assert _libnccl._decode_version(22807) == (2, 28, 7)


class _StubLib:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def comm_destroy(self, comm: int) -> None:
        self.calls.append(("destroy", comm))

    def comm_abort(self, comm: int) -> None:
        self.calls.append(("abort", comm))


def test_comm_close_is_idempotent_and_guards_use_after_free() -> None:
    stub = _StubLib()
    comm = NCCLComm(cast(NCCLLibrary, stub), 0x1234, world_size=2, rank=0)
    with pytest.raises(ValueError, match="peer"):
        comm.send(0, 1, DataType.UINT8, 2, 0)
    comm.destroy()
    comm.destroy()
    comm.abort()
    assert stub.calls == [("destroy", 0x1234)]
    assert comm.closed
    with pytest.raises(NCCLError) as info:
        comm.send(0, 1, DataType.UINT8, 1, 0)
    assert info.value.name == "ncclInvalidUsage"


def test_comm_init_validates_rank() -> None:
    lib = cast(NCCLLibrary, _StubLib())
    with pytest.raises(ValueError, match="rank"):
        NCCLComm.init(lib, bytes(NCCL_UNIQUE_ID_BYTES), 2, 2)


# --- real libnccl on a GPU ------------------------------------------------------------------


@pytest.fixture
def gpu_lib() -> NCCLLibrary:
    _require_gpu()
    torch.cuda.set_device(0)
    return NCCLLibrary()


@pytest.fixture
def one_rank_comm(gpu_lib: NCCLLibrary) -> Iterator[NCCLComm]:
    comm = NCCLComm.init(gpu_lib, gpu_lib.get_unique_id().to_bytes(), 1, 0)
    try:
        yield comm
    finally:
        comm.abort()


@pytest.mark.gpu
def test_gpu_version(gpu_lib: NCCLLibrary) -> None:
    assert gpu_lib.version() >= (2, 0, 0)
    assert gpu_lib.version_code() > 0


@pytest.mark.gpu
def test_gpu_single_rank_init_destroy(gpu_lib: NCCLLibrary) -> None:
    uid = gpu_lib.get_unique_id()
    assert len(uid.to_bytes()) == NCCL_UNIQUE_ID_BYTES
    comm = NCCLComm.init(gpu_lib, uid.to_bytes(), world_size=1, rank=0)
    assert "closed" not in repr(comm)
    assert comm.async_error() == 0
    comm.destroy()
    assert comm.closed
    comm.destroy()


@pytest.mark.gpu
def test_gpu_self_send_recv(gpu_lib: NCCLLibrary, one_rank_comm: NCCLComm) -> None:
    stream = torch.cuda.current_stream()
    # Odd size so that no alignment-friendly path hides an off-by-one in the count.
    src = torch.randint(0, 256, ((1 << 20) + 3,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    with gpu_lib.group():
        one_rank_comm.send(src.data_ptr(), src.numel(), DataType.UINT8, 0, stream.cuda_stream)
        one_rank_comm.recv(dst.data_ptr(), dst.numel(), DataType.UINT8, 0, stream.cuda_stream)
    stream.synchronize()
    sent, got = src.cpu().tolist(), dst.cpu().tolist()
    mismatches = [i for i, (a, b) in enumerate(zip(sent, got, strict=True)) if a != b]
    assert not mismatches, f"{len(mismatches)} bytes differ, first at {mismatches[:5]}"
    assert one_rank_comm.async_error() == 0


@pytest.mark.gpu
def test_gpu_self_send_recv_as_bytes(gpu_lib: NCCLLibrary, one_rank_comm: NCCLComm) -> None:
    stream = torch.cuda.current_stream()
    src = torch.randn(257, 33, device="cuda").to(torch.bfloat16)
    dst = torch.empty_like(src)
    count = as_bytes_count(src)
    with gpu_lib.group():
        one_rank_comm.send(src.data_ptr(), count, DataType.UINT8, 0, stream.cuda_stream)
        one_rank_comm.recv(dst.data_ptr(), count, DataType.UINT8, 0, stream.cuda_stream)
    stream.synchronize()
    assert torch.equal(src.view(torch.uint8), dst.view(torch.uint8))


@pytest.mark.gpu
def test_gpu_bad_argument_raises_nccl_error(gpu_lib: NCCLLibrary, one_rank_comm: NCCLComm) -> None:
    stream = torch.cuda.current_stream()
    buf = torch.zeros(16, dtype=torch.uint8, device="cuda")
    with pytest.raises(NCCLError) as info:
        one_rank_comm.send(buf.data_ptr(), buf.numel(), 99, 0, stream.cuda_stream)
    assert info.value.name == "ncclInvalidArgument"
    assert "ncclSend" in str(info.value)
