"""The compute floor the PPO benchmark reports (bench/floor.py): its FLOP count is the one torch counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from floor import decoder_shapes, floor_seconds, head_flops, linear_weights, trunk_flops, update_work  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attn_implementation="eager",  # attention as matmuls, so that torch counts them
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), decoder_shapes(cfg.to_dict())


def counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_forward_flops_are_torchs_count(llama):
    model, s = llama
    L = 10
    ids = torch.randint(0, 300, (1, L))
    trunk = counted(lambda: model.model(input_ids=ids))
    # torch counts the eager attention's full square; the floor counts the causal triangle it needs
    square = 4 * s["layers"] * s["heads"] * s["head_dim"] * L * L
    assert trunk - square == 2 * linear_weights(s) * L
    assert trunk_flops(s, L) - 2 * linear_weights(s) * L == square * (L + 1) / (2 * L)
    with_head = counted(lambda: model(input_ids=ids, logits_to_keep=4))
    assert with_head - trunk == head_flops(s, 4)


def test_a_backward_is_twice_its_forward_and_the_update_adds_up(llama):
    model, s = llama
    ids = torch.randint(0, 300, (1, 10))
    forward = counted(lambda: model(input_ids=ids))
    assert counted(lambda: model(input_ids=ids).logits.sum().backward()) == 3 * forward
    full = update_work(s, [6, 4], response_length=5, epochs=4)
    lora = update_work(s, [6, 4], response_length=5, epochs=4, lora=True)
    assert full["train"] == pytest.approx(1.5 * lora["train"]) and full["ref"] == lora["ref"]
    assert full["flops"] == pytest.approx(
        sum(full[k] for k in ("prefill", "ref", "value", "reward", "train"))
    )
    rates = {"matmul_flops": 1e9, "copy_bytes": 1e12}  # decoding bound by its matmuls here
    assert floor_seconds(full, rates) == pytest.approx((full["flops"] + full["decode_flops"]) / 1e9)
