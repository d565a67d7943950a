"""The decode step reads grouped keys and values in place: no copies per query head, the same logits."""

from __future__ import annotations

import pytest

from cai.runtime.packing import grouped_kv_attention


def test_grouped_kv_attention_repeats_no_keys_and_gives_the_same_logits(tiny, monkeypatch):
    import torch
    from transformers.integrations import sdpa_attention

    model, tok = tiny
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the tiny model groups heads
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding: attention runs with a mask
    with torch.no_grad():
        repeated = model(input_ids=ids, attention_mask=mask).logits

        def no_repeats(*args):
            raise AssertionError("keys were repeated per query head")

        monkeypatch.setattr(sdpa_attention, "repeat_kv", no_repeats)
        with grouped_kv_attention():
            grouped = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(grouped[mask.bool()], repeated[mask.bool()], rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="repeated"), torch.no_grad():  # restored on leaving
        model(input_ids=ids, attention_mask=mask)


def test_generation_samples_the_same_tokens_with_grouped_keys(tiny, monkeypatch):
    import contextlib

    import torch

    from cai.runtime import generate as gen

    model, tok = tiny
    backend = gen.HFBackend(model, tok)
    prompts = [tok(f"the sea {'and the wind ' * i}")["input_ids"] for i in range(4)]
    sampling = gen.Sampling(max_new_tokens=12, temperature=1.0)
    grouped = backend.generate_ids(prompts, sampling, seed=3, with_logits=True)
    monkeypatch.setattr(gen, "grouped_kv_attention", contextlib.nullcontext)
    repeated = backend.generate_ids(prompts, sampling, seed=3, with_logits=True)
    assert torch.equal(grouped.response_ids, repeated.response_ids)
    torch.testing.assert_close(grouped.logits, repeated.logits, rtol=1e-5, atol=1e-6)
