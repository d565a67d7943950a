"""A fully fine-tuned policy's training step with one of its packed forward's speed-ups against the way it
replaced: same model, inputs and process, the order rotating between rounds.

    .venv/bin/python bench/policy_step.py --change tied       # the tied embedding's gradient, sparse or dense
    .venv/bin/python bench/policy_step.py --change gather     # packed attention's gathers: index_select or indexing
    .venv/bin/python bench/policy_step.py --change onednn     # the linears' products on oneDNN or MKL
    .venv/bin/python bench/policy_step.py --change onednn --forward-only   # the same, a forward without gradients
    .venv/bin/python bench/policy_step.py --change kernels    # norms and packed attention as one node, or autograd's

`--change tied`: the tied embedding's gradient taken sparse into the LM head's dense one
(cai.runtime.packing.packed_states, `tied_head`) against the embedding module's own dense gradient.
`--change gather`: the packed attention's gathers by `index_select` (backward: index_add_) against advanced
indexing (backward: index_put_ with accumulate).
`--change onednn`: the linears' forward products on oneDNN (cai.runtime.forward.linear_product, what the trainers
take on AMD's CPUs) against `F.linear` (MKL). With `--forward-only` a step is the forward alone, without gradients:
what the reference's and the reward's passes do.
`--change kernels`: the RMSNorms and the packed attention each one autograd node (cai.runtime.kernels) against
transformers' norm and a call per segment through autograd's slices.

A step is what a PPO epoch does to a fully fine-tuned policy: the packed forward (`PolicyModel`) over the built-in
prompts (through the chat template) each followed by `--response` random tokens, the log-probabilities of the
response at temperature 0.7, and a backward from their mean, inside `training_layers` as the trainers run it.
Reported per batch size: the median seconds of `--steps` steps each way, the median and range of the per-round
ratios of the old way to the new one (above 1: the new way is faster), and the largest difference between the two
ways' gradients relative to the largest gradient. The figures go into docs/benchmarks.md, sections "Tied
embedding", "Packed attention's gathers", "Linear products on oneDNN on AMD's CPUs" and "Norms and packed
attention as one autograd node each".
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rounds import int_list, positive_int, print_machine, print_ratio_table, rotating_rounds  # noqa: E402

WAYS = {
    "tied": ("dense", "sparse"),
    "gather": ("indexing", "index_select"),
    "onednn": ("mkl", "onednn"),
    "kernels": ("autograd", "kernels"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--change", choices=sorted(WAYS), default="tied")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-sizes", type=int_list, default="8")
    ap.add_argument("--response", type=int, default=48, help="response tokens per row, trained")
    ap.add_argument("--steps", type=positive_int, default=2, help="steps timed together, each way and round")
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--forward-only", action="store_true", help="time forwards without gradients")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from generation import bench_prompts

    from cai.rl import modules
    from cai.rl.modules import PolicyModel
    from cai.runtime import forward, packing
    from cai.runtime import generate as gen
    from cai.runtime.forward import pad, training_layers
    from cai.runtime.models import load_model, load_tokenizer

    tok = load_tokenizer(args.model)
    policy = PolicyModel(load_model(args.model)).train()
    engine = gen.Engine(policy.lm, tok, gen.Sampling())
    sizes = args.batch_sizes
    g = torch.Generator().manual_seed(0)
    prompts = [engine.encode({"messages": m}) for m in bench_prompts(max(sizes))]
    rows = [p + torch.randint(100, 40000, (args.response,), generator=g).tolist() for p in prompts]
    inputs = {b: pad(rows[:b], tok.pad_token_id) for b in sizes}
    packed_states = modules.packed_states
    ways = WAYS[args.change]

    def step(b: int) -> None:
        ids, mask = inputs[b]
        with training_layers(policy), torch.set_grad_enabled(not args.forward_only):
            out = policy(ids, mask, args.response, 0.7)
        if not args.forward_only:
            (-out["logprobs"].sum() / mask[:, -args.response :].sum()).backward()

    def indexing_select(x, dim, index):
        """Advanced indexing along `dim`: how the packed attention gathered before."""
        return x[(slice(None),) * dim + (index,)]

    def sliced_attention(query, key, value, segments, scale):
        """Each segment's attention through autograd's slices: how the CPU's packed attention ran before."""
        parts = []
        for s, n, above, mask in segments:
            k = torch.cat([key[:, :, a : a + m] for a, m in above] + [key[:, :, s : s + n]], 2)
            v = torch.cat([value[:, :, a : a + m] for a, m in above] + [value[:, :, s : s + n]], 2)
            q = query[:, :, s : s + n]
            o = F.scaled_dot_product_attention(
                q, k, v, mask, scale=scale, is_causal=mask is None, enable_gqa=True
            )
            parts.append(o.transpose(1, 2))
        return torch.cat(parts, 1)

    old_ways = {  # the way replaced: (object, attribute, stand-in), ...
        "dense": [
            (modules, "packed_states", lambda model, packed, tied_head=False: packed_states(model, packed)),
        ],
        "indexing": [(torch.Tensor, "index_select", indexing_select)],
        "mkl": [(forward, "onednn_linears", lambda: False)],
        "autograd": [
            (forward, "fused_norms", lambda model: contextlib.nullcontext()),
            (packing, "segment_attention", sliced_attention),
        ],
    }

    @contextlib.contextmanager
    def old(way: str):
        """A step runs the way `way` inside (the new way: nothing swapped)."""
        if way not in old_ways:
            yield
            return
        swaps = [(owner, name, getattr(owner, name), stand_in) for owner, name, stand_in in old_ways[way]]
        for owner, name, _, stand_in in swaps:
            setattr(owner, name, stand_in)
        try:
            yield
        finally:
            for owner, name, own, _ in swaps:
                setattr(owner, name, own)

    def timed(b: int, way: str):
        with old(way):
            policy.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(b)
            return time.perf_counter() - t0, torch.zeros(1)

    def grads(way: str):
        timed(sizes[0], way)
        return torch.cat([p.grad.flatten() for p in policy.parameters()])

    print_machine(torch)
    if args.change == "onednn" and not forward.onednn_linears():
        forward.ONEDNN["linears"] = True  # on any CPU, so that the two ways differ
    if not args.forward_only:
        before, after = grads(ways[0]), grads(ways[1])
        diff = float((after - before).abs().max() / before.abs().max())
    secs, _ = rotating_rounds(ways, sizes, args.rounds, timed, ways[:1])
    if not args.forward_only:
        print(
            f"\ngradients, {ways[1]} against {ways[0]}: largest difference {diff:.1e} of the largest gradient"
        )
    print_ratio_table(sizes, secs, ways)


if __name__ == "__main__":
    main()
