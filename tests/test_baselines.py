"""Baselines and the statistics beside every score, on hand-made values: tie credit, the leave-one-out answer
prior, trivial baselines, the lift and its CI, the far-from-chance flag, the length correlation; Fisher's z,
the least-squares fit through the origin, Gao's over-optimisation form; PPO samples read back."""

from __future__ import annotations

import math

import pytest

from cai.credit import LONGER, SHORTER, credit
from cai.eval.baselines import (
    COMMON,
    UNTRAINED,
    answer_prior,
    compare,
    describe,
    length_correlation,
    trivial_hits,
)
from cai.report.klfit import fit_gao
from cai.report.overopt import gains, read_samples
from cai.runtime.rundir import append_jsonl
from cai.stats import correlation_ci, fit_through_origin


def test_credit_shares_ties():
    assert credit([0.3, 0.1], 0) == 1.0 and credit([0.3, 0.1], 1) == 0.0
    assert credit([0.2, 0.2], 0) == 0.5
    assert credit([1.0, 1.0, 1.0, 0.0], 2) == pytest.approx(1 / 3) and credit([1.0, 1.0, 1.0, 0.0], 3) == 0.0


def test_answer_prior_leaves_each_item_out():
    # "No" is right in items 0 and 1, "Yes" in item 2
    cands = [["No", "Yes"], ["Yes", "No"], ["Yes", "No"]]
    correct = [0, 1, 0]
    prior = answer_prior(cands, correct)
    # item 0 without itself: "No" right once of twice -> (1+1)/(2+2); "Yes" right once of twice -> same
    assert prior[0] == [pytest.approx(0.5), pytest.approx(0.5)]
    # item 2 without itself: "No" right 2 of 2 -> 3/4, "Yes" right 0 of 2 -> 1/4
    assert prior[2] == [pytest.approx(0.25), pytest.approx(0.75)]
    hits = trivial_hits(cands, correct, option_suite=True)
    assert hits[COMMON] == [0.5, 0.5, 0.0]  # the leave-one-out majority is wrong on item 2
    # an HH-style suite (every text unique) gets no vote from its own label: the prior ties
    assert trivial_hits([["a", "b"], ["c", "d"]], [0, 1], option_suite=True)[COMMON] == [0.5, 0.5]
    assert COMMON not in trivial_hits(cands, correct, option_suite=False)


def test_length_baselines_and_lift_with_its_ci():
    cands = [["a long answer", "no"], ["short", "a much longer reply"], ["same", "size"]]
    hits = trivial_hits(cands, [0, 1, 0], option_suite=False)
    assert hits[LONGER] == [1.0, 1.0, 0.5] and hits[SHORTER] == [0.0, 0.0, 0.5]
    model = [1.0, 0.0, 1.0]
    out = compare(model, {UNTRAINED: [1.0, 0.0, 0.0], **hits}, chance=0.5, seed=0)
    assert out["best_baseline"] == LONGER and out["baselines"][LONGER]["accuracy"] == pytest.approx(2.5 / 3)
    assert out["lift"]["value"] == pytest.approx((0.0 - 1.0 + 0.5) / 3)  # paired, item by item
    lo, hi = out["lift"]["ci95"]
    assert lo <= out["lift"]["value"] <= hi and out["lift"]["n"] == 3
    assert out["lift_untrained"]["value"] == pytest.approx(1 / 3)


def test_a_baseline_far_from_chance_is_flagged_and_described():
    base = {COMMON: [1.0] * 80 + [0.0] * 20, LONGER: [1.0] * 50 + [0.0] * 50}
    out = compare([1.0] * 81 + [0.0] * 19, base, chance=0.5, seed=0)
    assert out["baselines"][COMMON]["far_from_chance"] and not out["baselines"][LONGER]["far_from_chance"]
    assert len(out["flags"]) == 1 and "'most common answer' is far above chance" in out["flags"][0]
    assert out["lift"]["over"] == COMMON and out["lift"]["value"] == pytest.approx(0.01)
    lines, warnings = describe({"n": 100, **out})
    assert any(line.startswith("lift over the best baseline (most common answer): +0.010") for line in lines)
    assert warnings == out["flags"]


def test_length_correlation_warns_when_the_score_is_mostly_length():
    texts = ["x" * n for n in (5, 10, 20, 40, 80, 160)]
    assert length_correlation([1, 2, 3, 4, 5, 6], texts)["mostly_length"]
    low = length_correlation([3, 1, 4, 1, 5, 9], texts[::-1])
    assert not low["mostly_length"] and "warning" not in low and low["n"] == 6
    assert length_correlation([1, 1, 1], ["a", "bb", "ccc"])["r"] is None  # constant scores: undefined
    grouped = length_correlation(
        [1, 2, 3, 4, 5, 6, 7, 8], ["a" * i for i in range(1, 9)], [0, 0, 1, 1, 2, 2, 3, 3]
    )
    assert grouped["ci_method"] == "bootstrap over 4 prompts" and grouped["ci95"] == [1.0, 1.0]
    assert length_correlation([1, 2, 3], ["a", "bb", "ccc"], [0, 1, 2])["ci95"] is None  # under 4 clusters


def test_clustered_correlation_interval_covers_where_fishers_z_does_not():
    """Responses to one prompt share its effect on length and score (x = u + e, y = u + e', r = 0.5 overall, none
    within a prompt): over 8 samples to each of 30 prompts, Fisher's z over all 240 is too narrow, the bootstrap
    over prompts near its level. Seeded draws, 100 simulated runs."""
    import random

    from cai.stats import cluster_correlation_ci, correlation_ci, pearson

    rng, fisher, cluster = random.Random(1), 0, 0
    for run in range(100):
        a, b, g = [], [], []
        for prompt in range(30):
            u = rng.gauss(0, 1)
            for _ in range(8):
                a.append(u + rng.gauss(0, 1))
                b.append(u + rng.gauss(0, 1))
                g.append(prompt)
        lo, hi = correlation_ci(pearson(a, b), len(a))
        fisher += lo <= 0.5 <= hi
        lo, hi = cluster_correlation_ci(a, b, g, n_boot=300, seed=run)
        cluster += lo <= 0.5 <= hi
    assert fisher <= 85 and cluster >= 88, (fisher, cluster)


def test_fisher_interval_and_fit_through_origin_by_hand():
    lo, hi = correlation_ci(0.5, 28)  # atanh(0.5) = 0.5493, half width 1.96/5
    assert lo == pytest.approx(math.tanh(0.549306 - 0.391993), abs=1e-5)
    assert hi == pytest.approx(math.tanh(0.549306 + 0.391993), abs=1e-5)
    assert correlation_ci(0.5, 3) is None and correlation_ci(None, 50) is None
    f1, f2 = [1.0, 2.0, 3.0], [1.0, 0.0, -1.0]
    assert fit_through_origin(f1, f2, [2 * a + 3 * b for a, b in zip(f1, f2)]) == pytest.approx((2.0, 3.0))
    with pytest.raises(ValueError):
        fit_through_origin([1.0, 2.0], [2.0, 4.0], [1.0, 1.0])


def test_gao_form_recovers_its_parameters_and_the_peak():
    d = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    gain = [x * (1.2 - 0.4 * math.log(x)) if x > 0 else 0.0 for x in d]
    f = fit_gao([x * x for x in d], gain)
    assert (
        f["alpha"] == pytest.approx(1.2) and f["beta"] == pytest.approx(0.4) and f["r2"] == pytest.approx(1.0)
    )
    assert f["d_peak"] == pytest.approx(math.exp(1.2 / 0.4 - 1)) and f["kl_peak"] == pytest.approx(
        f["d_peak"] ** 2
    )
    rising = fit_gao([x * x for x in d], [0.5 * x for x in d])  # linear in d: no peak (beta = 0)
    assert rising["beta"] == pytest.approx(0.0, abs=1e-9) and rising["d_peak"] is None
    assert fit_gao([0.0, 0.0, 1.0], [0.0, 0.0, 1.0]) is None  # fewer than 3 points away from d = 0
    falling = fit_gao([x * x for x in d], [x * (-0.5 - 0.3 * math.log(x)) if x > 0 else 0.0 for x in d])
    assert (
        falling["alpha"] == pytest.approx(-0.5) and falling["d_peak"] is None
    )  # never rose: no peak to report


def test_samples_of_a_resumed_update_keep_the_last_block_and_gains_by_hand(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = lambda u, scores: [  # noqa: E731
        {"i": i, "update": u, "prompt_id": f"p{i}", "response": "r", "score": s} for i, s in enumerate(scores)
    ]
    append_jsonl(path, rows(1, [0.0, 2.0]) + rows(2, [9.0, 9.0]) + rows(2, [1.0, 3.0]) + rows(3, [4.0, 6.0]))
    got = read_samples(path)
    assert sorted(got) == [1, 2, 3] and [r["score"] for r in got[2]] == [1.0, 3.0]
    by_update = {u: [r["score"] for r in got[u]] for u in got}
    sd = math.sqrt(sum((x - 2.666667) ** 2 for x in [0, 2, 1, 3, 4, 6]) / 5)
    assert gains(by_update) == pytest.approx([0.0, 1.0 / sd, 4.0 / sd], rel=1e-5)


def test_an_uninformative_answer_text_scores_chance_and_is_never_flagged_below_it():
    """Each text right on exactly half the items: leaving an item out tipped the prior against its own right
    answer on every item (accuracy 0, 'far below chance'). Within one vote the candidates are tied."""
    cands, correct = [], []
    for i in range(200):
        c = ["Yes", "No"] if i % 3 else ["No", "Yes"]
        cands.append(c)
        correct.append(c.index("Yes" if i % 2 == 0 else "No"))
    hits = trivial_hits(cands, correct, option_suite=True)[COMMON]
    assert sum(hits) / len(hits) == pytest.approx(0.5)
    out = compare([0.5] * 200, {COMMON: [0.0] * 200}, chance=0.5)  # however it scores, never 'below chance'
    assert not out["baselines"][COMMON]["far_from_chance"] and out["flags"] == []
    # an informative text still decides: "No" right on 3 of 4 other items beats "Yes" by more than a vote
    cands = [["Yes", "No"]] * 5
    assert trivial_hits(cands, [1, 1, 1, 1, 0], option_suite=True)[COMMON] == [1.0, 1.0, 1.0, 1.0, 0.0]
    # ... and beside a text no other item has (its rate is the prior's 0.5, not a vote's reach from "Yes")
    cands = [["Yes", f"something else {i}"] for i in range(10)]
    hits = trivial_hits(cands, [0] * 7 + [1] * 3, option_suite=True)[COMMON]
    assert hits == [1.0] * 7 + [0.0] * 3


def test_baselines_get_wilson_intervals_and_a_small_lift_is_marked_unreliable():
    """A bootstrap of three equal hits is [1, 1]: the baseline looked far from chance at n = 3."""
    from cai.report.evalview import lift_cell
    from cai.stats import wilson_ci

    out = compare([1.0] * 3, {LONGER: [1.0] * 3, SHORTER: [0.0] * 3}, chance=0.5)
    assert (
        out["baselines"][LONGER]["ci95"] == list(wilson_ci(3, 3))
        and out["baselines"][LONGER]["ci95"][0] < 0.5
    )
    assert not any(r["far_from_chance"] for r in out["baselines"].values()) and out["flags"] == []
    assert out["lift"]["small_sample"] and out["lift"]["note"].startswith("unreliable: only 3 items")
    assert lift_cell(out["lift"]).endswith("(n = 3, small: unreliable)")
    lines, _ = describe({"n": 3, **out})
    assert any("lift over the best baseline" in line and "unreliable" in line for line in lines)
    big = compare([1.0] * 40, {LONGER: [1.0] * 20 + [0.0] * 20}, chance=0.5)
    assert "note" not in big["lift"] and big["baselines"][LONGER]["ci95"] == list(wilson_ci(20, 40))
