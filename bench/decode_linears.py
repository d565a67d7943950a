"""HF generation with the linears of `cai.runtime.decode.packed_linears` (decode steps on MKL's packed weights;
oneDNN's packed weights, or weight-major, where MKL's packing is off) against `nn.Linear`'s own forward: same
model, prompts, seeds and process.

    .venv/bin/python bench/decode_linears.py                  # smollm2-135m-instruct, batches 1, 8, 32
    .venv/bin/python bench/decode_linears.py --batch-sizes 8 --rounds 5 --max-new-tokens 48

Each round generates every batch size once each of four ways (`nn.Linear`, weight-major, oneDNN-packed,
MKL-packed; the order rotating between rounds), with the same seed. Reported per batch size: the median seconds
of each way, the median of the per-round ratios of `nn.Linear`'s seconds to each other way's (above 1: faster than
`nn.Linear`), their range, and whether all ways sampled the same tokens. The machine's fp32 matmul and copy
rates (bench/floor.py) are printed first, since the ratios depend on the CPU and its memory bandwidth. The
figures go into docs/benchmarks.md, section "Decode-step linears".
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import decode_args, decode_inputs, print_machine, ratio_cell, rotating_rounds  # noqa: E402

WAYS = ("nn.Linear", "weight-major", "oneDNN", "MKL")


def main() -> None:
    args = decode_args(__doc__.split("\n\n")[0], batch_sizes="1,8,32", threads=True)

    import torch

    from cai.runtime import decode as fwd
    from cai.runtime import generate as gen

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, sampling, sizes, prompts = decode_inputs(args)
    backend = gen.HFBackend(model, tok)
    own = gen.packed_linears

    def timed(batch: list[list[int]], way: str):
        gen.packed_linears = own if way != "nn.Linear" else (lambda m: contextlib.nullcontext())
        fwd._PACKING.update(onednn=way == "oneDNN", mkl=way == "MKL")
        try:
            t0 = time.perf_counter()
            out = backend.generate_ids(batch, sampling, seed=0)
            return time.perf_counter() - t0, out.response_ids
        finally:
            gen.packed_linears = own
            fwd._PACKING.update(onednn=True, mkl=None)

    print_machine(torch)
    timed(prompts[:1], "MKL")  # warm-up
    secs, same = rotating_rounds(WAYS, sizes, args.rounds, lambda b, w: timed(prompts[:b], w), WAYS)

    fast = WAYS[1:]
    print(
        "\n| batch | "
        + " | ".join(f"{w} s" for w in WAYS)
        + " | "
        + " | ".join(f"nn.Linear / {w}" for w in fast)
        + " | same tokens |"
    )
    print("|---:|" + "---:|" * len(WAYS) + "---|" * len(fast) + "---|")
    for b in sizes:
        med = [f"{statistics.median(secs[b, w]):.2f}" for w in WAYS]
        cells = [ratio_cell(secs[b, "nn.Linear"], secs[b, w]) for w in fast]
        print(f"| {b} | " + " | ".join(med + cells) + f" | {'yes' if same[b] else 'no'} |")


if __name__ == "__main__":
    main()
