"""The compute floor of a PPO update: the matrix work it cannot avoid, and the machine's rates measured now.

`update_work` counts, from a decoder's shapes and the token counts, the floating-point operations of one PPO
update with a separate critic (policy and critic forward and backward for every epoch, the LM head on the
response positions only; the reference, value and reward forwards; the prompts' prefill) and the bytes decoding
must stream (every weight once per generated token). `machine_rates` measures, in the running process, the
fp32 matmul rate (a 2048² matmul loop) and the memory copy rate. The floor in seconds is work / rates; a
trainer's share of the floor is floor / its seconds per update (1.0 = nothing but unavoidable work).

Counted per token of a forward: 2 × the linear layers' weights (attention projections and MLP) plus the
attention products (2 × 2 × heads × head_dim × the positions attended). A backward is counted as twice its
forward. Prefix sharing between rows is not credited: the floor is that of the settings, not of one trainer.
"""

from __future__ import annotations

import time

BYTES_FP32 = 4


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


def linear_weights(s: dict) -> int:
    """Weights of the trunk's matrices (q, k, v, o and a gated MLP) over all layers; not the embeddings."""
    q_o = 2 * s["d"] * s["heads"] * s["head_dim"]
    k_v = 2 * s["d"] * s["kv_heads"] * s["head_dim"]
    mlp = 3 * s["d"] * s["ffn"]
    return s["layers"] * (q_o + k_v + mlp)


def trunk_flops(s: dict, length: int) -> float:
    """Forward FLOPs of the trunk over one sequence of `length` tokens (causal attention)."""
    per_token = 2 * linear_weights(s)
    attended = length * (length + 1) / 2  # position t attends to t + 1 positions
    attention = 4 * s["layers"] * s["heads"] * s["head_dim"] * attended
    return per_token * length + attention


def head_flops(s: dict, positions: int) -> float:
    """Forward FLOPs of the LM head on `positions` positions."""
    return 2 * s["d"] * s["vocab"] * positions


def update_work(
    s: dict, prompt_lens: list[int], response_length: int, epochs: int, lora: bool = False
) -> dict:
    """FLOPs by phase of one PPO update (every response at full length), and decoding's FLOPs and the bytes
    it streams. With `lora` (frozen base weights, small adapters), a backward computes the activations'
    gradients only: once its forward."""
    full = sum(trunk_flops(s, p + response_length) for p in prompt_lens)
    head = head_flops(s, response_length * len(prompt_lens))
    work = {
        "prefill": sum(trunk_flops(s, p) for p in prompt_lens),
        "ref": full + head,
        "value": full,
        "reward": full,
        # policy and critic, forward + backward (2 × forward; 1 × with LoRA)
        "train": epochs * (2 if lora else 3) * ((full + head) + full),
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
