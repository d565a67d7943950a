"""The log-probabilities of sampled tokens and their gradient, from a batch of logits: cai's selected_logprobs
(cai.runtime.forward) against dividing by the temperature and calling TRL's selective_log_softmax, as the trainer
did before. Same logits, tokens and process, the order rotating between rounds.

    .venv/bin/python bench/logprobs_head.py                    # 8 rows of 48 response positions, vocab 49,152
    .venv/bin/python bench/logprobs_head.py --batch-sizes 8,32 --rounds 7

A step is the forward and backward of one PPO epoch's policy term at the LM head: log π(token) at temperature 0.7
of every response position, and the gradient of their weighted sum with respect to the logits. Reported per batch
size: the median seconds of `--steps` steps each way, the median and range of the per-round ratios (above 1: cai's
way is faster), and the largest difference between the two ways' values and gradients. The figures go into
docs/benchmarks.md, section "Log-probabilities at the LM head".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import int_list, positive_int, print_machine, ratio_cell, rotating_rounds  # noqa: E402

WAYS = ("divide + TRL selective_log_softmax", "selected_logprobs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int_list, default="8")
    ap.add_argument("--response", type=int, default=48, help="response positions per row")
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--steps", type=positive_int, default=10, help="steps timed together, each way and round")
    ap.add_argument("--rounds", type=positive_int, default=5)
    args = ap.parse_args()

    import torch
    from trl.trainer.utils import selective_log_softmax

    from cai.runtime.forward import selected_logprobs

    sizes = args.batch_sizes
    g = torch.Generator().manual_seed(0)
    data = {
        b: (
            (4 * torch.randn(b, args.response, args.vocab, generator=g)).requires_grad_(True),
            torch.randint(0, args.vocab, (b, args.response), generator=g),
            torch.randn(b, args.response, generator=g),
        )
        for b in sizes
    }
    T = args.temperature

    def step(b: int, way: str):
        logits, tokens, weight = data[b]
        logits.grad = None
        if way == "selected_logprobs":
            logp = selected_logprobs(logits, tokens, T)
        else:
            logp = selective_log_softmax(logits / T, tokens)
        (logp * weight).sum().backward()
        return logp.detach(), logits.grad

    def timed(b: int, way: str):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(b, way)
        return time.perf_counter() - t0, torch.zeros(1)

    print_machine(torch)
    b = sizes[-1]
    (v0, g0), (v1, g1) = (tuple(t.clone() for t in step(b, w)) for w in WAYS)
    dv, dg = float((v1 - v0).abs().max()), float((g1 - g0).abs().max() / g0.abs().max())
    secs, _ = rotating_rounds(WAYS, sizes, args.rounds, timed, WAYS[:1])

    print(
        f"\nbatch {b}: largest difference in log-probabilities {dv:.1e}, in gradients {dg:.1e} of the largest "
        "gradient"
    )
    print("\n| batch | positions | TRL way s | selected_logprobs s | TRL way / ours (median, range) |")
    print("|---:|---:|---:|---:|---|")
    for b in sizes:
        med = {w: statistics.median(secs[b, w]) for w in WAYS}
        print(
            f"| {b} | {b * args.response} | {med[WAYS[0]] / args.steps:.3f} | {med[WAYS[1]] / args.steps:.3f} | "
            f"{ratio_cell(secs[b, WAYS[0]], secs[b, WAYS[1]])} |"
        )


if __name__ == "__main__":
    main()
