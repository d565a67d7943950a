"""HF generation with the beginning every prompt of a batch shares computed once
(cai.runtime.decode.shared_prefix_inputs) against the left-padded batch that computes it in every row: same
model, prompts, seeds and process, the order rotating between rounds.

    .venv/bin/python bench/shared_prefix.py                      # smollm2-135m-instruct, batches 8 and 32
    .venv/bin/python bench/shared_prefix.py --max-new-tokens 1   # the prefill alone

The prompts are the built-in red-team and helpful ones through the chat template, whose system prompt is the
shared beginning. Reported per batch size: the median seconds of each way, the median and range of the per-round
ratios (above 1: sharing is faster), the token positions each way's prefill computes, and whether both ways
sampled the same tokens. The figures go into docs/benchmarks.md, section "Shared prompt prefix in generation".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import decode_args, decode_inputs, print_machine, print_ratio_table, rotating_rounds  # noqa: E402

WAYS = ("left-padded", "shared prefix")


def main() -> None:
    args = decode_args(__doc__.split("\n\n")[0])

    import torch

    from cai.runtime import generate as gen
    from cai.runtime.packing import common_prefix

    model, tok, sampling, sizes, prompts = decode_inputs(args)
    backend = gen.HFBackend(model, tok)

    def timed(b: int, way: str):
        gen.SHARE_PREFIX = way == "shared prefix"
        try:
            t0 = time.perf_counter()
            out = backend.generate_ids(prompts[:b], sampling, seed=0)
            return time.perf_counter() - t0, out.response_ids
        finally:
            gen.SHARE_PREFIX = True

    def positions(b: int) -> str:
        batch = prompts[:b]
        n, width = common_prefix(batch), max(len(p) for p in batch)
        return f"{n} shared; {b * width} → {n + b * (width - n)}"

    print_machine(torch)
    timed(2, "shared prefix")  # warm-up
    secs, same = rotating_rounds(WAYS, sizes, args.rounds, timed, WAYS)
    print_ratio_table(
        sizes,
        secs,
        WAYS,
        {"prefill positions": positions, "same tokens": lambda b: "yes" if same[b] else "no"},
    )


if __name__ == "__main__":
    main()
