"""Training steps of a LoRA policy with its adapted linears fused (cai.runtime.forward.fused_lora_linears) against
peft's own forward and backward: same model, inputs and process, the order rotating between rounds.

    .venv/bin/python bench/lora_train.py                      # smollm2-135m-instruct, batch 8 of 82 tokens
    .venv/bin/python bench/lora_train.py --batch-sizes 8,16 --rounds 5

A step is what a PPO epoch does to the policy: a forward over the batch with gradients, the log-softmax of the
last `--response` positions at temperature 0.7, and a backward from their mean. The adapters are the recipes'
default (rank 16, alpha 32, every linear but the LM head) with B drawn at random, as after training. Reported per
batch size: the median seconds of `--steps` steps each way, the median and range of the per-round ratios of
peft's to the fused way (above 1: fused is faster), the peak memory each way added over the model, and the
largest difference between the two ways' adapter gradients relative to the largest gradient. The figures go into
docs/benchmarks.md, section "LoRA training".
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import int_list, positive_int, print_machine, print_ratio_table, rotating_rounds  # noqa: E402

WAYS = ("peft forward", "fused")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", type=int_list, default="8")
    ap.add_argument("--tokens", type=int, default=82, help="tokens per row (prompt and response)")
    ap.add_argument("--response", type=int, default=48, help="positions whose log-probabilities are trained")
    ap.add_argument("--steps", type=positive_int, default=3, help="steps timed together, each way and round")
    ap.add_argument("--rounds", type=positive_int, default=5)
    args = ap.parse_args()

    import torch

    from cai.config.fields import LoraConfig
    from cai.runtime.forward import fused_lora_linears
    from cai.runtime.models import load_model, wrap_lora

    torch.manual_seed(0)
    model = wrap_lora(load_model(args.model), LoraConfig())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    sizes = args.batch_sizes
    vocab = model.get_input_embeddings().weight.shape[0]
    inputs = {
        b: torch.randint(0, vocab, (b, args.tokens), generator=torch.Generator().manual_seed(b))
        for b in sizes
    }

    def step(ids):
        logits = model(input_ids=ids).logits[:, -args.response - 1 : -1].float() / 0.7
        logp = logits.log_softmax(-1).gather(-1, ids[:, -args.response :, None])
        (-logp.mean()).backward()

    def grads():
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])

    def timed(b: int, way: str):
        ctx = fused_lora_linears(model) if way == "fused" else contextlib.nullcontext()
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with ctx:
            for _ in range(args.steps):
                step(inputs[b])
        return time.perf_counter() - t0, torch.zeros(1)

    print_machine(torch)
    # the gradients of one step each way, and the peak memory of each way (the fused one first: the peak of a
    # process only rises)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks, got = {}, {}
    for way in reversed(WAYS):
        timed(sizes[-1], way)
        got[way] = grads()
        peaks[way] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    diff = float((got["fused"] - got["peft forward"]).abs().max() / got["peft forward"].abs().max())
    secs, _ = rotating_rounds(WAYS, sizes, args.rounds, timed, WAYS[:1])

    peft_peak = (
        f"{peaks['peft forward']:.0f} MB"
        if peaks["peft forward"] > peaks["fused"]
        else "no more than fused (the process's peak did not rise)"
    )
    print(
        f"\nadapter gradients, fused against peft: largest difference {diff:.1e} of the largest gradient; "
        f"peak memory added at batch {sizes[-1]}: fused {peaks['fused']:.0f} MB, peft {peft_peak}"
    )
    print_ratio_table(sizes, secs, WAYS)


if __name__ == "__main__":
    main()
