"""HF generation with the decode steps' linears weight-major (cai.runtime.forward.weight_major_linears) against
`nn.Linear`'s own forward: same model, prompts, seeds and process, alternated in every round.

    .venv/bin/python bench/decode_linears.py                  # smollm2-135m-instruct, batches 1, 8, 32
    .venv/bin/python bench/decode_linears.py --batch-sizes 8 --rounds 5 --max-new-tokens 48

Each round generates every batch size once each way (the order alternating between rounds), with the same seed
both ways. Reported per batch size: the median seconds of each way, the median of the per-round ratios
(`nn.Linear` seconds / weight-major seconds: above 1 means the weight-major decode is faster), their range, and
whether both ways sampled the same tokens. The machine's fp32 matmul and copy rates (bench/floor.py) are printed
first, since the ratio depends on the CPU and its memory bandwidth. The figures go into docs/benchmarks.md,
section "Decode-step linears".
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from floor import machine_rates  # noqa: E402


def prompt_ids(engine, n: int) -> list[list[int]]:
    """`n` built-in prompts (red-team and helpful, as the quickstart's), as the engine encodes them: token ids."""
    from generation import bench_prompts

    return [engine.encode({"messages": m}) for m in bench_prompts(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()

    import torch

    from cai.runtime import generate as gen
    from cai.runtime.models import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.model)
    sampling = gen.Sampling(max_new_tokens=args.max_new_tokens, temperature=0.7)
    engine = gen.Engine(model, tok, sampling)
    backend = engine.backend  # HF
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = prompt_ids(engine, max(sizes))
    own = gen.weight_major_linears

    def timed(batch: list[list[int]], weight_major: bool):
        gen.weight_major_linears = own if weight_major else (lambda m: contextlib.nullcontext())
        try:
            t0 = time.perf_counter()
            out = backend.generate_ids(batch, sampling, seed=0)
            return time.perf_counter() - t0, out.response_ids
        finally:
            gen.weight_major_linears = own

    rates = machine_rates()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"fp32 matmul {rates['matmul_flops'] / 1e9:.0f} GFLOP/s, copy {rates['copy_bytes'] / 1e9:.0f} GB/s",
        flush=True,
    )
    timed(prompts[:1], True)  # warm-up
    secs = {(b, w): [] for b in sizes for w in (False, True)}
    same = dict.fromkeys(sizes, True)
    for r in range(args.rounds):
        for b in sizes:
            order = (False, True) if r % 2 == 0 else (True, False)
            ids = {}
            for w in order:
                s, ids[w] = timed(prompts[:b], w)
                secs[b, w].append(s)
            same[b] &= torch.equal(ids[False], ids[True])
            print(
                f"round {r + 1} batch {b}: linear {secs[b, False][-1]:.2f} s, weight-major {secs[b, True][-1]:.2f} s",
                flush=True,
            )

    print("\n| batch | nn.Linear s | weight-major s | speed-up (median, range) | same tokens |")
    print("|---:|---:|---:|---|---|")
    for b in sizes:
        ratios = [a / w for a, w in zip(secs[b, False], secs[b, True])]
        print(
            f"| {b} | {statistics.median(secs[b, False]):.2f} | {statistics.median(secs[b, True]):.2f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) | {'yes' if same[b] else 'no'} |"
        )


if __name__ == "__main__":
    main()
