"""Host time of the CUDA calls an ``ipc`` batch makes, one process, one GPU.

Each line is the median host time of one call (microseconds): recording and waiting on
ordinary and interprocess events, entering a stream context, a driver pointer query, one
``cuMemcpyBatchAsync`` of 48 small copies, against 48 ``cuMemcpyDtoDAsync`` calls.

The packing lines time the ways to gather many tensors into one staging buffer on one GPU
(and to scatter it back): host time per call and GPU time per call, for 1000 x 64 KiB
tensors (the many-small workload), 256 x 1 MiB, 192 smaller expert tensors of two shapes
and 48 DeepSeek-V3 fp8 expert tensors (eplb).

    python benchmarks/host_costs.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from aeplb.transports._libcuda import Driver


def _us(fn: Callable[[], object], reps: int = 2000) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def _gpu_ms(fn: Callable[[], object], stream: torch.cuda.Stream, reps: int = 20) -> float:
    with torch.cuda.stream(stream):
        fn()  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
    end.synchronize()
    return float(start.elapsed_time(end)) / reps


def _pack_ways(
    driver: Driver, stream: torch.cuda.Stream, label: str, sizes: list[tuple[int, ...]]
) -> dict[str, dict[str, float]]:
    handle = stream.cuda_stream
    tensors = [torch.randint(1, 255, s, dtype=torch.uint8, device="cuda") for s in sizes]
    back = [torch.empty_like(t) for t in tensors]
    buf = torch.empty(sum(t.numel() for t in tensors), dtype=torch.uint8, device="cuda")
    views = [t.view(-1) for t in tensors]
    back_views = [t.view(-1) for t in back]
    srcs = np.array([t.data_ptr() for t in tensors], dtype=np.uint64)
    lens = np.array([t.numel() for t in tensors], dtype=np.uint64)
    dsts = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.uint64) + np.uint64(buf.data_ptr())
    backs = np.array([t.data_ptr() for t in back], dtype=np.uint64)
    ways: dict[str, Callable[[], object]] = {
        "byte views": lambda: [t.view(-1).view(torch.uint8) for t in tensors],
        "pack torch.cat": lambda: torch.cat(views, out=buf),
        "pack torch._chunk_cat": lambda: torch._chunk_cat(tensors, 0, 1, out=buf.view(1, -1)),
        "unpack _foreach_copy_": lambda: torch._foreach_copy_(
            back_views, list(torch.split(buf, [v.numel() for v in views]))
        ),
        "unpack unflatten+_foreach_copy_": lambda: torch._foreach_copy_(
            back, torch._C._nn.unflatten_dense_tensors(buf, back)
        ),
        "unpack split_with_sizes_copy (flat views)": lambda: torch.split_with_sizes_copy(
            buf, [v.numel() for v in views], 0, out=[t.view(-1) for t in back]
        ),
        "pack cuMemcpyBatchAsync": lambda: driver.copy_batch_async(dsts, srcs, lens, handle),
        "unpack cuMemcpyBatchAsync": lambda: driver.copy_batch_async(backs, dsts, lens, handle),
    }
    if all(t.dim() == 1 for t in back):
        sizes = [t.numel() for t in back]
        ways["unpack split_with_sizes_copy (1-D tensors)"] = lambda: torch.split_with_sizes_copy(
            buf, sizes, 0, out=back
        )
    out: dict[str, dict[str, float]] = {}
    reps = 200 if len(tensors) > 100 else 500
    with torch.cuda.stream(stream):
        for name, fn in ways.items():
            gpu = 0.0 if name == "byte views" else _gpu_ms(fn, stream)
            out[f"{label}: {name}"] = {"host_us": _us(fn, reps), "gpu_ms": gpu}
    stream.synchronize()
    for t, b in zip(tensors, back, strict=True):
        if not torch.equal(t, b):
            raise AssertionError(f"{label}: the packed and unpacked bytes differ")
    return out


def _packing(driver: Driver, stream: torch.cuda.Stream) -> dict[str, dict[str, float]]:
    many = [(64 << 10,)] * 1000
    eplb = [(2048, 7168), (2048, 7168), (7168, 2048)] * 16
    mid = [(1 << 20,)] * 256
    # smaller experts, as in a 30B-A3B model: 192 tensors of 1.5 MB in two shapes
    small_experts = [(768, 2048), (768, 2048), (2048, 768)] * 64
    return (
        _pack_ways(driver, stream, "1000 x 64 KiB", many)
        | _pack_ways(driver, stream, "256 x 1 MiB", mid)
        | _pack_ways(driver, stream, "192 small-expert tensors", small_experts)
        | _pack_ways(driver, stream, "48 eplb tensors", eplb)
    )


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.cuda.set_device(0)
    driver = Driver.get()
    driver.use_primary_context(0)
    stream = torch.cuda.Stream()
    plain = torch.cuda.Event()
    ipc = torch.cuda.Event(interprocess=True)
    ipc.record(stream)
    src = torch.ones(48, 1024, dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    dsts = np.array([r.data_ptr() for r in dst], dtype=np.uint64)
    srcs = np.array([r.data_ptr() for r in src], dtype=np.uint64)
    sizes = np.full(48, 1024, dtype=np.uint64)
    handle = stream.cuda_stream

    def enter_exit() -> None:
        with torch.cuda.stream(stream):
            pass

    results = {
        "event record": _us(lambda: plain.record(stream)),
        "interprocess event record": _us(lambda: ipc.record(stream)),
        "stream wait (event)": _us(lambda: stream.wait_event(plain)),
        "stream wait (interprocess event)": _us(lambda: stream.wait_event(ipc)),
        "new event": _us(torch.cuda.Event),
        "torch.cuda.stream() enter+exit": _us(enter_exit),
        "driver pointer query": _us(lambda: driver.allocation(src.data_ptr())),
        "48 copies, one batch call": _us(
            lambda: driver.copy_batch_async(dsts, srcs, sizes, handle), 500
        ),
        "48 copies, 48 calls": _us(
            lambda: [
                driver.copy_async(int(d), int(s), 1024, handle)
                for d, s in zip(dsts, srcs, strict=True)
            ],
            500,
        ),
    }
    stream.synchronize()
    ok = torch.equal(dst, src)
    for name, us in results.items():
        print(f"{name:36s} {us:8.1f} us")
    packing = _packing(driver, stream)
    for name, cost in packing.items():
        print(f"{name:44s} host {cost['host_us']:9.1f} us  gpu {cost['gpu_ms']:7.3f} ms")
    print(json.dumps({"host_us": results, "packing": packing, "copies_verified": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
