"""Shared by the benchmarks: the argparse types of their counts, the generation benchmarks' command line and
inputs, the machine's rates line, rounds that time each way in turn (decoding, and two ways of training), and the
ratio cell of their tables.

Each round runs every batch size once each way, the order of the ways rotating from round to round, so that load
on a shared machine hits every way alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

from floor import machine_rates


def positive_int(text: str) -> int:
    """argparse type of a count (rounds, updates, steps, examples, pairs): an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of 1 or more is expected, not {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type of --batch-sizes: comma-separated whole numbers of 1 or more, e.g. 8,32."""
    try:
        return [positive_int(x) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"comma-separated whole numbers of 1 or more are expected (e.g. 8,32), not {text!r}"
        ) from None


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


def compare_trainings(ways: tuple, rounds: int, train) -> None:
    """Two ways of training the same thing, `train(way, out_dir) -> (seconds, mean loss, trained weights)` from a
    fresh model each time, alternating which goes first; prints each round, the checks that both trained alike
    (the last round's mean losses, their weights' largest difference relative to the largest weight), the seconds
    per way and the per-round ratios (the first way's over the second's: above 1, the second is faster)."""
    import tempfile
    from pathlib import Path

    secs = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ways if r % 2 == 0 else ways[::-1]
            got = {w: train(w, Path(tmp) / f"{r}-{i}") for i, w in enumerate(order)}
            for w in ways:
                secs[w].append(got[w][0])
            print(f"round {r + 1}: " + ", ".join(f"{w} {got[w][0]:.1f} s" for w in ways), flush=True)
    (_, loss_a, w_a), (_, loss_b, w_b) = got[ways[0]], got[ways[1]]
    ratios = [a / b for a, b in zip(secs[ways[0]], secs[ways[1]])]
    print(f"\nmean loss: {ways[0]} {loss_a:.6f}, {ways[1]} {loss_b:.6f}")
    diff = float((w_b - w_a).abs().max() / w_a.abs().max())
    print(f"weights after the epoch: largest difference {diff:.1e} of the largest weight")
    print("\n| way | median s | rounds |")
    print("|---|---:|---|")
    for w in ways:
        print(f"| {w} | {statistics.median(secs[w]):.1f} | {', '.join(f'{s:.1f}' for s in secs[w])} |")
    print(
        f"\nspeed-up ({ways[0]} / {ways[1]}): median {statistics.median(ratios):.2f}, "
        f"range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds"
    )


def decode_args(description: str, batch_sizes: str = "8,32", threads: bool = False, extra=None):
    """The decode benchmarks' options: --model, --batch-sizes, --max-new-tokens, --rounds (and --threads), and
    those `extra(parser)` adds."""
    ap = argparse.ArgumentParser(description=description)
    if extra:
        extra(ap)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", type=int_list, default=batch_sizes)
    ap.add_argument("--max-new-tokens", type=positive_int, default=48)
    ap.add_argument("--rounds", type=positive_int, default=3)
    if threads:
        ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return ap.parse_args()


def decode_inputs(args):
    """(model, tokenizer, sampling, batch sizes, prompts) of a decode benchmark: `args.model` loaded for
    inference, temperature 0.7 and `args.max_new_tokens`, and as many built-in prompts (red-team and helpful, as
    the quickstart's) as the largest batch, as token ids through the chat template."""
    from generation import bench_prompts

    from cai.runtime import generate as gen
    from cai.runtime.models import load_for_inference

    model, tok = load_for_inference(args.model)
    sampling = gen.Sampling(max_new_tokens=args.max_new_tokens, temperature=0.7)
    engine = gen.Engine(model, tok, sampling)
    sizes = args.batch_sizes
    prompts = [engine.encode({"messages": m}) for m in bench_prompts(max(sizes))]
    return model, tok, sampling, sizes, prompts


def ratio_cell(baseline: list[float], ours: list[float]) -> str:
    """The median of the per-round ratios baseline / ours, with their range: `1.10 (1.07–1.24)`."""
    ratios = [b / o for b, o in zip(baseline, ours)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def print_ratio_table(sizes: list[int], secs: dict, ways: tuple, extra: dict | None = None) -> None:
    """The markdown table of a benchmark of two ways: per batch size, the median seconds of each way, the ratio
    cell of the first way (the baseline) to the second, then one cell per `extra` column (a function of the batch
    size)."""
    extra = extra or {}
    base, ours = ways
    head = ["batch", f"{base} s", f"{ours} s", f"{base} / {ours} (median, range)", *extra]
    print("\n| " + " | ".join(head) + " |")
    print("|---:|---:|---:|---|" + "---|" * len(extra))
    for b in sizes:
        med = [statistics.median(secs[b, w]) for w in ways]
        cells = [str(b), f"{med[0]:.2f}", f"{med[1]:.2f}", ratio_cell(secs[b, base], secs[b, ours])]
        print("| " + " | ".join(cells + [f(b) for f in extra.values()]) + " |")


if __name__ == "__main__":
    sys.stderr.write(
        "bench/rounds.py is a module of the benchmarks (the decode and training benchmarks import it), not a script\n"
    )
    sys.exit(2)
