"""Median time of ``aeplb.rebalance_experts`` on a DeepSeek-V3-sized problem, one thread.

58 MoE layers, 256 logical experts, 288 physical slots on 32 GPUs (8 groups, 4 nodes).
Prints the figure only; writes no files.
"""

from __future__ import annotations

import statistics
import time

import torch

from aeplb.policy import rebalance_experts

LAYERS, EXPERTS, SLOTS, GROUPS, NODES, GPUS = 58, 256, 288, 8, 4, 32
WARMUP, REPEATS = 5, 50


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    # Skewed, heavy-tailed loads, as expert routing counts are.
    load = (torch.rand(LAYERS, EXPERTS, generator=gen) ** 4 * 10_000).round()
    for _ in range(WARMUP):
        rebalance_experts(load, SLOTS, GROUPS, NODES, GPUS)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        rebalance_experts(load, SLOTS, GROUPS, NODES, GPUS)
        times.append(time.perf_counter() - start)
    print(
        f"rebalance_experts {LAYERS}x{EXPERTS} -> {SLOTS} slots, {GPUS} GPUs "
        f"({GROUPS} groups, {NODES} nodes), 1 thread: "
        f"median {statistics.median(times) * 1e3:.2f} ms (target <= 10 ms)"
    )


if __name__ == "__main__":
    main()
