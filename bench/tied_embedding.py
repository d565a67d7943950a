"""A policy's training step with its tied embedding's gradient taken sparse into the LM head's dense one
(cai.runtime.packing.packed_states, `tied_head`) against the embedding module's own dense gradient: same model,
inputs and process, the order rotating between rounds.

    .venv/bin/python bench/tied_embedding.py                  # smollm2-135m-instruct, batch 8
    .venv/bin/python bench/tied_embedding.py --batch-sizes 8,16 --rounds 5

A step is what a PPO epoch does to a fully fine-tuned policy: the packed forward (`PolicyModel`) over the built-in
prompts (through the chat template) each followed by `--response` random tokens, the log-probabilities of the
response at temperature 0.7, and a backward from their mean. Reported per batch size: the median seconds of
`--steps` steps each way, the median and range of the per-round ratios of the dense way to the sparse one (above
1: sparse is faster), and the largest difference between the two ways' gradients relative to the largest
gradient. The figures go into docs/benchmarks.md, section "Tied embedding".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import print_machine, print_ratio_table, rotating_rounds  # noqa: E402

WAYS = ("dense", "sparse")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", default="8")
    ap.add_argument("--response", type=int, default=48, help="response tokens per row, trained")
    ap.add_argument("--steps", type=int, default=2, help="steps timed together, each way and round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch
    from generation import bench_prompts

    from cai.rl import modules
    from cai.rl.modules import PolicyModel
    from cai.runtime import generate as gen
    from cai.runtime.forward import pad
    from cai.runtime.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    policy = PolicyModel(load_model(args.model)).train()
    engine = gen.Engine(policy.lm, tok, gen.Sampling())
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = [engine.encode({"messages": m}) for m in bench_prompts(max(sizes))]
    rows = [p + torch.randint(100, 40000, (args.response,), generator=g).tolist() for p in prompts]
    inputs = {b: pad(rows[:b], tok.pad_token_id) for b in sizes}
    sparse_states = modules.packed_states

    def step(b: int) -> None:
        ids, mask = inputs[b]
        out = policy(ids, mask, args.response, 0.7)
        (-out["logprobs"].sum() / mask[:, -args.response :].sum()).backward()

    def timed(b: int, way: str):
        if way == "dense":
            modules.packed_states = lambda model, packed, tied_head=False: sparse_states(model, packed)
        try:
            policy.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(b)
            return time.perf_counter() - t0, torch.zeros(1)
        finally:
            modules.packed_states = sparse_states

    def grads(way: str):
        timed(sizes[0], way)
        return torch.cat([p.grad.flatten() for p in policy.parameters()])

    print_machine(torch)
    dense, sparse = grads("dense"), grads("sparse")
    diff = float((sparse - dense).abs().max() / dense.abs().max())
    secs, _ = rotating_rounds(WAYS, sizes, args.rounds, timed, WAYS[:1])
    print(f"\ngradients, sparse against dense: largest difference {diff:.1e} of the largest gradient")
    print_ratio_table(sizes, secs, WAYS)


if __name__ == "__main__":
    main()
