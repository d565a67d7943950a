"""The PPO trainer's gradient clip (cai.rl.engine.clip_gradients) against torch's `clip_grad_norm_`: the
gradients of two fully fine-tuned models (policy and critic, as at the PPO benchmark's equal settings), the
order rotating between rounds.

    .venv/bin/python bench/grad_clip.py [--model smollm2-135m-instruct] [--rounds 5]

Two cases: gradients under the limit (nothing clipped: torch still multiplies every gradient by 1, ours only
reads them for the norm) and over it (both scale). Reported per case: the median milliseconds of `--steps` clips
each way, the median and range of the per-round ratios (above 1: ours is faster), and whether the clipped
gradients are equal. The figures go into docs/benchmarks.md, section "Gradient clipping".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import positive_int, print_machine, ratio_cell  # noqa: E402

WAYS = ("torch", "ours")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=positive_int, default=5, help="clips timed together, each way and round")
    ap.add_argument("--rounds", type=positive_int, default=5)
    args = ap.parse_args()

    import torch

    from cai.rl.engine import clip_gradients
    from cai.runtime.models import load_model

    params = [p for _ in range(2) for p in load_model(args.model).parameters()]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in grads])))
    cases = {"under the limit": 0.5 / norm, "over the limit": 4.0 / norm}  # gradient norm 0.5 or 4, limit 1
    clip = {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "ours": lambda: clip_gradients(params, 1.0),
    }

    def timed(scale: float, way: str) -> tuple[float, list]:
        secs = 0.0
        for _ in range(args.steps):
            for p, t in zip(params, grads):
                p.grad = t * scale
            t0 = time.perf_counter()
            clip[way]()
            secs += time.perf_counter() - t0
        return secs, [p.grad for p in params]

    print_machine(torch)
    secs = {(c, w): [] for c in cases for w in WAYS}
    same = dict.fromkeys(cases, True)
    for r in range(args.rounds):
        for c, scale in cases.items():
            got = {}
            for w in WAYS[r % 2 :] + WAYS[: r % 2]:
                s, got[w] = timed(scale, w)
                secs[c, w].append(s / args.steps)
            same[c] &= all(torch.equal(a, b) for a, b in zip(got["torch"], got["ours"]))
            print(
                f"round {r + 1} {c}: " + ", ".join(f"{w} {secs[c, w][-1] * 1e3:.0f} ms" for w in WAYS),
                flush=True,
            )
    print("\n| gradients | torch ms | ours ms | torch / ours (median, range) | same gradients |")
    print("|---|---:|---:|---|---|")
    for c in cases:
        med = [statistics.median(secs[c, w]) * 1e3 for w in WAYS]
        cell = ratio_cell(secs[c, "torch"], secs[c, "ours"])
        print(f"| {c} | {med[0]:.0f} | {med[1]:.0f} | {cell} | {'yes' if same[c] else 'no'} |")


if __name__ == "__main__":
    main()
