"""What the hardware gives an EPLB batch, without aeplb: copy engines and NCCL variants.

Two GPUs exchange the EPLB batch of ``python -m aeplb.bench`` (16 DeepSeek-V3 experts in
fp8 each way: 48 tensors of 14.7 MB, 704 MB per direction), moved in several ways:

* ``ce-*`` (one process driving both GPUs): device-to-device memcpy on the copy engines,
  the way ``backend="ipc"`` moves data. One copy of the whole batch, one copy per tensor,
  the per-tensor copies in one ``cuMemcpyBatchAsync`` call, pushed from the source GPU's
  stream or pulled from the destination's.
* ``nccl-*`` (two processes, torch.distributed NCCL): one buffer (the ceiling the aeplb
  bench calls raw), one p2p op per tensor in one group, one group per tensor pair, and
  pack into one buffer, send, unpack. Each NCCL environment in ``--nccl-env`` is a
  separate pair of processes.

Every variant is timed on the host from the first enqueue to the data being in place
(median over ``--reps``); every copy's data is checked once against its source.

    NCCL_NVLS_ENABLE=0 python benchmarks/copy_floor.py --json floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from aeplb.bench._spawn import Meeting, enough_gpus, run_ranks
from aeplb.bench._workloads import DSV3_EXPERT

Result = dict[str, Any]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=16, help="experts each way (default 16)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--part", choices=["ce", "nccl", "all"], default="all")
    p.add_argument(
        "--nccl-env",
        default="default;NCCL_P2P_USE_CUDA_MEMCPY=1;NCCL_MIN_P2P_NCHANNELS=32",
        help="';'-separated NCCL environments, each 'default' or K=V[,K=V]",
    )
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args()


def _shapes(experts: int) -> list[tuple[int, int]]:
    return [s for _ in range(experts) for s in DSV3_EXPERT]


def _tensors(shapes: list[tuple[int, int]], device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randint(1, 255, s, dtype=torch.uint8, device=device, generator=g) for s in shapes]


def _median_ms(fn: Callable[[], None], reps: int, warmup: int, sync: Callable[[], None]) -> float:
    times = []
    for i in range(warmup + reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -- copy engines, one process -------------------------------------------------------------


def copy_engines(args: argparse.Namespace) -> list[Result]:
    from aeplb.transports._libcuda import Driver

    devs = [torch.device("cuda", 0), torch.device("cuda", 1)]
    shapes = _shapes(args.experts)
    src = [_tensors(shapes, d, seed=i + 1) for i, d in enumerate(devs)]
    dst = [[torch.empty_like(t) for t in ts] for ts in src[::-1]]  # dst[i] on the other GPU
    total = sum(t.numel() for t in src[0])
    big_src = [torch.cat([t.view(-1) for t in ts]) for ts in src]
    big_dst = [torch.empty_like(b) for b in big_src[::-1]]
    # torch enables peer access on the first copy between the two GPUs, both ways
    big_dst[0][:1].copy_(big_src[0][:1])
    big_dst[1][:1].copy_(big_src[1][:1])
    driver = Driver.get()
    for d in devs:
        driver.use_primary_context(d.index)
    driver.use_primary_context(0)
    streams = {(i, j): torch.cuda.Stream(devs[i]) for i in range(2) for j in range(2)}

    def sync() -> None:
        for d in devs:
            torch.cuda.synchronize(d)

    def plan(direction: int) -> tuple[list[int], list[int], list[int]]:
        s, d = src[direction], dst[direction]  # direction 0: GPU 0 -> GPU 1
        return [t.data_ptr() for t in d], [t.data_ptr() for t in s], [t.numel() for t in s]

    plans = [plan(0), plan(1)]

    def issue(stream_of: Callable[[int], torch.cuda.Stream], how: str, directions: list[int]):
        def go() -> None:
            for k in directions:
                stream = stream_of(k)
                handle = stream.cuda_stream
                # the stream's device must be current for the driver call
                with torch.cuda.device(stream.device):
                    if how == "one":
                        driver.copy_async(
                            big_dst[k].data_ptr(), big_src[k].data_ptr(), total, handle
                        )
                    elif how == "each":
                        for dp, sp, n in zip(*plans[k], strict=True):
                            driver.copy_async(dp, sp, n, handle)
                    elif how == "batch":
                        driver.copy_batch_async(*plans[k], handle)
                    elif how == "each2":  # alternate between two streams of the same GPU
                        pair = (handle, streams[(stream.device.index, 1)].cuda_stream)
                        for i, (dp, sp, n) in enumerate(zip(*plans[k], strict=True)):
                            driver.copy_async(dp, sp, n, pair[i % 2])

        return go

    push = lambda k: streams[(k, 0)]  # noqa: E731 - the source GPU's stream
    pull = lambda k: streams[(1 - k, 0)]  # noqa: E731 - the destination GPU's stream
    variants: list[tuple[str, Callable[[], None], int]] = [
        ("ce-one-copy-push", issue(push, "one", [0, 1]), 2),
        ("ce-one-copy-push-oneway", issue(push, "one", [0]), 1),
        ("ce-per-tensor-push", issue(push, "each", [0, 1]), 2),
        ("ce-per-tensor-pull", issue(pull, "each", [0, 1]), 2),
        ("ce-per-tensor-push-2streams", issue(push, "each2", [0, 1]), 2),
        ("ce-one-copy-pull", issue(pull, "one", [0, 1]), 2),
    ]
    if driver.has_copy_batch:
        variants += [
            ("ce-batch-push", issue(push, "batch", [0, 1]), 2),
            ("ce-batch-pull", issue(pull, "batch", [0, 1]), 2),
        ]
    results = []
    for name, fn, directions in variants:
        for d in dst + big_dst:
            for t in d if isinstance(d, list) else [d]:
                t.fill_(0)
        sync()
        fn()
        sync()
        ok = True
        for k in range(directions):
            if "one-copy" in name:
                ok &= torch.equal(big_dst[k].cpu(), big_src[k].cpu())
            else:
                ok &= all(
                    torch.equal(a.cpu(), b.cpu()) for a, b in zip(dst[k], src[k], strict=True)
                )
        ms = _median_ms(fn, args.reps, args.warmup, sync)
        r = {"variant": name, "ms": ms, "gbps_per_direction": total / ms / 1e6, "verified": ok}
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


# -- NCCL, two processes ------------------------------------------------------------------


def _nccl_rank(rank: int, world: int, meeting: Meeting, args: Any, out: Any) -> None:
    env, opts = args
    os.environ.update(env)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl",
        store=meeting.store(rank, world, timedelta(seconds=120)),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
        device_id=device,
    )
    peer = 1 - rank
    shapes = _shapes(opts.experts)
    src = _tensors(shapes, device, seed=rank + 1)
    want = _tensors(shapes, device, seed=peer + 1)
    dst = [torch.empty_like(t) for t in src]
    total = sum(t.numel() for t in src)
    big_src = torch.cat([t.view(-1) for t in src])
    big_dst = torch.empty_like(big_src)
    stream = torch.cuda.current_stream()

    def sync() -> None:
        torch.cuda.synchronize()
        dist.barrier(device_ids=[rank])

    def group(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        ops = []
        for s, d in pairs:
            ops.append(dist.P2POp(dist.isend, s, peer))
            ops.append(dist.P2POp(dist.irecv, d, peer))
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    def one_buffer() -> None:
        group([(big_src, big_dst)])

    def per_tensor_one_group() -> None:
        group([(s.view(-1), d.view(-1)) for s, d in zip(src, dst, strict=True)])

    def group_per_tensor() -> None:
        for s, d in zip(src, dst, strict=True):
            group([(s.view(-1), d.view(-1))])

    def pack_send_unpack() -> None:
        torch.cat([t.view(-1) for t in src], out=big_src)
        group([(big_src, big_dst)])
        torch._foreach_copy_(
            [d.view(-1) for d in dst], list(torch.split(big_dst, [t.numel() for t in dst]))
        )

    variants = [
        ("nccl-one-buffer", one_buffer, False),
        ("nccl-per-tensor-one-group", per_tensor_one_group, True),
        ("nccl-group-per-tensor", group_per_tensor, True),
        ("nccl-pack-send-unpack", pack_send_unpack, True),
    ]
    results = []
    for name, fn, check in variants:
        for d in dst:
            d.fill_(0)
        sync()
        fn()
        sync()
        ok = all(torch.equal(a, b) for a, b in zip(dst, want, strict=True)) if check else True
        ms = _median_ms(fn, opts.reps, opts.warmup, sync)
        results.append(
            {"variant": name, "ms": ms, "gbps_per_direction": total / ms / 1e6, "verified": ok}
        )
    del stream
    dist.destroy_process_group()
    if rank == 0:
        out.put(results)


def nccl(args: argparse.Namespace) -> list[Result]:
    results = []
    for spec in args.nccl_env.split(";"):
        env = {}
        if spec.strip() and spec.strip() != "default":
            env = dict(kv.split("=", 1) for kv in spec.split(","))
        got = run_ranks(_nccl_rank, 2, (env, args))
        for r in got or [{"variant": "failed", "ms": float("nan")}]:
            r["env"] = spec
            print(json.dumps(r), flush=True)
            results.append(r)
    return results


def main() -> int:
    args = parse_args()
    if not enough_gpus(2):
        return 2
    results: list[Result] = []
    if args.part in ("ce", "all"):
        results += copy_engines(args)
    if args.part in ("nccl", "all"):
        results += nccl(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "argv": sys.argv,
                    "torch": torch.__version__,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                    "device": torch.cuda.get_device_name(0),
                    "results": results,
                },
                f,
                indent=1,
            )
    return 0 if all(r.get("verified", False) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
