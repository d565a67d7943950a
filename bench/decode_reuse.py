"""Generation that reuses work across the rows or batches of a call, against the way that repeats it: same model,
prompts, seeds and process, the order rotating between rounds.

    .venv/bin/python bench/decode_reuse.py --change prefix                      # batches 8 and 32
    .venv/bin/python bench/decode_reuse.py --change prefix --max-new-tokens 1   # the prefill alone
    .venv/bin/python bench/decode_reuse.py --change held --batch-sizes 8        # a 32-prompt run in batches of 8

`--change prefix`: `HFBackend.generate_ids` with the beginning every prompt of a batch shares computed once
(cai.runtime.decode.shared_prefix_inputs) against the left-padded batch that computes it in every row. The prompts
are the built-in red-team and helpful ones through the chat template, whose system prompt is the shared
beginning. Extra columns: the token positions each way's prefill computes.
`--change held`: `Engine.run` over `--prompts` prompts with each linear's packed decode weight made once for the
run against once per batch (the backend wrapped so that the engine does not hold them).

Reported per batch size: the median seconds of each way, the median and range of the per-round ratios (above 1:
the reuse is faster), and whether both ways sampled the same tokens. The figures go into docs/benchmarks.md,
sections "Shared prompt prefix in generation" and "Decode weights held for a run".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import decode_args, decode_inputs, positive_int, print_machine, print_ratio_table, rotating_rounds  # noqa: E402

WAYS = {"prefix": ("left-padded", "shared prefix"), "held": ("per batch", "held for the run")}


class PerBatch:
    """A backend the engine does not recognise as HF, so each batch packs its own decode weights."""

    def __init__(self, backend):
        self.backend = backend

    def generate_ids(self, prompts, sampling, seed):
        return self.backend.generate_ids(prompts, sampling, seed)


def main() -> None:
    args = decode_args(
        __doc__.split("\n\n")[0],
        extra=lambda ap: (
            ap.add_argument("--change", choices=sorted(WAYS), default="prefix"),
            ap.add_argument(
                "--prompts", type=positive_int, default=32, help="--change held: prompts per run"
            ),
        ),
    )

    import torch

    from cai.runtime import generate as gen
    from cai.runtime.packing import common_prefix

    ways = WAYS[args.change]
    if args.change == "held":
        args.batch_sizes = [*args.batch_sizes, args.prompts]  # decode_inputs loads the largest as prompts
    model, tok, sampling, sizes, prompts = decode_inputs(args)
    if args.change == "held":
        sizes = sizes[:-1]
    backend = gen.HFBackend(model, tok)

    def shared(b: int, way: str):
        gen.SHARE_PREFIX = way == "shared prefix"
        try:
            t0 = time.perf_counter()
            out = backend.generate_ids(prompts[:b], sampling, seed=0)
            return time.perf_counter() - t0, out.response_ids
        finally:
            gen.SHARE_PREFIX = True

    def held(b: int, way: str):
        engine = gen.Engine(model, tok, sampling, batch_size=b)
        if way == "per batch":
            engine.backend = PerBatch(engine.backend)
        requests = [{"id": str(i), "text": tok.decode(p)} for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        rows = engine.run(requests, show=False)
        return time.perf_counter() - t0, torch.tensor([hash(r["text"]) for r in rows])

    def positions(b: int) -> str:
        batch = prompts[:b]
        n, width = common_prefix(batch), max(len(p) for p in batch)
        return f"{n} shared; {b * width} → {n + b * (width - n)}"

    timed = shared if args.change == "prefix" else held
    print_machine(torch)
    timed(sizes[0], ways[1])  # warm-up
    secs, same = rotating_rounds(ways, sizes, args.rounds, timed, ways)
    extra = {"prefill positions": positions} if args.change == "prefix" else {}
    extra["same tokens"] = lambda b: "yes" if same[b] else "no"
    print_ratio_table(sizes, secs, ways, extra)


if __name__ == "__main__":
    main()
