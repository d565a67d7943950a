"""AI feedback labels: forced feedback models, position-bias control, CoT clamping, tokenisation, prompts."""

from __future__ import annotations

import math
import random
import re

import pytest

from cai.constitution.fewshot import load_feedback_few_shot
from cai.constitution.schema import Principle
from cai.feedback.labeller import Labeller, PairToLabel, build_mc_prompt, check_warning, hh_check
from cai.feedback.options import option_continuations
from cai.stats import agreement, wilson_ci

GOOD, BAD = (
    "I won't help with that, but here is a safe alternative.",
    "Sure, here is how to do the harmful thing.",
)
PRINCIPLE = Principle(id="harmless", critique="c", revision="r", feedback="Which response is more harmless?")
OTHER = Principle(
    id="ethical", critique="c", revision="r", feedback="Which response is more ethical? Options:"
)


@pytest.fixture
def unpacked(monkeypatch):
    """Padded option reads: the forced models below read each row's text in their forward."""
    from cai.feedback import options

    monkeypatch.setattr(options, "PACKED", False)


def forced_model(tiny, mode: str, strength: float = 30.0):
    """The tiny Llama with logits pushed towards one letter token at every position.

    mode 'A': always the token "A" (pure position bias). mode 'content': the letter of the option whose text
    starts with GOOD's first words (an oracle that prefers the harmless answer wherever it is shown).
    """
    import torch
    from transformers import LlamaForCausalLM

    base, tok = tiny

    class Forced(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kw):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kw)
            bias = torch.zeros(input_ids.shape[0], out.logits.shape[-1])
            for b in range(input_ids.shape[0]):
                letter = "A"
                if mode == "content":
                    text = tok.decode(input_ids[b].tolist())
                    block = text[text.rfind("Options:") :]
                    m = re.search(r"\((A|B)\) (?:\[\[\[)?" + re.escape(GOOD[:12]), block)
                    if m is None:
                        continue  # generation steps see one token: no preference
                    letter = m.group(1)
                bias[b, tok.convert_tokens_to_ids(letter)] = strength
            out.logits = out.logits + bias[:, None, :].to(out.logits.dtype)
            return out

    model = Forced(base.config)
    model.load_state_dict(base.state_dict())
    model.generation_config = base.generation_config
    return model.eval(), tok


def pairs():
    msgs = [{"role": "user", "content": "How do I hurt someone?"}]
    return [PairToLabel("good-a", msgs, GOOD, BAD), PairToLabel("good-b", msgs, BAD, GOOD)]


@pytest.mark.parametrize("chat,exact", [(True, False), (False, True)])
def test_content_preference_gives_p_a_near_1_or_0(unpacked, tiny, chat, exact):
    model, tok = forced_model(tiny, "content")
    for both in (True, False):
        res = Labeller(model, tok, both_orders=both, chat=chat, exact_options=exact).label(
            pairs(), [[PRINCIPLE], [PRINCIPLE, OTHER]]
        )
        assert res[0].p_a > 0.99 and res[1].p_a < 0.01
        assert res[0].order_gap < 0.01
        assert set(res[0].p_a_orders) == ({"ab", "ba"} if both else {"ab"})
        assert res[1].principle_ids == ["harmless", "ethical"] and set(res[1].per_principle) == {
            "harmless",
            "ethical",
        }


def test_position_bias_is_averaged_out_and_reported(unpacked, tiny):
    model, tok = forced_model(tiny, "A")
    res = Labeller(model, tok, both_orders=True).label(pairs(), [[PRINCIPLE], [PRINCIPLE]])
    for r in res:  # always answers "(A)": each order is certain, in opposite directions
        assert r.p_a_orders["ab"] > 0.99 and r.p_a_orders["ba"] < 0.01
        assert abs(r.p_a - 0.5) < 0.01 and r.order_gap > 0.98
    one = Labeller(model, tok, both_orders=False).label(pairs(), [[PRINCIPLE], [PRINCIPLE]])
    assert all(r.p_a > 0.99 and r.order_gap == 0.0 for r in one)  # without the control the bias is the label


def test_chain_of_thought_reasons_then_clamps(unpacked, tiny):
    model, tok = forced_model(tiny, "content")
    lab = Labeller(model, tok, chain_of_thought=True, cot_clamp=(0.4, 0.6), cot_max_new_tokens=4)
    res = lab.label(pairs(), [[PRINCIPLE], [PRINCIPLE]])
    assert res[0].p_a == pytest.approx(0.6) and res[1].p_a == pytest.approx(0.4)
    prompt = lab._with_reasoning(
        [lab.prompt(pairs()[0].messages, PRINCIPLE.feedback, GOOD, BAD)], ["x"], "t"
    )[0]
    assert "Let's think step by step:" in prompt and prompt.endswith("Therefore, the answer is:")


def test_prompt_layout_chat_and_plain(tiny):
    _, tok = tiny
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Q?"},
    ]
    plain = build_mc_prompt(tok, msgs, "Pick one. Options:", "first", "second", chat=False)
    assert plain.startswith("Consider the following conversation between a human and an assistant:")
    assert "Human: hi\n\nAssistant: hello\n\nHuman: Q?" in plain
    assert plain.count("Options:") == 1 and "Options:\n(A) first\n(B) second\nThe answer is:" in plain
    assert plain.endswith("The answer is:")
    chat = build_mc_prompt(tok, msgs, "Pick one.", "first", "second", chat=True)
    assert chat.startswith("<|im_start|>user\nConsider the following conversation")
    assert chat.endswith("<|im_end|>\n<|im_start|>assistant\nThe answer is:")
    assert option_continuations(tok, chat) == [" (A)", " (B)"]
    assert option_continuations(tok, chat + " ") == ["(A)", "(B)"]


def test_few_shot_file_and_alternating_answers(tiny, shared_data):
    _, tok = tiny
    shots = load_feedback_few_shot(shared_data / "cai-paper" / "RLMadisonFewShotPrompts.json")
    assert len(shots) >= 5 and all(
        s["messages"][-1]["role"] == "user" and s["chosen"] and s["rejected"] for s in shots
    )
    text = build_mc_prompt(
        tok, [{"role": "user", "content": "Q?"}], "Pick.", "x", "y", few_shot=shots[:2], chat=False
    )
    blocks = text.split("\n\nConsider the following conversation")
    assert len(blocks) == 3
    assert f"(A) {shots[0]['chosen']}" in blocks[0] and blocks[0].endswith("The answer is: (A)")
    assert f"(B) {shots[1]['chosen']}" in blocks[1] and blocks[1].endswith("The answer is: (B)")


def test_few_shot_file_errors_name_the_item(tmp_path):
    from cai.errors import UserError

    bad = tmp_path / "shots.json"
    bad.write_text('[{"prompt": "\\n\\nHuman: hi\\n\\nAssistant:", "corrects": ["a"]}]')
    with pytest.raises(UserError, match="item 0"):
        load_feedback_few_shot(bad)


def _bpe_tokenizer():
    """A small trained byte-level BPE in which ' (' is one token, as in GPT-2-style vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>"]
    )
    core.train_from_iterator(["The answer is: (A) or (B)."] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>")


def test_option_tokens_are_scored_as_the_tokenizer_splits_them():
    """A prompt ending in a space must score '(A)' as the token ' (' + ..., not as ' ' + '(' + ... ."""
    import torch

    from cai.feedback.options import continuation_logprob

    tok = _bpe_tokenizer()
    assert len(tok.tokenize(" (A)")) < len(tok.tokenize(" ")) + len(tok.tokenize("(A)"))

    class Uniform(
        torch.nn.Module
    ):  # every token has log-prob -log V: a score counts the continuation's tokens
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tok)) + self.w})()

    m, V = Uniform(), len(tok)
    n_tokens = len(tok.tokenize(" (A)"))
    joined, spaced = continuation_logprob(m, tok, ["The answer is:", "The answer is: "], [" (A)", "(A)"])
    assert joined == pytest.approx(-n_tokens * math.log(V), rel=1e-5)
    assert spaced == pytest.approx(joined, rel=1e-5)


def test_options_part_at_the_letter_token(tiny):
    from cai.feedback.options import shared_prefix

    tok = _bpe_tokenizer()
    for t in (tok, tiny[1]):
        prompt = "The answer is:"
        prefix, nexts = shared_prefix(t, prompt, [" (A)", " (B)"])
        assert t.decode(prefix) == prompt + " (" and [t.decode([n]) for n in nexts] == ["A", "B"]
        assert shared_prefix(t, prompt + " ", ["(A)", "(B)"]) == (prefix, nexts)
    assert shared_prefix(tiny[1], "Q:", [" yes", " yes"]) is None  # options that never part


def test_agreement_and_wilson_ci():
    lo, hi = wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    a = agreement([0.9, 0.2, 0.5, 0.7], [True, False, True, False])
    assert a["n"] == 4 and a["agreement"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert a["mean_p_human_choice"] == pytest.approx((0.9 + 0.8 + 0.5 + 0.3) / 4)
    assert "not above chance" in check_warning(a)
    assert check_warning({**a, "above_chance": True}) is None


def test_a_labeller_with_no_preference_agrees_half_whatever_side_float_noise_picks():
    """p = 0.5 ± 1e-4 prefers neither response: a tie, half a hit. Counting only p == 0.5 as a tie, a tiny model's
    noise that happened to lean to the human choice scored agreement 0.75 with mean p(human choice) 0.50003."""
    from cai.feedback.labeller import LabelResult

    class Indifferent:  # leans by 1e-4 towards the longer reply, which humans chose below
        both_orders = True

        def label(self, pairs, principles, desc="", shard=False):
            lean = [1e-4 if len(p.response_a) > len(p.response_b) else -1e-4 for p in pairs]
            return [
                LabelResult(p.id, 0.5 + d, {"ab": 0.5 + d, "ba": 0.5 + d}, 0.0, [])
                for p, d in zip(pairs, lean)
            ]

    turn = "\n\nHuman: q {}?\n\nAssistant: {}"
    rows = [{"chosen": turn.format(i, "a longer reply"), "rejected": turn.format(i, "no")} for i in range(40)]
    check = hh_check(Indifferent(), rows, list, random.Random(0))
    assert check["mean_p_human_choice"] == pytest.approx(0.5001)
    assert check["agreement"] == 0.5 and check["hits"] == [0.5] * 40 and not check["above_chance"], check
    a = agreement([0.50004, 0.49997, 0.50002, 0.9], [True, False, True, False])
    assert a["agreement"] == pytest.approx(1.5 / 4) and a["hits"] == [0.5, 0.5, 0.5, 0.0], a

    from cai.credit import TIE, preference_credit

    near = [(0.5004, True), (0.4996, False), (0.5004, False)]
    assert [preference_credit(p, h) for p, h in near] == [0.5, 0.5, 0.5]
    assert [preference_credit(p, True) for p in (0.5 + 2 * TIE, 0.5 - 2 * TIE)] == [1.0, 0.0]


def test_hh_check_with_an_oracle_labeller(unpacked, tiny):
    model, tok = forced_model(tiny, "content")
    rows = [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: {GOOD}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: {BAD}",
        }
        for i in range(12)
    ]
    check = hh_check(Labeller(model, tok), rows, lambda: [PRINCIPLE], random.Random(0))
    assert check["n"] == 12 and check["agreement"] == 1.0 and check["above_chance"]
    assert check["ci95"][0] > 0.5 and check["mean_order_gap"] < 0.01 and check_warning(check) is None


@pytest.mark.parametrize("exact,cot", [(False, False), (True, False), (False, True)])
def test_sharded_check_gives_the_one_process_result(tiny, monkeypatch, two_ranks, exact, cot):
    """Two ranks, simulated by threads that exchange objects at gather_objects, split the check's option scoring
    (and its chain-of-thought generation) and both return exactly what one process computes, from the same
    batches."""
    import cai.feedback.options as scoring

    model, tok = tiny
    rows = [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: {GOOD[: 20 + 3 * i]}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: {BAD[: 15 + 2 * i]}",
        }
        for i in range(10)
    ]

    def check(shard: bool) -> dict:
        labeller = Labeller(model, tok, batch_size=4, exact_options=exact, chain_of_thought=cot)
        labeller.cot_max_new_tokens = 4
        return hh_check(labeller, rows, lambda: [PRINCIPLE], random.Random(0), shard=shard)

    one = check(False)
    scored = {0: 0, 1: 0}
    # the forward passes: the options' parting tokens read at once, or (exact) each option's tokens scored
    owner, name = (scoring, "continuation_logprob") if exact else (scoring, "_next_token_logprobs")
    real = getattr(owner, name)

    def counting(model, tokenizer, seqs, *args):  # fast reads come in groups of sequences
        scored[two_ranks.rank()] += len(seqs) if exact else sum(map(len, seqs))
        return real(model, tokenizer, seqs, *args)

    monkeypatch.setattr(owner, name, counting)
    both = two_ranks(lambda: check(True))
    assert both[0] == both[1] == one
    n_scored = 10 * 2 * (2 if exact else 1)  # pairs × orders (× options when each option is scored)
    assert scored[0] + scored[1] == n_scored and scored[0] > 0 and scored[1] > 0


@pytest.mark.parametrize("chat", [True, False])
def test_packed_option_reads_equal_the_padded_ones(tiny, monkeypatch, chat):
    """The labeller reads a pair's option orders and principles in one packed forward, their shared beginning
    (few-shot block, conversation) once: the same probabilities as the padded batch."""
    from cai.feedback import options
    from cai.feedback.labeller import Labeller, PairToLabel

    model, tok = tiny
    assert options.packable(model)
    pairs = [
        PairToLabel(f"p{i}", [{"role": "user", "content": f"question {i} about {w}"}], f"yes {w}", f"no {i}")
        for i, w in enumerate(["locks", "cakes", "birds", "rain", "tax"])
    ]
    few = [{"messages": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"}]
    principles = [[PRINCIPLE, PRINCIPLE]] * len(pairs)

    def labels():
        lab = Labeller(model, tok, batch_size=3, chat=chat, few_shot=few)
        return [r.p_a_orders for r in lab.label(pairs, principles)]

    packed = labels()
    monkeypatch.setattr(options, "PACKED", False)
    padded = labels()
    assert [sorted(a) for a in packed] == [sorted(b) for b in padded]
    assert [a[k] for a in packed for k in a] == pytest.approx([b[k] for b in padded for k in b], abs=1e-5)
