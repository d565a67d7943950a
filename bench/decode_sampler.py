"""HF generation drawing each token with cai.runtime.decode's inverse-transform sampler against transformers' own
sampling (`do_sample`, `torch.multinomial`): same prompts, seeds and process, the order rotating between rounds.

    .venv/bin/python bench/decode_sampler.py                  # smollm2-135m-instruct, batches 8 and 32
    .venv/bin/python bench/decode_sampler.py --batch-sizes 8 --rounds 5

Reported per batch size: the median seconds of each way, the median of the per-round ratios of transformers' way
to ours (above 1: ours is faster) with their range, and the seconds per decode step that the draw itself took in
each way, timed alone on logits of the model's vocabulary. The two ways sample the same distribution with other
random numbers, so their tokens differ. The figures go into docs/benchmarks.md, section "Decode step".
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import decode_args, decode_inputs, print_machine, print_ratio_table, rotating_rounds  # noqa: E402

WAYS = ("multinomial", "inverse transform")


def draw_seconds(batch: int, vocab: int, steps: int = 50) -> dict:
    """Seconds per draw of one token per row from [batch, vocab] logits at temperature 0.7, each way."""
    import torch

    from cai.runtime.decode import InverseTransformSampler

    logits = torch.randn(batch, vocab) * 3
    ours = InverseTransformSampler()
    ways = {
        "multinomial": lambda: torch.multinomial(torch.softmax(logits / 0.7, -1), 1),
        "inverse transform": lambda: ours(None, logits / 0.7).argmax(-1),
    }
    out = {}
    for way, draw in ways.items():
        draw()
        t0 = time.perf_counter()
        for _ in range(steps):
            draw()
        out[way] = (time.perf_counter() - t0) / steps
    return out


def main() -> None:
    args = decode_args(__doc__.split("\n\n")[0])

    import torch

    from cai.runtime import generate as gen

    model, tok, sampling, sizes, prompts = decode_inputs(args)
    backend = gen.HFBackend(model, tok)
    own_processors, own_config = gen.sampling_processors, gen.generation_config

    def transformers_config(s, tokenizer, with_logits=False):
        config = own_config(s, tokenizer, with_logits)
        config.do_sample, config.temperature = True, s.temperature
        return config

    def timed(batch: list[list[int]], way: str):
        if way == "multinomial":
            gen.sampling_processors, gen.generation_config = (lambda s: None), transformers_config
        try:
            t0 = time.perf_counter()
            out = backend.generate_ids(batch, sampling, seed=0)
            return time.perf_counter() - t0, out.response_ids
        finally:
            gen.sampling_processors, gen.generation_config = own_processors, own_config

    print_machine(torch)
    timed(prompts[:2], "inverse transform")  # warm-up
    secs, _ = rotating_rounds(WAYS, sizes, args.rounds, lambda b, w: timed(prompts[:b], w), WAYS[:1])

    vocab = model.get_output_embeddings().weight.shape[0]

    def draw_cell(b: int) -> str:
        draw = draw_seconds(b, vocab)
        return f"{draw['multinomial'] * 1e3:.1f} against {draw['inverse transform'] * 1e3:.1f}"

    print_ratio_table(sizes, secs, WAYS, {"draw ms": draw_cell})


if __name__ == "__main__":
    main()
