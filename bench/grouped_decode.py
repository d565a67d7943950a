"""HF generation with grouped keys and values read in place (cai.runtime.decode.grouped_kv_attention) against
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

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import decode_args, decode_inputs, print_machine, print_ratio_table, rotating_rounds  # noqa: E402

WAYS = ("repeated keys", "grouped keys")


def main() -> None:
    args = decode_args(__doc__.split("\n\n")[0])

    import torch

    from cai.runtime import generate as gen

    model, tok, sampling, sizes, prompts = decode_inputs(args)
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

    print_ratio_table(sizes, secs, WAYS, {"same tokens": lambda b: "yes" if same[b] else "no"})


if __name__ == "__main__":
    main()
