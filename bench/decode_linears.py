"""HF generation with the linears of `cai.runtime.forward.packed_linears` (oneDNN's packed weights, or
weight-major where packing is off) against `nn.Linear`'s own forward: same model, prompts, seeds and process.

    .venv/bin/python bench/decode_linears.py                  # smollm2-135m-instruct, batches 1, 8, 32
    .venv/bin/python bench/decode_linears.py --batch-sizes 8 --rounds 5 --max-new-tokens 48

Each round generates every batch size once each of three ways (`nn.Linear`, weight-major, packed; the order
rotating between rounds), with the same seed. Reported per batch size: the median seconds of each way, the
median of the per-round ratios of `nn.Linear`'s seconds to each other way's (above 1: faster than
`nn.Linear`), their range, and whether all ways sampled the same tokens. The machine's fp32 matmul and copy
rates (bench/floor.py) are printed first, since the ratios depend on the CPU and its memory bandwidth. The
figures go into docs/benchmarks.md, section "Decode-step linears".
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

WAYS = ("nn.Linear", "weight-major", "packed")


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

    from cai.runtime import forward as fwd
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
    own = gen.packed_linears

    def timed(batch: list[list[int]], way: str):
        gen.packed_linears = own if way != "nn.Linear" else (lambda m: contextlib.nullcontext())
        fwd._PACKING["ok"] = way == "packed"
        try:
            t0 = time.perf_counter()
            out = backend.generate_ids(batch, sampling, seed=0)
            return time.perf_counter() - t0, out.response_ids
        finally:
            gen.packed_linears, fwd._PACKING["ok"] = own, True

    print_machine(torch)
    timed(prompts[:1], "packed")  # warm-up
    secs, same = rotating_rounds(WAYS, sizes, args.rounds, lambda b, w: timed(prompts[:b], w), WAYS)

    print(
        "\n| batch | nn.Linear s | weight-major s | packed s | nn.Linear / weight-major | nn.Linear / packed | same tokens |"
    )
    print("|---:|---:|---:|---:|---|---|---|")
    for b in sizes:
        med = {w: statistics.median(secs[b, w]) for w in WAYS}
        cells = []
        for w in ("weight-major", "packed"):
            ratios = [a / o for a, o in zip(secs[b, "nn.Linear"], secs[b, w])]
            cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")
        print(
            f"| {b} | {med['nn.Linear']:.2f} | {med['weight-major']:.2f} | {med['packed']:.2f} | "
            f"{cells[0]} | {cells[1]} | {'yes' if same[b] else 'no'} |"
        )


if __name__ == "__main__":
    main()
