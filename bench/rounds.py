"""Shared by the generation benchmarks: the machine's rates line, and rounds that time each way in turn.

Each round runs every batch size once each way, the order of the ways rotating from round to round, so that load
on a shared machine hits every way alike.
"""

from __future__ import annotations

import platform

from floor import machine_rates


def print_machine(torch) -> None:
    """The CPU, torch's threads and the fp32 matmul and copy rates measured now (bench/floor.py)."""
    rates = machine_rates()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"fp32 matmul {rates['matmul_flops'] / 1e9:.0f} GFLOP/s, copy {rates['copy_bytes'] / 1e9:.0f} GB/s",
        flush=True,
    )


def rotating_rounds(ways: tuple, sizes: list[int], rounds: int, timed, same_ways: tuple) -> tuple[dict, dict]:
    """`timed(batch_size, way) -> (seconds, token ids)` for every round, batch size and way. Returns the seconds by
    (batch size, way) and, by batch size, whether the ways in `same_ways` sampled the same tokens in every round."""
    import torch

    secs = {(b, w): [] for b in sizes for w in ways}
    same = dict.fromkeys(sizes, True)
    for r in range(rounds):
        for b in sizes:
            k = r % len(ways)
            ids = {}
            for w in ways[k:] + ways[:k]:
                s, ids[w] = timed(b, w)
                secs[b, w].append(s)
            same[b] &= all(torch.equal(ids[same_ways[0]], ids[w]) for w in same_ways)
            print(
                f"round {r + 1} batch {b}: " + ", ".join(f"{w} {secs[b, w][-1]:.2f} s" for w in ways),
                flush=True,
            )
    return secs, same
