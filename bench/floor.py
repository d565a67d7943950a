"""The compute floor of a PPO update: the matrix work it cannot avoid, and the machine's rates measured now.

`update_work` counts, from a decoder's shapes and the token counts, the floating-point operations of one PPO
update with a separate critic (policy and critic forward and backward for every epoch, the LM head on the
response positions only; the reference, value and reward forwards; the prompts' prefill) and the bytes decoding
must stream (every weight once per generated token). `machine_rates` measures, in the running process, the
fp32 matmul rate (a 2048² matmul loop) and the memory copy rate. The floor in seconds is work / rates; a
trainer's share of the floor is floor / its seconds per update (1.0 = nothing but unavoidable work).

Counted per token of a forward: 2 × the linear layers' weights (attention projections and MLP) plus the
attention products (2 × 2 × heads × head_dim × the positions attended). A full fine-tune's backward is twice its
forward. With LoRA (`lora_r`: frozen base weights, an adapter of rank r on every linear of the trunk, as cai's
default "all-linear") a backward takes the base linears' and the LM head's input gradients only (1 × their
forward), attention's backward stays 2 × its forward, and the adapters' own products (x·A, then ·B) are counted
3 × (forward, input gradient, weight gradient); the reference (adapters off), the prefill and decoding (adapters
merged) and the reward model have none.

The settings' floor (the defaults: `shared_prefix=0`, `rollout_value=True`) is that of the work any trainer of
these settings does on a padded batch. A trainer's own floor may take two savings: `shared_prefix`, the tokens
every prompt of the batch begins with (a chat template's opening), computed once per trunk pass by a packed
forward (cai.runtime.packing, and generation's prefill: cai.runtime.decode.shared_prefix_inputs), so (B − 1) ×
that prefix's positions, their linears and their attention among themselves, drop out of every trunk pass; and
`rollout_value=False`, where the rollout's critic forward is the critic's training forward of epoch 0 (cai's
trainer at one minibatch on one process), not a forward of its own; and `last_token=False`, where the training,
reference and value passes leave out each row's last token, whose state nothing reads (log-probabilities and
values are read one position before the token: cai.rl.modules.response_states). The reward reads it.
"""

from __future__ import annotations

import time

BYTES_FP32 = 4
# the trunk's linears of a Llama-style layer, each targeted by LoRA's "all-linear"
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def decoder_shapes(config: dict) -> dict:
    """The shapes the count needs, from a Llama-style config.json (hidden size, MLP width, layers, heads,
    key-value heads, head dim, vocabulary)."""
    d = config["hidden_size"]
    heads = config["num_attention_heads"]
    return {
        "d": d,
        "ffn": config["intermediate_size"],
        "layers": config["num_hidden_layers"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or d // heads,
        "vocab": config["vocab_size"],
    }


def linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """(in features, out features) of each linear of one layer."""
    d, q, kv = s["d"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, s["ffn"]), "up": (d, s["ffn"]),
            "down": (s["ffn"], d)}  # fmt: skip


def linear_weights(s: dict) -> int:
    """Weights of the trunk's matrices (q, k, v, o and a gated MLP) over all layers; not the embeddings."""
    return s["layers"] * sum(i * o for i, o in linear_shapes(s).values())


def adapter_weights(s: dict, r: int, targets=LINEARS) -> int:
    """Weights of rank-r LoRA adapters (A: in × r, B: r × out) on the `targets` linears of every layer."""
    return s["layers"] * sum(r * (i + o) for name, (i, o) in linear_shapes(s).items() if name in targets)


def attention_flops(s: dict, length: int) -> float:
    """Forward FLOPs of the attention products (QKᵀ and AV) over one sequence of `length` tokens (causal)."""
    attended = length * (length + 1) / 2  # position t attends to t + 1 positions
    return 4 * s["layers"] * s["heads"] * s["head_dim"] * attended


def trunk_flops(s: dict, length: int) -> float:
    """Forward FLOPs of the trunk over one sequence of `length` tokens (causal attention)."""
    return 2 * linear_weights(s) * length + attention_flops(s, length)


def head_flops(s: dict, positions: int) -> float:
    """Forward FLOPs of the LM head on `positions` positions."""
    return 2 * s["d"] * s["vocab"] * positions


def trunk_pass(s: dict, lengths: list[int], shared_prefix: int = 0) -> tuple[float, float, int]:
    """(linear FLOPs, attention FLOPs, positions) of one forward of the trunk over sequences of `lengths` whose
    first `shared_prefix` tokens are the same and computed once: the other rows' copies of the prefix, and
    their attention among themselves, drop out (later tokens still attend to the prefix)."""
    repeats = (len(lengths) - 1) * shared_prefix if len(lengths) > 1 else 0
    positions = sum(lengths) - repeats
    attention = sum(attention_flops(s, n) for n in lengths)
    if repeats:
        attention -= (len(lengths) - 1) * attention_flops(s, shared_prefix)
    return 2 * linear_weights(s) * positions, attention, positions


def update_work(
    s: dict,
    prompt_lens: list[int],
    response_length: int,
    epochs: int,
    lora_r: int = 0,
    shared_prefix: int = 0,
    rollout_value: bool = True,
    critic: bool = True,
    last_token: bool = True,
) -> dict:
    """FLOPs by phase of one PPO update (every response at full length), and decoding's FLOPs and the bytes
    it streams. `lora_r`: LoRA adapters of that rank on every trunk linear of policy and critic (0: a full
    fine-tune). `shared_prefix`: the tokens every prompt begins with, computed once per trunk pass.
    `rollout_value`: whether the rollout's critic forward is a forward of its own (else epoch 0's is reused).
    `critic`: a separate critic model; without it the values come from a head on the policy's trunk, whose
    training passes then carry both losses (no second trunk). `last_token`: whether the passes that read the
    states before each token (training, reference, value) compute each row's last token too."""
    lens = [p + response_length for p in prompt_lens]
    reward = sum(trunk_pass(s, lens, shared_prefix)[:2])
    lens = lens if last_token else [n - 1 for n in lens]
    linear, attention, positions = trunk_pass(s, lens, shared_prefix)
    full = linear + attention
    head = head_flops(s, response_length * len(prompt_lens))
    adapters = 2 * adapter_weights(s, lora_r) * positions if lora_r else 0  # one forward of them
    trunks = 1 if critic else 0  # the critic's own trunk passes, beside the policy's
    if lora_r:  # input gradients of the frozen linears and head, attention's backward 2×, adapters 3×
        one = 2 * linear + 3 * attention + 3 * adapters
        train = epochs * ((one + 2 * head) + trunks * one)
    else:  # policy and critic, forward + backward (2 × forward)
        train = epochs * 3 * ((full + head) + trunks * full)
    work = {
        "prefill": sum(trunk_pass(s, prompt_lens, shared_prefix)[:2]),
        "ref": full + head,
        "value": full + adapters if rollout_value else 0.0,
        "reward": reward,
        "train": train,
    }
    weights = linear_weights(s) + s["d"] * s["vocab"]
    work["flops"] = sum(work.values())
    work["decode_flops"] = response_length * 2 * weights * len(prompt_lens)
    work["decode_bytes"] = response_length * weights * BYTES_FP32
    return work


def machine_rates(seconds: float = 2.0, n: int = 2048) -> dict:
    """fp32 matmul FLOP/s (the best of short runs of an n × n matmul loop) and copy bytes/s (a 256 MiB
    tensor), measured now in this process."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    src = torch.empty(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    copy = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy = max(copy, 2 * src.numel() * BYTES_FP32 / (time.perf_counter() - t0))  # read + write
    return {"matmul_flops": best, "copy_bytes": copy}


def floor_seconds(work: dict, rates: dict) -> float:
    """Seconds of an update at the measured rates: its FLOPs at the matmul rate plus decoding, the slower of its
    matmuls and its weight streaming at the copy rate."""
    decode = max(work["decode_flops"] / rates["matmul_flops"], work["decode_bytes"] / rates["copy_bytes"])
    return work["flops"] / rates["matmul_flops"] + decode


if __name__ == "__main__":
    import sys

    sys.stderr.write(
        "bench/floor.py is a module of the benchmarks (bench/ppo_vs_trl.py imports it), not a script\n"
    )
    sys.exit(2)
