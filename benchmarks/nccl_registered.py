"""Does NCCL's user-buffer registration make one op per tensor as fast as one buffer?

NCCL 2.23+ can send and receive straight from registered buffers between GPUs of one node
(zero-copy) instead of through its own FIFO. If one ``ncclSend``/``ncclRecv`` per tensor of
the EPLB batch then ran near raw single-buffer speed, ``nccl``/``pynccl`` would need no
packing. Two ranks, aeplb's own libnccl binding; every variant moves the EPLB batch (48
DeepSeek-V3 fp8 tensors) each way and the received bytes are checked.

    NCCL_NVLS_ENABLE=0 python benchmarks/nccl_registered.py --reps 20
    NCCL_NVLS_ENABLE=0 NCCL_LEGACY_CUDA_REGISTER=1 python benchmarks/nccl_registered.py

NCCL 2.28 registers memory from cudaMalloc (torch's caching allocator) only with
``NCCL_LEGACY_CUDA_REGISTER=1``; without it, registration falls back silently
(``NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=REG`` shows "failed to IPC register").
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from aeplb.bench._spawn import enough_gpus, rank_device, run_pair
from aeplb.bench._workloads import eplb, fill
from aeplb.transports._libnccl import NCCLComm, NCCLLibrary

_UINT8 = 0  # ncclInt8 / ncclChar


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # run_pair reads it
    return p.parse_args()


class _Registry:
    """ncclCommRegister / ncclCommDeregister on one communicator."""

    def __init__(self, lib: NCCLLibrary, comm: int) -> None:
        cdll = ctypes.CDLL(lib.path)
        self._register = cdll["ncclCommRegister"]
        self._register.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self._deregister = cdll["ncclCommDeregister"]
        self._deregister.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._comm = comm
        self.handles: list[ctypes.c_void_p] = []

    def register(self, tensor: torch.Tensor) -> None:
        handle = ctypes.c_void_p()
        code = self._register(self._comm, tensor.data_ptr(), tensor.nbytes, ctypes.byref(handle))
        if code != 0:
            raise RuntimeError(f"ncclCommRegister returned {code}")
        self.handles.append(handle)

    def clear(self) -> None:
        for handle in self.handles:
            self._deregister(self._comm, handle)
        self.handles.clear()


async def _main(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    device = rank_device(rank, False)
    peer = 1 - rank
    group = dist.new_group(backend="gloo")
    lib = NCCLLibrary()
    uid = [lib.get_unique_id().to_bytes() if rank == 0 else None]
    dist.broadcast_object_list(uid, src=0, group=group)
    comm = NCCLComm.init(lib, uid[0], 2, rank)
    stream = torch.cuda.Stream(device)
    handle = stream.cuda_stream
    w = eplb(args.experts, 1)
    sends = [fill(s, w.dtype, device, 100 * rank + i).view(-1) for i, s in enumerate(w.shapes)]
    recvs = [torch.zeros(s, dtype=w.dtype, device=device).view(-1) for s in w.shapes]
    total = sum(t.nbytes for t in sends)
    one_send = torch.cat([t.view(torch.uint8) for t in sends])
    one_recv = torch.zeros(total, dtype=torch.uint8, device=device)
    registry = _Registry(lib, comm.handle)

    def exchange(out: list[torch.Tensor], into: list[torch.Tensor]) -> None:
        with lib.group():
            for t in out:
                comm.send(t.data_ptr(), t.nbytes, _UINT8, peer, handle)
            for t in into:
                comm.recv(t.data_ptr(), t.nbytes, _UINT8, peer, handle)

    def timed(name: str, out: list[torch.Tensor], into: list[torch.Tensor]) -> float:
        times = []
        for i in range(args.reps + 3):
            for t in into:
                t.zero_()
            torch.cuda.synchronize(device)
            dist.barrier(group=group)
            t0 = time.perf_counter()
            exchange(out, into)
            stream.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        got = torch.cat([t.view(torch.uint8) for t in into])
        want = [fill(s, w.dtype, device, 100 * peer + i) for i, s in enumerate(w.shapes)]
        if not torch.equal(got, torch.cat([t.view(-1).view(torch.uint8) for t in want])):
            raise AssertionError(f"{name}: received bytes differ")
        return statistics.median(times) * 1e3

    results: dict[str, Any] = {"nccl": ".".join(map(str, lib.version())), "mb": total / 2**20}
    results["raw one buffer"] = timed("raw", [one_send], [one_recv])
    results["one op per tensor"] = timed("per-op", sends, recvs)
    registry.register(one_send)
    registry.register(one_recv)
    results["raw one buffer, registered"] = timed("raw reg", [one_send], [one_recv])
    t0 = time.perf_counter()
    for t in sends + recvs:
        registry.register(t)
    results["registering 96 tensors, ms"] = (time.perf_counter() - t0) * 1e3
    results["one op per tensor, registered"] = timed("per-op reg", sends, recvs)
    registry.clear()
    comm.destroy()
    dist.destroy_process_group(group)
    return results


def main() -> int:
    args = parse_args()
    if not enough_gpus(2):
        return 2
    results = run_pair(_main, args)
    if results is None:
        return 1
    raw = results["raw one buffer"]
    print(f"NCCL {results.pop('nccl')}, {results.pop('mb'):.0f} MiB each way")
    for key, value in results.items():
        if key.startswith("registering"):
            print(f"{key:34s} {value:7.2f}")
        else:
            print(f"{key:34s} {value:7.2f} ms  {raw / value:5.2f} x raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
