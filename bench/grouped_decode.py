"""HF generation with grouped keys and values read in place (cai.runtime.packing.grouped_kv_attention) against
transformers' own decode step on the CPU, which repeats the whole key-value cache once per query head in every
layer and step: same prompts, seeds and process, the order rotating between rounds.

    .venv/bin/python bench/grouped_decode.py                  # smollm2-135m-instruct, batches 8 and 32
    .venv/bin/python bench/grouped_decode.py --batch-sizes 8 --rounds 5

Reported per batch size: the median seconds of each way, the median of the per-round ratios of the repeated way
to the grouped one (above 1: grouped is faster) with their range, and whether both sampled the same tokens (they
must: same kernel, same sums). The figures go into docs/benchmarks.md, section "Decode step: grouped keys in
place".
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import print_machine, rotating_rounds  # noqa: E402

WAYS = ("repeated keys", "grouped keys")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch
    from generation import bench_prompts

    from cai.runtime import generate as gen
    from cai.runtime.models import load_for_inference

    model, tok = load_for_inference(args.model)
    sampling = gen.Sampling(max_new_tokens=args.max_new_tokens, temperature=0.7)
    engine = gen.Engine(model, tok, sampling)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = [engine.encode({"messages": m}) for m in bench_prompts(max(sizes))]
    backend = gen.HFBackend(model, tok)
    own = gen.grouped_kv_attention

    def timed(batch: list[list[int]], way: str):
        gen.grouped_kv_attention = own if way == "grouped keys" else contextlib.nullcontext
        try:
            t0 = time.perf_counter()
            out = backend.generate_ids(batch, sampling, seed=0)
            return time.perf_counter() - t0, out.response_ids
        finally:
            gen.grouped_kv_attention = own

    print_machine(torch)
    timed(prompts[:2], "grouped keys")  # warm-up
    secs, same = rotating_rounds(WAYS, sizes, args.rounds, lambda b, w: timed(prompts[:b], w), WAYS)

    print("\n| batch | repeated keys s | grouped keys s | repeated / grouped (median, range) | same tokens |")
    print("|---:|---:|---:|---|---|")
    for b in sizes:
        med = {w: statistics.median(secs[b, w]) for w in WAYS}
        gain = [r / g for r, g in zip(secs[b, "repeated keys"], secs[b, "grouped keys"])]
        print(
            f"| {b} | {med['repeated keys']:.2f} | {med['grouped keys']:.2f} | "
            f"{statistics.median(gain):.2f} ({min(gain):.2f}–{max(gain):.2f}) | {'yes' if same[b] else 'no'} |"
        )


if __name__ == "__main__":
    main()
