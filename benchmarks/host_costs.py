"""Host time of the CUDA calls an ``ipc`` batch makes, one process, one GPU.

Each line is the median host time of one call (microseconds): recording and waiting on
ordinary and interprocess events, entering a stream context, a driver pointer query, one
``cuMemcpyBatchAsync`` of 48 small copies, against 48 ``cuMemcpyDtoDAsync`` calls.

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
    print(json.dumps({"host_us": results, "copies_verified": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
