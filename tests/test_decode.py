"""The decode step (cai.runtime.decode): attention reads grouped keys and values in place (no copies per query
head, the same logits), and the sampler draws from exactly the recipe's distribution."""

from __future__ import annotations

import pytest

from cai.runtime.decode import InverseTransformSampler, grouped_kv_attention, sampling_processors
from cai.runtime.generate import Sampling


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


def frequencies(scores, processors, draws: int, seed: int = 0):
    """How often each token is drawn from each row of `scores` [B, V] over `draws` draws: [B, V]."""
    import torch

    torch.manual_seed(seed)
    rows = scores.repeat(draws, 1)
    picked = processors(torch.zeros((len(rows), 1), dtype=torch.long), rows.clone())
    assert torch.isfinite(picked).sum(-1).eq(1).all()  # one token per row, scored 0, every other -inf
    token = picked.argmax(-1).view(draws, len(scores))
    return (
        torch.stack([torch.bincount(token[:, b], minlength=scores.shape[1]) for b in range(len(scores))])
        / draws
    )


def test_the_sampler_draws_each_token_with_its_softmax_probability():
    import torch

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")], [0.0, 0.0, 3.0, 0.5, -2.0]])
    draws = 20000
    got = frequencies(scores, InverseTransformSampler(), draws)
    want = torch.softmax(scores, -1)
    sd = (want * (1 - want) / draws).sqrt()
    assert ((got - want).abs() <= 4 * sd + 1e-9).all(), (got, want)
    assert got[0, 4] == 0  # a token filtered to -inf is never drawn


def test_sampling_processors_apply_temperature_top_k_and_top_p_as_transformers_does():
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.tensor([[1.5, 1.0, 0.8, 0.2, -0.5, -1.0], [3.0, 0.0, 0.1, 0.2, 0.3, 0.4]])
    sampling = Sampling(temperature=0.7, top_k=4, top_p=0.9)
    ids = torch.zeros((2, 1), dtype=torch.long)
    warped = scores.clone()
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(4), TopPLogitsWarper(0.9)):
        warped = w(ids, warped)
    want = torch.softmax(warped, -1)
    assert (want == 0).any(-1).all()  # both filters remove tokens
    draws = 20000
    got = frequencies(scores, sampling_processors(sampling), draws)
    sd = (want * (1 - want) / draws).sqrt()
    assert ((got - want).abs() <= 4 * sd + 1e-9).all(), (got, want)
    assert (got[want == 0] == 0).all()
    assert sampling_processors(Sampling(temperature=0.0)) is None  # greedy: transformers' argmax alone


def test_the_sampler_never_draws_past_the_last_token_it_may_draw(monkeypatch):
    import torch

    scores = torch.tensor([[0.3, 1.0, float("-inf"), float("-inf")]])
    # the largest number torch.rand returns in float64: scaled to the row's total it may round up to the total
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, 1 - 2**-53, **kw))
    assert InverseTransformSampler()(None, scores).argmax(-1).item() == 1
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, **kw))
    assert InverseTransformSampler()(None, scores).argmax(-1).item() == 0


def test_generation_samples_through_the_sampler_and_a_seed_repeats_it(tiny, monkeypatch):
    import torch

    from cai.runtime import decode
    from cai.runtime import generate as gen

    model, tok = tiny
    backend = gen.HFBackend(model, tok)
    prompts = [tok(f"the sea {'and the wind ' * i}")["input_ids"] for i in range(4)]
    sampling = gen.Sampling(max_new_tokens=10, temperature=1.0)
    calls = []
    own = decode.InverseTransformSampler.__call__
    monkeypatch.setattr(decode.InverseTransformSampler, "__call__", lambda *a: calls.append(1) or own(*a))
    first = backend.generate_ids(prompts, sampling, seed=5).response_ids
    assert len(calls) == first.shape[1]  # one draw per generated position
    assert torch.equal(backend.generate_ids(prompts, sampling, seed=5).response_ids, first)
    assert not torch.equal(backend.generate_ids(prompts, sampling, seed=6).response_ids, first)
    calls.clear()
    greedy = backend.generate_ids(prompts, gen.Sampling(max_new_tokens=10, temperature=0.0), seed=5)
    assert not calls and greedy.response_ids.shape[0] == 4
