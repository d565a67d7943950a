"""Intervals of proportions over pairs that share a prompt (feedback.max_pairs_per_prompt > 1): clustered by
prompt (cai.stats.clustered_ci), so correlated pairs do not pass for independent ones; and every place that
shows such an interval (the PM's held-out accuracy, the labeller–PM agreement of online rounds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cai.stats import clustered_ci, wilson_ci


def _width(ci) -> float:
    return ci[1] - ci[0]


# ------------------------------------------------------------------------------------------- the pure function
def test_singletons_are_exactly_wilson():
    values = [1, 0, 1, 1, 0.5, 0, 1, 1, 1, 0]
    assert clustered_ci(values, list(range(len(values)))) == wilson_ci(sum(values), len(values))
    assert clustered_ci([], []) == wilson_ci(0, 0)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("items", [[1, 0, 1, 1, 0, 1, 1, 0], [1, 0.5, 0, 1, 1, 0.5], [1, 1, 1, 1], [0, 0, 0]])
def test_k_copies_of_m_items_give_the_interval_of_the_m_items(k, items):
    """Perfectly correlated duplicates carry no more information than one copy each (ties at 0.5 included; all
    equal credits too, where the data cannot say how correlated the copies are)."""
    values = [v for v in items for _ in range(k)]
    clusters = [j for j in range(len(items)) for _ in range(k)]
    got, alone = clustered_ci(values, clusters), wilson_ci(sum(items), len(items))
    assert got == pytest.approx(alone, abs=1e-9)
    assert _width(got) > _width(wilson_ci(sum(values), len(values)))  # the old, independent, interval


def test_more_correlation_within_prompts_gives_a_wider_interval():
    """12 prompts of 2 pairs, 12 hits of 24 each time: the more prompts whose two pairs agree, the wider."""
    widths = []
    for agree in range(0, 13, 2):  # `agree` prompts with equal credits (half 1-1, half 0-0), the rest 1-0
        values = [1, 1] * (agree // 2) + [0, 0] * (agree // 2) + [1, 0] * (12 - agree)
        clusters = [j for j in range(12) for _ in range(2)]
        assert sum(values) == 12
        widths.append(_width(clustered_ci(values, clusters)))
    assert widths == sorted(widths) and widths[-1] > widths[0]
    # pairs of a prompt that disagree are anti-correlated: deff is clamped at 1, never narrower than Wilson
    assert widths[0] == pytest.approx(_width(wilson_ci(12, 24)))
    assert widths[-1] == pytest.approx(_width(wilson_ci(6, 12)))


def test_one_cluster_and_bad_input():
    """One prompt says nothing about the spread between prompts: it counts once."""
    assert clustered_ci([1, 0, 1, 1], ["p"] * 4) == pytest.approx(wilson_ci(0.75, 1))
    with pytest.raises(ValueError):
        clustered_ci([1, 0], ["p"])


# --------------------------------------------------------------------------------------------- the call sites
def _pairs(n_prompts: int, per_prompt: int) -> list[dict]:
    """`per_prompt` copies of one pair for each prompt (perfectly correlated pairs), labels alternating sides."""
    rows = []
    for i in range(n_prompts):
        a, b = f"reply {i} yes sure.", f"reply {i} no never at all."
        for j in range(per_prompt):
            rows.append(
                {
                    "id": f"q{i}:{j}",
                    "prompt_id": f"q{i}",
                    "messages": [{"role": "user", "content": f"question {i}?"}],
                    "response_a": a if i % 2 else b,
                    "response_b": b if i % 2 else a,
                    "p_a": 0.9 if i % 3 else 0.1,
                }
            )
    return rows


@pytest.fixture(scope="module")
def tiny_pm(tiny_dir):
    from cai.runtime.models import load_model, load_tokenizer

    return load_model("tiny-random-llama", kind="seq_cls"), load_tokenizer(
        "tiny-random-llama", padding_side="right"
    )


def test_pm_held_out_accuracy_is_clustered_by_prompt(tiny_pm):
    """cai.pm.pairs.held_out_eval (the PM stage's eval.json, a round's pm_held_out): 2 copies of each pair of 6
    prompts give the interval of the 6; one pair per prompt, Wilson's."""
    from cai.pm.pairs import held_out_eval

    model, tok = tiny_pm
    res = held_out_eval(model, tok, _pairs(6, 2), max_length=64, batch_size=4)
    acc, n = res["accuracy"], res["n_scored"]
    assert (n, res["clusters"]) == (12, 6)
    assert res["ci95"] == pytest.approx(wilson_ci(acc * 6, 6), abs=1e-6)
    assert _width(res["ci95"]) > _width(wilson_ci(acc * n, n))
    one = held_out_eval(model, tok, _pairs(6, 1), max_length=64, batch_size=4)
    assert one["clusters"] == one["n_scored"] == 6
    assert one["ci95"] == pytest.approx(wilson_ci(one["accuracy"] * 6, 6), abs=1e-9)


def test_online_labeller_pm_agreement_is_clustered_by_prompt(tiny_pm, monkeypatch):
    """cai.rl.online.pm_agreement on a round's fresh pairs, 2 per prompt: the clustered interval and the prompts."""
    import cai.rl.online as online

    model, tok = tiny_pm
    monkeypatch.setattr(
        online, "RewardScorer", lambda pm_dir, settings: SimpleNamespace(model=model, tokenizer=tok)
    )
    cfg = SimpleNamespace(max_length=64, batch_size=4)
    out = online.pm_agreement("pm", None, cfg, _pairs(6, 2))
    assert (out["n"], out["clusters"]) == (12, 6)
    assert _width(out["ci95"]) > _width(wilson_ci(out["accuracy"] * 12, 12))
    one = online.pm_agreement("pm", None, cfg, _pairs(6, 1))
    assert one["ci95"] == pytest.approx(wilson_ci(one["accuracy"] * 6, 6), abs=1e-9)


def test_report_pm_table_shows_the_clustered_interval_and_the_prompts():
    """The report's PM table reads the interval from the stage's eval.json block and says how many prompts;
    a block of one pair per prompt, or a run from before (no block), shows Wilson's over pairs."""
    from cai.report.sections import _held_out

    t = {"held_out_accuracy": 0.75, "held_out_pairs": 40, "held_out_scored": 40}
    values = [1.0] * 30 + [0.0] * 10
    clusters = [j // 2 for j in range(40)]  # 2 equal pairs per prompt
    ci = clustered_ci(values, clusters)
    text = _held_out(t, block={"ci95": list(ci), "clusters": 20})
    assert text == f"0.750 [{ci[0]:.2f}, {ci[1]:.2f}] (n = 40 in 20 prompts, small)"
    assert _width(ci) > _width(wilson_ci(30, 40))
    lo, hi = wilson_ci(30, 40)
    plain = f"0.750 [{lo:.2f}, {hi:.2f}] (n = 40)"
    assert _held_out(t) == plain
    assert _held_out(t, block={"ci95": list(clustered_ci(values, range(40))), "clusters": 40}) == plain
    before = _held_out(t, "held_out_accuracy_before", {"ci95": [0.1, 0.9], "clusters": 20})
    assert before == "—"  # no accuracy before in this summary


def test_report_online_rounds_show_clustered_intervals():
    """The rounds table: round 1's PM accuracy from the PM stage's eval.json block, later rounds' from the round
    record, and the labeller–PM agreement, each with its prompts when pairs share them."""
    from cai.report.policies import _round_row

    pm_sum = {"held_out_accuracy": 0.75, "held_out_pairs": 40, "held_out_scored": 40}
    pm_held = {"accuracy": 0.75, "n": 40, "n_scored": 40, "ci95": [0.5, 0.9], "clusters": 20}
    first = _round_row({"round": 1}, {"pairs": 80}, pm_sum, pm_held)
    assert first[-1] == "0.750 [0.50, 0.90] (n = 40 in 20 prompts, small)"
    r2 = {
        "round": 2,
        "pairs": {"pairs": 24},
        "pm_held_out": {"accuracy": 0.5, "n": 14, "n_scored": 12, "ci95": [0.2, 0.8], "clusters": 6},
        "pm_agreement": {"accuracy": 0.5, "n": 12, "ci95": [0.25, 0.75], "clusters": 6},
    }
    row = _round_row(r2, None, pm_sum)
    assert row[-1] == "0.500 [0.20, 0.80] (n = 12 in 6 prompts, small)"  # n: the scored pairs
    assert row[-2] == "0.500 [0.25, 0.75] (n = 12 in 6 prompts, small)"
    lo, hi = wilson_ci(30, 40)
    assert (
        _round_row({"round": 1}, None, pm_sum)[-1] == f"0.750 [{lo:.2f}, {hi:.2f}] (n = 40)"
    )  # a run before
