"""Preference model: the loss maths on hand-made tensors, score reading, and training on a learnable signal."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from cai.pm import centring_loss, pair_accuracy, preference_loss, sequence_scores, soft_label_loss
from cai.rundir import append_jsonl, read_jsonl, write_json


def test_soft_label_loss_by_hand():
    r_a = torch.tensor([0.0, 2.0, 2.0, -1.0])
    r_b = torch.tensor([0.0, 0.0, 0.0, 1.0])
    p = torch.tensor([0.5, 1.0, 0.0, 0.25])
    got = soft_label_loss(r_a, r_b, p)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [
        math.log(2),
        -math.log(sig(2)),
        -math.log(sig(-2)),
        -(0.25 * math.log(sig(-2)) + 0.75 * math.log(sig(2))),
    ]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # d loss / d r_a = σ(r_a − r_b) − p: the gradient vanishes where the score gap matches the soft label
    r = torch.tensor([0.3, -1.2], requires_grad=True)
    soft_label_loss(r, torch.zeros(2), torch.tensor([0.7, 0.1])).sum().backward()
    assert r.grad.tolist() == pytest.approx([sig(0.3) - 0.7, sig(-1.2) - 0.1], rel=1e-5)


def test_hard_labels_centring_and_accuracy():
    r_a, r_b = torch.tensor([1.0, 0.5]), torch.tensor([2.0, -0.5])
    p = torch.tensor([0.7, 0.2])
    hard = preference_loss(r_a, r_b, p, hard=True)
    assert float(hard) == pytest.approx(float(soft_label_loss(r_a, r_b, torch.tensor([1.0, 0.0])).mean()))
    assert centring_loss(r_a, r_b).tolist() == [9.0, 0.0]
    with_c = preference_loss(r_a, r_b, p, center_coef=0.1)
    assert float(with_c) == pytest.approx(float(soft_label_loss(r_a, r_b, p).mean()) + 0.1 * 4.5)
    assert pair_accuracy(r_a, r_b, p) == 0.0
    assert pair_accuracy(r_a, r_b, torch.tensor([0.5, 0.9])) == 1.0  # the tie is left out
    assert math.isnan(pair_accuracy(r_a, r_b, torch.tensor([0.5, 0.5])))


def test_scores_read_at_last_real_token_any_padding(tiny_dir):
    from cai.models import load_model, load_tokenizer

    tok = load_tokenizer("tiny-random-llama")
    model = load_model("tiny-random-llama", kind="seq_cls").eval()
    a, b = [5, 6, 7, tok.pad_token_id], [8, 9]  # a ends with the pad id (= eos), which must still be read
    left = torch.tensor([a, [tok.pad_token_id] * 2 + b])
    right = torch.tensor([a, b + [tok.pad_token_id] * 2])
    with torch.no_grad():
        sl = sequence_scores(model, left, torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
        sr = sequence_scores(model, right, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
        alone = [
            float(sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)))
            for s in (a, b)
        ]
    assert sl.tolist() == pytest.approx(alone, abs=1e-5) and sr.tolist() == pytest.approx(alone, abs=1e-5)


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose better reply ends in a word of assent and the worse in one of refusal, after random filler
    words; soft labels 0.9/0.1. The varied words keep an untrained head's accuracy near chance."""
    rng = random.Random(seed)
    words = ["alpha", "delta", "kilo", "oscar", "tango", "zulu"]
    rows = []
    for i in range(n):
        filler = lambda: " ".join(rng.choice(words) for _ in range(3))  # noqa: E731
        good, bad = (
            f"{filler()} {rng.choice(['yes', 'sure', 'gladly'])}.",
            f"{filler()} {rng.choice(['no', 'never', 'nope'])}.",
        )
        a_good = rng.random() < 0.5
        rows.append(
            {
                "id": f"s{i}",
                "prompt_id": f"q{i}",
                "messages": [{"role": "user", "content": f"q{i % 7}?"}],
                "response_a": good if a_good else bad,
                "response_b": bad if a_good else good,
                "p_a": 0.9 if a_good else 0.1,
                "source": "ai",
            }
        )
    return rows


def feedback_fixture(run, rows):
    fb = run / "feedback"
    fb.mkdir(parents=True)
    append_jsonl(fb / "pairs.jsonl", rows)
    write_json(
        fb / "manifest.json", {"stage": "feedback", "status": "complete", "fingerprint": "f", "output": "o"}
    )


def test_training_learns_a_signal_and_saves_a_reloadable_pm(tiny_recipe, tmp_path):
    from cai import pipeline
    from cai.pm import RewardScorer

    recipe = tiny_recipe(
        "stages=[feedback,preference_model]",
        "preference_model.max_steps=16",
        "preference_model.batch_size=8",
        "preference_model.learning_rate=3e-3",
        "preference_model.eval_fraction=0.25",
        "preference_model.save_steps=50",
        "preference_model.center_coef=0.01",
    )
    run = tmp_path / "run"
    feedback_fixture(run, synthetic_pairs(96))
    pipeline.run(recipe, only=["preference_model"])
    out = run / "preference_model"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["held_out"]["n"] == 24
    assert 0.25 <= ev["held_out_before"]["accuracy"] <= 0.75
    assert ev["held_out"]["accuracy"] >= 0.9
    losses = [m["loss"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 16 and losses[-1] < losses[0] - 0.2

    scorer = RewardScorer(out / "model")
    norm = json.loads((out / "model" / "score_norm.json").read_text())
    assert (scorer.mean, scorer.std) == (norm["mean"], norm["std"]) and norm["std"] > 0
    conv = [{"role": "user", "content": "q1?"}]
    raw = scorer.score(
        [
            conv + [{"role": "assistant", "content": "tango kilo yes."}],
            conv + [{"role": "assistant", "content": "tango kilo no."}],
        ]
    )
    assert raw[0] > raw[1]
    assert scorer.normalize(raw).tolist() == pytest.approx(((raw - norm["mean"]) / norm["std"]).tolist())
    enc = scorer.tokenizer(
        [
            scorer.tokenizer.apply_chat_template(
                conv + [{"role": "assistant", "content": "tango kilo yes."}], tokenize=False
            )
        ],
        add_special_tokens=False,
        return_tensors="pt",
    )
    assert float(scorer.score_ids(enc["input_ids"], enc["attention_mask"])[0]) == pytest.approx(
        float(raw[0]), abs=1e-4
    )


def test_lora_bradley_terry_spec_and_resume(tiny_recipe, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from cai.rundir import StageContext
    from cai.stages import preference_model as stage

    spec = tmp_path / "lora-spec.yaml"
    spec.write_text("name: lora-spec\nloss: bradley_terry\nlora: {r: 4, alpha: 8}\nlearning_rate: 1.0e-3\n")
    recipe = tiny_recipe(
        f"preference_model.spec={spec}",
        "preference_model.max_steps=4",
        "preference_model.save_steps=2",
        "preference_model.batch_size=4",
        "preference_model.learning_rate=5e-3",
    )
    cfg, loaded = stage.effective_config(recipe)
    assert loaded.name == "lora-spec" and cfg.loss == "bradley_terry" and cfg.lora.r == 4
    assert cfg.learning_rate == 5e-3  # the recipe's own key wins over the spec's
    run = tmp_path / "run"
    feedback_fixture(run, synthetic_pairs(24))
    out = run / "preference_model"
    ctx = StageContext(
        recipe=recipe, stage="preference_model", out_dir=out, inputs={"feedback": run / "feedback"}
    )
    stage.run(ctx)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model", num_labels=1)
    assert model.config.num_labels == 1 and not any("lora" in n for n, _ in model.named_parameters())
    assert max(m["step"] for m in read_jsonl(out / "metrics.jsonl")) == 4

    # resume: a longer run continues from the last checkpoint instead of starting over
    recipe2 = tiny_recipe(
        f"preference_model.spec={spec}",
        "preference_model.max_steps=6",
        "preference_model.save_steps=2",
        "preference_model.batch_size=4",
        "preference_model.learning_rate=5e-3",
    )
    stage.run(
        StageContext(
            recipe=recipe2, stage="preference_model", out_dir=out, inputs={"feedback": run / "feedback"}
        )
    )
    steps = [m["step"] for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_specs_and_suites_validate(root):
    from cai.errors import UserError
    from cai.reward_specs import SPEC_DIR, SUITE_DIR, load_pm_spec, load_suite

    for p in SPEC_DIR.glob("*.yaml"):
        assert load_pm_spec(p.stem).name == p.stem
    for name in ("pairs", "ai-risk", "multiple-choice", "harmful-vs-ethical", "harmfulness-classification"):
        assert load_suite(name).name == name and (SUITE_DIR / f"{name}.yaml").is_file()
    with pytest.raises(UserError, match="no-such"):
        load_pm_spec("no-such")
    bad = root / "reward_models" / "suites" / "pairs.yaml"
    text = bad.read_text()
    tmp = bad.with_name("tmp-bad-suite.yaml")
    try:
        tmp.write_text(text + "colour: red\n")
        with pytest.raises(UserError, match=r"tmp-bad-suite.yaml:\d+.*colour"):
            load_suite("tmp-bad-suite")
    finally:
        tmp.unlink()
