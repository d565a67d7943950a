"""HF generation from a LoRA policy with its adapters folded into the linears' weights while generating
(cai.runtime.decode.merged_lora_linears) against peft's own forward, with the same model without adapters as the
floor: same prompts, seeds and process, the order rotating between rounds.

    .venv/bin/python bench/lora_decode.py                     # smollm2-135m-instruct, batches 8 and 32
    .venv/bin/python bench/lora_decode.py --batch-sizes 8 --rounds 5

The adapters are the recipes' default (rank 16, alpha 32, every linear but the LM head) with B drawn at random,
as after training, so that the adapted model samples other tokens than the base. Reported per batch size: the
median seconds of each way, the median of the per-round ratios of peft's forward to the merged one (above 1: the
merged decode is faster) and of the merged one to the model without adapters (1: LoRA costs nothing at
generation), their ranges, and whether peft's and the merged forward sampled the same tokens. The figures go into
docs/benchmarks.md, section "LoRA generation".
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import decode_args, decode_inputs, print_machine, ratio_cell, rotating_rounds  # noqa: E402

WAYS = ("no adapters", "peft forward", "merged")


def main() -> None:
    args = decode_args(__doc__.split("\n\n")[0])

    import torch

    from cai.config.fields import LoraConfig
    from cai.runtime import generate as gen
    from cai.runtime.models import load_for_inference, wrap_lora

    model, tok, sampling, sizes, prompts = decode_inputs(args)
    plain = gen.HFBackend(model, tok)
    torch.manual_seed(0)
    lora = wrap_lora(load_for_inference(args.model)[0], LoraConfig())
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    adapted = gen.HFBackend(lora, tok)
    own = gen.merged_lora_linears

    def timed(batch: list[list[int]], way: str):
        gen.merged_lora_linears = own if way == "merged" else (lambda m: contextlib.nullcontext())
        try:
            t0 = time.perf_counter()
            out = (plain if way == "no adapters" else adapted).generate_ids(batch, sampling, seed=0)
            return time.perf_counter() - t0, out.response_ids
        finally:
            gen.merged_lora_linears = own

    print_machine(torch)
    timed(prompts[:2], "merged")  # warm-up
    secs, same = rotating_rounds(
        WAYS, sizes, args.rounds, lambda b, w: timed(prompts[:b], w), ("peft forward", "merged")
    )

    print(
        "\n| batch | no adapters s | peft forward s | merged s | peft / merged (median, range) "
        "| merged / no adapters | same tokens |"
    )
    print("|---:|---:|---:|---:|---|---|---|")
    for b in sizes:
        med = {w: statistics.median(secs[b, w]) for w in WAYS}
        print(
            f"| {b} | {med['no adapters']:.2f} | {med['peft forward']:.2f} | {med['merged']:.2f} | "
            f"{ratio_cell(secs[b, 'peft forward'], secs[b, 'merged'])} | "
            f"{ratio_cell(secs[b, 'merged'], secs[b, 'no adapters'])} | {'yes' if same[b] else 'no'} |"
        )


if __name__ == "__main__":
    main()
