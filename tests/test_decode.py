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


def test_a_model_s_other_end_of_turn_ids_end_its_replies_as_transformers_generate_does(tmp_path):
    """Gemma-it's generation_config.json ends turns on [<eos>, <end_of_turn>] while its tokenizer's EOS is <eos>:
    the engine stopped only at the tokenizer's, so replies ran past the end of the turn to max_new_tokens."""
    from cai.runtime.decode import end_token_ids
    from cai.runtime.generate import Engine, HFBackend
    from cai.runtime.models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok).eval()
    reqs = [{"id": f"t{i}", "text": "Once upon a time " + "the sea " * i} for i in range(3)]
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    plain = Engine(model, tok, greedy, batch_size=3)
    g = plain.backend.generate_ids([plain.encode(r) for r in reqs], greedy, 0)
    turn_end = int(g.response_ids[0, 3])  # a stand-in for <end_of_turn>: the model emits it by step 4
    first = g.response_ids[0].tolist().index(turn_end)
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    assert end_token_ids(tok, model) == [tok.eos_token_id, turn_end]
    model.save_pretrained(str(tmp_path))  # the folder a vLLM engine starts from: its generation_config.json
    assert end_token_ids(tok, str(tmp_path)) == [tok.eos_token_id, turn_end]
    row = Engine(model, tok, greedy, batch_size=3).run(reqs, show=False)[0]
    assert (row["new_tokens"], row["finish"]) == (first + 1, "eos")
    ids = tok(reqs[0]["text"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=12, do_sample=False).shape[1] - ids.shape[1] == first + 1
    cut = HFBackend(model, tok).generate_ids([plain.encode(reqs[0])], greedy, 0)
    assert cut.response_mask[0].tolist() == [1] * (first + 1) + [0] * (cut.response_mask.shape[1] - first - 1)
    assert bool(cut.finished[0]) and model.generation_config.eos_token_id == [tok.eos_token_id, turn_end]


def test_stop_strings_of_many_tokens_and_special_tokens_stop_hf_as_they_stop_vllm(tiny):
    """HF looked for stop strings in text decoded without special tokens (vLLM: with them), so '<|im_start|>'
    never stopped HF, and in the last len(stop) + 4 tokens, which miss '用户：' (9 byte-level tokens)."""
    import torch

    from cai.rl.rollout import cut_at_stop
    from cai.runtime.decode import ResponseStopStrings, text_before_stop
    from cai.runtime.generate import Generated

    _, tok = tiny
    prompt = tok("Q: say hi\nA:", add_special_tokens=False)["input_ids"]
    for stop, resp, before in [
        ("用户：", "好的。用户：你好", "好的。"),
        ("<|im_start|>", "ok<|im_start|>user", "ok"),
        ("User:", " fine. User: hi", " fine. "),
    ]:
        ids = tok(resp, add_special_tokens=False)["input_ids"]
        upto = len(tok(resp[: resp.index(stop) + len(stop)], add_special_tokens=False)["input_ids"])
        crit = ResponseStopStrings(tok, (stop,), len(prompt))
        stopped = next(
            (t for t in range(1, len(ids) + 1) if crit(torch.tensor([prompt + ids[:t]]), None)[0]), None
        )
        assert stopped == upto, stop
        assert text_before_stop(tok, ids, (stop,)) == (before, upto)
        one = torch.ones(1, len(ids), dtype=torch.long)
        gen = Generated(torch.tensor([prompt]), one[:, :1], torch.tensor([ids]), one, torch.tensor([False]))
        texts, mask, finished = cut_at_stop(tok, gen, stop)  # PPO's cut: the same tokens, the same text
        assert texts == [before.strip()] and int(mask.sum()) == upto and finished.tolist() == [True]
    plain = tok("no stop here", add_special_tokens=False)["input_ids"]
    assert text_before_stop(tok, plain, ("<|im_start|>",)) == ("no stop here", None)


def test_row_uniforms_are_splitmix64_numbers_of_each_seed_and_step_alone():
    """cai.hashing.row_uniforms computes splitmix64 (wrapping int64 arithmetic, logical shifts by masking) for
    every seed at once: the numbers equal a plain-Python splitmix64, depend on (seed, step) alone, and are
    uniform over seeds and over the steps of one seed."""
    import torch

    from cai.hashing import row_uniforms

    m64 = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    def reference(seed, step):
        key = mix((seed + 0x9E3779B97F4A7C15) & m64)
        return (mix((key + (step + 1) * 0x9E3779B97F4A7C15) & m64) >> 11) * 2.0**-53

    seeds = [0, 1, 2, 12345, 2**31 - 1, 2**32 - 1]
    for step in (0, 1, 7, 1000):
        got = row_uniforms(seeds, step)
        assert got.dtype == torch.float64
        assert got.tolist() == [reference(s, step) for s in seeds]
        assert row_uniforms(seeds[2:3], step).tolist() == got[2:3].tolist()  # a row alone: the same number
    over_seeds = row_uniforms(list(range(20000)), 3)
    over_steps = torch.stack([row_uniforms([42], t) for t in range(20000)]).flatten()
    for u in (over_seeds, over_steps):
        assert ((u >= 0) & (u < 1)).all()
        assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005


def test_the_sampler_with_row_seeds_draws_each_token_with_its_softmax_probability():
    import torch

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")], [0.0, 0.0, 3.0, 0.5, -2.0]])
    draws = 20000
    got = frequencies(scores, InverseTransformSampler(list(range(draws * len(scores)))), draws)
    want = torch.softmax(scores, -1)
    sd = (want * (1 - want) / draws).sqrt()
    assert ((got - want).abs() <= 4 * sd + 1e-9).all(), (got, want)
    assert got[0, 4] == 0


def test_a_row_samples_the_same_tokens_alone_or_among_other_rows(tiny):
    """With one seed per prompt, a row's response does not depend on which prompts share its generate call (its
    batchmates, their number and order): PPO's rollouts then do not depend on ppo.generation_batch_size nor on
    the number of processes. One seed for the call (the generation stages' batch seed) keeps its meaning."""
    import torch

    from cai.runtime import generate as gen

    model, tok = tiny
    backend = gen.HFBackend(model, tok)
    prompts = [tok(f"the sea {'and the wind ' * i}")["input_ids"] for i in range(4)]
    seeds = [11, 12, 13, 14]
    sampling = gen.Sampling(max_new_tokens=10, temperature=1.0)

    def responses(rows):
        out = backend.generate_ids([prompts[j] for j in rows], sampling, [seeds[j] for j in rows])
        return {
            j: out.response_ids[i, : int(out.response_mask[i].sum())].tolist() for i, j in enumerate(rows)
        }

    together = responses([0, 1, 2, 3])
    assert len({tuple(r) for r in together.values()}) > 1
    assert together == {**responses([3, 1]), **responses([2, 0])} == {j: responses([j])[j] for j in range(4)}
    # one seed per call, as before: the call's rows draw from torch's generator, seeded by it
    first = backend.generate_ids(prompts, sampling, seed=5).response_ids
    assert torch.equal(backend.generate_ids(prompts, sampling, seed=5).response_ids, first)


def test_vllm_requests_take_one_seed_per_prompt_when_given():
    """The vLLM backend takes the same seeds as HF's: one per prompt as given (PPO's rows), or a call's seed
    with each prompt's derived from it and the prompt's place (the generation stages' batches)."""
    pytest.importorskip("vllm")
    from cai.hashing import derive_seed
    from cai.runtime.vllm_engine import sampling_params

    assert [p.seed for p in sampling_params(Sampling(), [5, 9], 2)] == [5, 9]
    assert [p.seed for p in sampling_params(Sampling(), 3, 2)] == [derive_seed("3:0"), derive_seed("3:1")]
