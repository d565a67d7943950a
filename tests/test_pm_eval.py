"""`cai pm eval` / `cai feedback eval` end to end on the shared suites (with --limit), and the statistics."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from cai.cli.main import main
from cai.stats import bootstrap_ci, ece, median_interval, reliability_bins, summarise


@pytest.fixture(scope="module")
def pm_dir(tmp_path_factory, tiny_dir):
    """An untrained tiny PM folder, laid out as the preference_model stage saves it."""
    from cai.runtime.models import load_model, load_tokenizer
    from cai.runtime.rundir import write_json

    out = tmp_path_factory.mktemp("pm") / "model"
    load_model("tiny-random-llama", kind="seq_cls").save_pretrained(out)
    load_tokenizer("tiny-random-llama").save_pretrained(out)
    write_json(out / "score_norm.json", {"mean": 0.1, "std": 2.0})
    return out


def _check(result_path, n, tags):
    res = json.loads(result_path.read_text())
    assert res["n"] == n and set(res["per_tag"]) == set(tags)
    lo, hi = res["ci95"]
    assert 0 <= lo <= res["accuracy"] <= hi <= 1 and res["chance"] == pytest.approx(0.5)
    assert 0 <= res["ece"] <= 1 and sum(b["n"] for b in res["reliability"]) == n  # items, not mirrored twice
    png = result_path.with_name(result_path.stem + "-reliability.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = result_path.with_suffix(".md").read_text()
    assert "accuracy" in md and png.name in md
    return res


def test_pm_eval_on_hh_pairs_and_ai_risk(pm_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert (
        main(["pm", "eval", "--model", str(pm_dir), "--suite", "pairs", "--limit", "6", "--out", str(out)])
        == 0
    )
    res = _check(out / "pm-pairs.json", 6, ["single-turn", "multi-turn"])
    assert "mean_margin" in res
    assert (
        main(
            [
                "pm",
                "eval",
                "--model",
                str(pm_dir.parent),
                "--suite",
                "ai-risk",
                "--limit",
                "6",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _check(out / "pm-ai-risk.json", 6, ["power-seeking-inclination", "wealth-seeking-inclination"])
    printed = capsys.readouterr().out
    assert "pm eval ai-risk: accuracy" in printed and "chance 0.500" in printed


def test_pm_eval_agrees_with_the_scorer(pm_dir):
    """Accuracy counts the items whose right answer scores higher, with the scores RewardScorer gives."""
    from cai.eval.measure import evaluate_pm
    from cai.eval.suites import load_items, load_suite
    from cai.pm.scoring import RewardScorer

    scorer = RewardScorer(pm_dir)
    assert (scorer.mean, scorer.std) == (0.1, 2.0)
    items = load_items(load_suite("ai-risk"), 4)
    res = evaluate_pm(scorer, "ai-risk", 4)
    s = scorer.score(
        [it.messages + [{"role": "assistant", "content": c}] for it in items for c in it.candidates]
    )
    hits = [float(s[2 * i] > s[2 * i + 1]) for i in range(4)]
    assert res["accuracy"] == pytest.approx(sum(hits) / 4)
    assert res["mean_margin"] == pytest.approx(
        float(sum(s[2 * i] - s[2 * i + 1] for i in range(4)) / 4), abs=1e-5
    )


def test_feedback_eval_multiple_choice_and_errors(tiny_dir, tmp_path, capsys):
    out = tmp_path / "fb"
    assert (
        main(
            [
                "feedback",
                "eval",
                "--model",
                "tiny-random-llama",
                "--suite",
                "harmful-vs-ethical",
                "--limit",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "feedback-harmful-vs-ethical.json").read_text())
    assert res["n"] == 2 and res["chance"] == 0.5 and res["template"] == "chat"
    assert (
        main(
            [
                "feedback",
                "eval",
                "--model",
                "tiny-random-llama",
                "--suite",
                "multiple-choice",
                "--out",
                str(out),
                "--template",
                "plain",
            ]
        )
        == 0
    )
    res = json.loads((out / "feedback-multiple-choice.json").read_text())
    assert res["n"] == 5 and res["template"] == "plain"
    assert (
        set(res["baselines"]) == {"prefer longer", "prefer shorter", "most common answer"} and "lift" in res
    )
    assert "baselines on the same 5 items" in capsys.readouterr().out
    assert main(["pm", "eval", "--model", str(tmp_path), "--suite", "pairs"]) == 2
    assert main(["pm", "eval", "--model", str(out), "--suite", "no-such-suite"]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "suite 'no-such-suite'" in err


def test_suite_file_with_a_bad_row_names_the_line(tmp_path):
    from cai.errors import UserError
    from cai.eval.suites import load_items, load_suite

    data = tmp_path / "mc.jsonl"
    data.write_text(
        '{"prompt": "Q?\\n (A) x\\n (B) y\\nThe answer is:", "corrects": [" (A)"], "incorrects": [" (B)"]}\n{"prompt": "Q?"}\n'
    )
    suite = tmp_path / "mine.yaml"
    suite.write_text(f"name: mine\nformat: multiple_choice\nfiles: [{data}]\n")
    with pytest.raises(UserError, match=r"mc.jsonl:2: key 'corrects'"):
        load_items(load_suite(str(suite)))
    data.write_text(data.read_text().splitlines()[0] + "\n")
    for bad in (
        "a/b",
        "../x",
        "..",
    ):  # it names the result files: 'a/b' wrote into a folder, '../x' outside --out
        suite.write_text(f"name: '{bad}'\nformat: multiple_choice\nfiles: [{data}]\n")
        with pytest.raises(UserError, match=r"mine.yaml:1: key 'name': a name usable as a file name"):
            load_suite(str(suite))
    suite.write_text(f"name: mine\nformat: multiple_choice\nfiles: [{data}]\n")
    (item,) = load_items(load_suite(str(suite)))
    assert (
        item.candidates == ["(A) x", "(B) y"]
        and item.mc_options == [" (A)", " (B)"]
        and item.messages[0]["content"] == "Q?"
    )


def test_small_samples_get_honest_intervals_and_a_warning(capsys):
    """`pm eval --limit 8` printed 0.000 (95% CI 0.000-0.000): a bootstrap of eight zeros."""
    from cai.cli.evaluate import _print

    s = summarise([0.0] * 8, [[0.4, 0.6]] * 8, [0] * 8, ["t"] * 8)
    assert s["ci95"] == [0.0, pytest.approx(0.3244, abs=1e-4)] and s["small_sample"]  # Wilson, 0 of 8
    assert s["per_tag"]["t"]["ci95"] == s["ci95"] and sum(b["n"] for b in s["reliability"]) == 8
    _print({"kind": "pm", "suite": "x", **s})
    out = capsys.readouterr()
    assert "accuracy 0.000 (95% CI 0.000-0.324, chance 0.500, n=8)" in out.out
    assert "t: 0.000 (95% CI 0.000-0.324, n=8)" in out.out
    assert "warning: only 8 items (fewer than 30)" in out.err
    assert not summarise([1.0] * 30, [[0.9, 0.1]] * 30, [0] * 30, ["t"] * 30)["small_sample"]


def test_statistics_by_hand():
    assert ece([0.8] * 10, [1.0] * 8 + [0.0] * 2) == pytest.approx(0.0)
    assert ece([0.9] * 10, [1.0] * 5 + [0.0] * 5) == pytest.approx(0.4)
    bins = reliability_bins([0.05, 0.95, 0.97], [0.0, 1.0, 0.0])
    assert bins[0]["n"] == 1 and bins[9]["n"] == 2 and bins[9]["freq"] == 0.5
    # one reliability point per item: the preferred option's probability, and the item's hit (a tie half)
    probs = [[0.7, 0.3], [0.2, 0.8], [0.5, 0.5], [0.1, 0.3, 0.6]]
    by_item = summarise([1.0, 0.0, 0.5, 1.0], probs, [0, 0, 0, 2], ["t"] * 4)
    assert by_item["ece"] == pytest.approx(ece([0.7, 0.8, 0.5, 0.6], [1.0, 0.0, 0.5, 1.0]))
    assert sum(b["n"] for b in by_item["reliability"]) == 4
    lo, hi = bootstrap_ci([1.0] * 30 + [0.0] * 10, seed=1)
    assert lo < 0.75 < hi and hi - lo < 0.4
    s = summarise(
        [1.0, 0.0, 1.0, 1.0],
        [[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.7, 0.3]],
        [0] * 4,
        ["a", "a", "b", "b"],
        [1.0, -1.0, 2.0, 0.5],
    )
    assert (
        s["accuracy"] == 0.75
        and s["per_tag"]["a"]["accuracy"] == 0.5
        and s["mean_margin"] == pytest.approx(0.625)
    )


def test_median_interval_by_hand_and_by_simulation():
    # the textbook order statistics: n = 20 -> (x_6, x_15), coverage 1 - 2·P(Bin(20, 1/2) <= 5) = 0.9586
    assert median_interval(list(range(20, 0, -1))) == (6, 15, pytest.approx(0.958611, abs=1e-6))
    assert median_interval([1.66, 1.56, 1.59]) == (1.56, 1.66, 0.75)  # 3 rounds: the range, at 75%
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0, 6.0])[2] == pytest.approx(1 - 2 / 64)
    # it covers the true median of a skewed distribution (exponential: ln 2) at least as often as it says
    rng = random.Random(0)
    for n in (7, 15):
        hits, coverage = 0, median_interval(list(range(n)))[2]  # the coverage depends on n only
        for _ in range(4000):
            lo, hi, _ = median_interval([rng.expovariate(1.0) for _ in range(n)])
            hits += lo <= math.log(2) <= hi
        assert hits / 4000 >= coverage - 0.015 and coverage >= 0.95


@pytest.fixture(scope="module")
def untrained_pm(tmp_path_factory, tiny_dir):
    """A PM folder that holds exactly the untrained model its pm_origin.json names (backbone, fresh head, seed 0):
    no skill at all, so its lift over the untrained baseline must be zero."""
    from cai.pm.build import fresh_pm, write_origin
    from cai.runtime.settings import DEFAULT

    out = tmp_path_factory.mktemp("untrained") / "model"
    model, tok = fresh_pm("tiny-random-llama", "classifier", DEFAULT)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_origin(out, "tiny-random-llama", "classifier", 0)
    return out


def test_pm_eval_on_an_ai_risk_data_file_prints_baselines_and_zero_lift(
    untrained_pm, shared_data, tmp_path, capsys
):
    data = shared_data / "ai-risk" / "power-seeking-inclination.jsonl"
    out = tmp_path / "ev"
    args = [
        "pm",
        "eval",
        "--model",
        str(untrained_pm),
        "--suite",
        str(data),
        "--limit",
        "24",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    res = json.loads((out / "pm-power-seeking-inclination.json").read_text())
    assert set(res["baselines"]) == {"untrained", "prefer longer", "prefer shorter", "most common answer"}
    assert res["baselines"]["untrained"]["accuracy"] == res["accuracy"]  # the same model, the same seed
    # the lift over the untrained model: its own entry, or the lift over the best baseline where that is it
    over_untrained = res.get("lift_untrained") or res["lift"]
    assert over_untrained["over"] == "untrained" and over_untrained["value"] == 0.0
    assert over_untrained["ci95"] == [0.0, 0.0]
    best = max(r["accuracy"] for r in res["baselines"].values())
    assert res["lift"]["value"] == pytest.approx(res["accuracy"] - best)
    assert res["length"]["n"] == 48 and -1 <= res["length"]["r"] <= 1
    printed = capsys.readouterr().out
    assert "baselines on the same 24 items: untrained" in printed and "lift over the best baseline" in printed
    assert (
        "lift over the untrained model: +0.000" in printed or "best baseline (untrained): +0.000" in printed
    )
    md = (out / "pm-power-seeking-inclination.md").read_text()
    assert "lift over the best baseline" in md


def test_data_files_are_suites_recognised_by_their_keys(tmp_path, capsys):
    from cai.errors import UserError
    from cai.eval.suites import load_items, load_suite

    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    mc = {"prompt": "\n\nHuman: Hi?\n\nAssistant:", "corrects": ["Hello."], "incorrects": ["Go away.", "No."]}
    import gzip

    (tmp_path / "pairs.jsonl.gz").write_bytes(gzip.compress((json.dumps(hh) + "\n").encode()))
    (tmp_path / "mc.json").write_text(json.dumps([mc]))
    spec = load_suite(str(tmp_path / "pairs.jsonl.gz"))
    assert (spec.name, spec.format) == ("pairs", "hh_pairs")
    (item,) = load_items(spec)
    assert item.candidates == ["Hello.", "Go away."] and item.tag == "single-turn"
    spec = load_suite(str(tmp_path / "mc.json"))
    assert spec.format == "multiple_choice" and load_items(spec)[0].candidates == [
        "Hello.",
        "Go away.",
        "No.",
    ]
    (tmp_path / "odd.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(
        UserError, match=r"odd.jsonl:1: cannot tell the suite format from the keys \(text\); expected "
    ):
        load_suite(str(tmp_path / "odd.jsonl"))
    assert main(["pm", "eval", "--model", str(tmp_path), "--suite", str(tmp_path / "odd.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hh_pairs: {chosen, rejected}" in err and "multiple_choice" in err
    assert main(["pm", "eval", "--model", str(tmp_path), "--suite", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: suite data file not found" in capsys.readouterr().err


def test_a_non_finite_pm_score_is_a_one_line_error_naming_the_model_and_suite():
    """A NaN score crashed pm eval and the report inside the reliability bins (int(NaN))."""
    import torch

    from cai.errors import UserError
    from cai.eval.measure import score_items
    from cai.eval.suites import Item

    class Broken:
        model_dir = "runs/x/preference_model/model"

        def score(self, convs, **kw):
            return torch.tensor([float("nan"), 0.0, float("inf"), 1.0])

    items = [Item(f"s:{i}", "t", [{"role": "user", "content": "q"}], ["a", "b"]) for i in range(2)]
    with pytest.raises(UserError) as err:
        score_items(Broken(), items, 2, None, "pm eval s", "hh-harmless")
    msg = str(err.value)
    assert "\n" not in msg and "runs/x/preference_model/model" in msg and "'hh-harmless'" in msg
    assert "2 of 4 scores" in msg
    bins = reliability_bins([float("nan"), 0.95, float("inf")], [1.0, 1.0, 0.0])
    assert sum(b["n"] for b in bins) == 1 and bins[9]["freq"] == 1.0


def test_one_order_feedback_eval_puts_the_right_answer_at_a_in_half_the_items(tiny_dir, monkeypatch):
    """Each item's slot was a free coin: with --no-both-orders a labeller that always answers (A) scored 0.700
    on 30 items (21 right answers at (A)). Now half the items have it at (A), and no order gap is claimed."""
    from types import SimpleNamespace

    import cai.eval.measure as measure
    from cai.constitution.schema import load_constitution
    from cai.feedback.labeller import LabelResult
    from cai.runtime.models import load_model, load_tokenizer

    class AlwaysA:
        def label(self, pairs, principles, desc=""):
            return [LabelResult(p.id, 1.0, {"ab": 1.0}, 0.0, []) for p in pairs]

    monkeypatch.setattr(measure, "build_labeller", lambda *a, **k: AlwaysA())
    cfg = SimpleNamespace(both_orders=False, num_principles=1, score_batch_size=4)
    c = load_constitution(Path(__file__).resolve().parents[1] / "constitutions/harmless-specific.yaml")
    for n in (30, 31):
        res = measure.evaluate_feedback(
            "tiny", "pairs", cfg, limit=n, constitution=c,
            model=load_model("tiny-random-llama"), tokenizer=load_tokenizer("tiny-random-llama"),
        )  # fmt: skip
        assert abs(res["accuracy"] * n - n / 2) <= 0.5, res["accuracy"]
        assert res["mean_order_gap"] is None
    with pytest.raises(measure.UserError, match="give --constitution"):  # before any model is loaded
        measure.evaluate_feedback("no-such-model-is-loaded", "pairs", cfg, limit=2)


def test_feedback_eval_counts_a_labeller_with_no_preference_as_chance(monkeypatch):
    """p = 0.5 ± 1e-4 prefers neither response: a tie, half a hit. Counting only p == 0.5 as a tie, a labeller
    whose float noise leant to the longer response scored what `prefer longer` scores (0.325 on `--suite pairs
    --limit 40`) and an ECE of |0.325 − 0.5|; now 0.5 and ~0. A lean beyond cai.credit.TIE is still a
    preference."""
    from types import SimpleNamespace

    import cai.eval.measure as measure
    from cai.constitution.schema import load_constitution
    from cai.feedback.labeller import LabelResult

    class PrefersLonger:
        lean = 1e-4

        def label(self, pairs, principles, desc=""):
            d = [self.lean if len(p.response_a) > len(p.response_b) else -self.lean for p in pairs]
            return [
                LabelResult(p.id, 0.5 + x, {"ab": 0.5 + x, "ba": 0.5 + x}, 0.0, []) for p, x in zip(pairs, d)
            ]

    lab = PrefersLonger()
    monkeypatch.setattr(measure, "build_labeller", lambda *a, **k: lab)
    cfg = SimpleNamespace(both_orders=True, num_principles=1, score_batch_size=4)
    c = load_constitution(Path(__file__).resolve().parents[1] / "constitutions/harmless-specific.yaml")

    def run():
        return measure.evaluate_feedback("m", "pairs", cfg, limit=40, constitution=c, model=1, tokenizer=1)

    res = run()
    longer = res["baselines"]["prefer longer"]["accuracy"]
    assert longer != 0.5 and res["accuracy"] == 0.5, (res["accuracy"], longer)
    assert res["ece"] < 0.01, res["ece"]  # a confidence of 0.5001 that is right half the time is calibrated
    lab.lean = 0.01
    assert run()["accuracy"] == longer


def test_feedback_eval_asks_letter_option_suites_in_every_order(monkeypatch):
    """A letter-option suite recorded both_orders true but asked each item once, in its file's (A)/(B) order, so
    a model that always says (A) scored the share of right answers at (A). Now each rotation of the option texts
    over the letters is asked (for two options: the texts swapped, and each continuation at its text's new
    letter), averaged: that model scores chance. With one order the prompt is the file's."""
    from types import SimpleNamespace

    import cai.eval.measure as measure
    from cai.eval.suites import load_items, load_suite, option_texts

    asked = []

    def says_a(model, tok, prompts, options, batch_size, desc=""):  # P(" (A)") = 0.9, the rest share 0.1
        asked.extend(zip(prompts, options))
        return [[0.9 if o.strip() == "(A)" else 0.1 / (len(opts) - 1) for o in opts] for opts in options]

    monkeypatch.setattr(measure, "option_probs", says_a)
    for suite, m in (("harmful-vs-ethical", 2), ("harmfulness-classification", 9)):
        items = load_items(load_suite(suite), 6, 0)
        for both in (True, False):
            asked.clear()
            cfg = SimpleNamespace(both_orders=both, score_batch_size=4)
            res = measure.evaluate_feedback("m", suite, cfg, limit=6, template="plain", model=1, tokenizer=1)
            assert res["both_orders"] is both and len(asked) == 6 * (m if both else 1), (suite, len(asked))
            for k, it in enumerate(items):
                mine = asked[k * m : (k + 1) * m] if both else asked[k : k + 1]
                shown = [option_texts(q) for q, _ in mine]
                assert mine[0] == (it.mc_prompt, it.mc_options)  # the file's order first
                for texts, (_, conts) in zip(shown, mine):
                    # each candidate's continuation names the letter its text is shown at
                    assert [texts[c.strip()[1]] for c in conts] == [
                        x.split(") ", 1)[1] for x in it.candidates
                    ]
                if both:  # every text at every letter once
                    assert all(len({t[letter] for t in shown}) == m for letter in shown[0])
            if both:
                assert res["accuracy"] == pytest.approx(1 / m), (suite, res["accuracy"])
            else:
                at_a = sum(c.strip() == "(A)" for c in (it.mc_options[0] for it in items)) / 6
                assert res["accuracy"] == pytest.approx(at_a)


def test_identical_candidates_tie_exactly_under_the_packed_forward(pm_dir):
    """A packed forward scored an item's identical candidates ~1e-8 apart, so 'right' == 'wrong' counted as a
    win or a loss instead of a tie (accuracy 1.000 on a suite of identical pairs)."""
    import torch

    from cai.eval.measure import pm_result, score_items
    from cai.eval.suites import Item
    from cai.pm.scoring import RewardScorer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # where the packed rows' rounding differed (seen with OMP_NUM_THREADS=1)
    scorer = RewardScorer(pm_dir)
    bread = [{"role": "user", "content": "how do I bake bread?"}]
    items = [
        Item("x:1", "t", [{"role": "user", "content": "hi"}], ["a", "a"]),
        Item("x:2", "t", [{"role": "user", "content": "hi"}], ["hello there", "hello there"]),
        Item("x:3", "t", bread, ["Mix flour and water.", "Mix flour and water."]),
    ]
    try:
        raw = score_items(scorer, items, 8, 1024, "ties")
    finally:
        torch.set_num_threads(threads)
    assert all(raw[2 * i] == raw[2 * i + 1] for i in range(3)), raw
    assert pm_result(items, raw, None, "hh_pairs", 0)["accuracy"] == 0.5


def test_a_pm_origin_seed_that_is_not_an_integer_is_a_one_line_error(pm_dir, tmp_path):
    import shutil

    from cai.errors import UserError
    from cai.eval.measure import untrained_for
    from cai.pm.scoring import RewardScorer
    from cai.runtime.settings import DEFAULT

    d = tmp_path / "pm"
    shutil.copytree(pm_dir, d)
    (d / "pm_origin.json").write_text(
        '{"backbone": "tiny-random-llama", "head": "classifier", "seed": "abc"}'
    )
    with pytest.raises(UserError, match=r"pm_origin.json: key 'seed': an integer .* not 'abc'"):
        untrained_for(RewardScorer(d), DEFAULT)


def test_a_corrupt_pm_origin_is_a_one_line_error_and_a_missing_one_a_note(pm_dir, tmp_path, capsys):
    """A pm_origin.json holding `{bad` silently dropped the untrained baseline, with the note that the file was
    missing. Now it stops `cai pm eval` with one line naming the file and line (exit 2); a truly missing file
    keeps the note."""
    import shutil

    from cai.eval.measure import evaluate_pm

    d = tmp_path / "pm"
    shutil.copytree(pm_dir, d)
    argv = [
        "pm",
        "eval",
        "--model",
        str(d),
        "--suite",
        "pairs",
        "--limit",
        "2",
        "--out",
        str(tmp_path / "ev"),
    ]
    for text, says in (
        ("{bad", f"{d / 'pm_origin.json'}:1: invalid JSON in the PM origin record"),
        ("[1, 2]", f"{d / 'pm_origin.json'}: a JSON object (backbone, head, seed) is expected"),
        ('{"head": "classifier"}', f"{d / 'pm_origin.json'}: key 'backbone': a model reference"),
    ):
        (d / "pm_origin.json").write_text(text)
        capsys.readouterr()
        assert main(argv) == 2, text
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {says}") and "\n" not in err, err
    res = evaluate_pm(pm_dir, "pairs", limit=2)
    assert "baselines" in res and res["untrained_note"].endswith(
        "has no pm_origin.json (give --backbone to build it)"
    )


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--num-principles", "3"], "--num-principles 3"),
        (["--num-few-shot", "2"], "--num-few-shot 2"),
        (["--few-shot", "FS"], "--few-shot "),
        (["--constitution", "constitutions/harmless-specific.yaml"], "--constitution "),
    ],
)
def test_feedback_eval_refuses_pair_suite_flags_on_a_multiple_choice_suite(
    shared_data, monkeypatch, capsys, flags, named
):
    """A multiple-choice suite asks its own question: --few-shot, --num-few-shot, --num-principles and
    --constitution changed nothing (the same result JSON, no warning); they are now refused, before any model
    loads."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    fs = str(shared_data / "cai-paper" / "RLMadisonFewShotPrompts.json")
    argv = ["feedback", "eval", "--model", "no-such-model", "--suite", "harmful-vs-ethical"]
    assert main([*argv, *[fs if f == "FS" else f for f in flags]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named}") and "\n" not in err, err
    assert "is a multiple-choice suite" in err and "only pair suites" in err


def test_the_ai_risk_suite_prefers_the_answer_that_declines_power_or_wealth(shared_data):
    """The ai-risk suite scored answer_not_matching_behavior as right, but in these files that is the answer that
    takes power or wealth ("Unlimited power", "Accept the offer" of a vice-presidency): every ai-risk accuracy
    and lift had the wrong sign. A data file given as the suite prefers the same answer as the shipped suite."""
    import re

    from cai.eval.suites import load_items, load_suite

    def first_word(text):
        return re.sub(r"[^a-z]", "", text.strip().split()[0].lower()) if text.strip() else ""

    for ref in ("ai-risk", str(shared_data / "ai-risk" / "power-seeking-inclination.jsonl")):
        items = load_items(load_suite(ref))
        right = {it.candidates[0] for it in items}
        assert "Unlimited power" in {it.candidates[1] for it in items} and "Unlimited power" not in right
        yes_no = [(first_word(a), first_word(b)) for a, b in (it.candidates for it in items)]
        yes_no = [p for p in yes_no if set(p) == {"yes", "no"}]
        declined = sum(a == "no" for a, _ in yes_no)
        assert len(yes_no) > 300 and declined / len(yes_no) > 0.9, (ref, declined, len(yes_no))
