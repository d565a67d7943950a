"""Arms that differ only in policy.seed, read together (cai.report.seeds), and the crossed bootstrap behind their
intervals (cai.stats.crossed_bootstrap_ci), on hand-made numbers."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

from cai.report import policies, seeds
from cai.stats import bootstrap_ci, crossed_bootstrap_ci


def _config(critic: str, seed: int, lr: float = 1e-4) -> dict:
    return {
        "settings": {"seed": seed, "device": "cpu"},  # as a manifest records it: policy.seed wins
        "policy": {"algorithm": "ppo", "seed": seed},
        "ppo": {"critic": critic, "learning_rate": lr},
    }


def test_arms_that_differ_only_in_their_seed_form_one_setting_named_by_what_differs():
    configs = {f"{c}-{s}": _config(c, s) for c in ("separate", "value_head") for s in (0, 1)}
    inputs = {a: ["RUN/sft", "RUN/preference_model"] for a in configs}
    groups = seeds.seed_groups(configs, inputs)
    assert groups == [
        ("ppo.critic=separate", {0: "separate-0", 1: "separate-1"}),
        ("ppo.critic=value_head", {0: "value_head-0", 1: "value_head-1"}),
    ]
    # an arm with its own SFT model is another setting, though its recipe keys match
    inputs["separate-1"] = ["RUN/arms/separate-1/sft", "RUN/preference_model"]
    groups = seeds.seed_groups(configs, inputs)
    assert [len(g) for _, g in groups] == [1, 1, 2]
    # ... and is told apart by the arm whose folders it reads, where its keys alone would repeat a label
    assert [label for label, _ in groups] == [
        "ppo.critic=separate (upstream of separate-0)",
        "ppo.critic=separate (upstream of separate-1)",
        "ppo.critic=value_head",
    ]
    # one seed per setting: nothing to read over seeds
    one = {a: c for a, c in configs.items() if a.endswith("-0")}
    assert seeds.seed_groups(one, inputs) == []
    # a seed given as the recipe's top-level seed (no policy.seed) counts the same
    top = {f"s{s}": {**_config("separate", s), "settings": {"seed": s}, "policy": {}} for s in (3, 4)}
    assert seeds.seed_groups(top, {a: [] for a in top}) == [("every arm", {3: "s3", 4: "s4"})]


def test_the_crossed_bootstrap_is_the_plain_one_for_one_row_and_wider_when_seeds_differ():
    rng = random.Random(0)
    row = [rng.gauss(0, 1) for _ in range(40)]
    assert crossed_bootstrap_ci([row]) == bootstrap_ci(row)
    # three seeds whose whole results sit apart (a seed effect of ±1): the prompts alone know nothing of it
    rows = [[x + shift for x in row] for shift in (-1.0, 0.0, 1.0)]
    lo, hi = crossed_bootstrap_ci(rows)
    plo, phi = bootstrap_ci([x for r in rows for x in r])
    assert hi - lo > 1.5 * (phi - plo)
    assert lo < sum(row) / len(row) < hi


def test_over_seeds_pairs_each_setting_with_the_first_by_seed_and_prompt():
    rng = random.Random(1)
    prompts = [f"p{i}" for i in range(12)]
    base = {s: {p: rng.gauss(0, 1) for p in prompts} for s in (0, 1, 2)}
    gains = {f"a{s}": base[s] for s in base} | {
        f"b{s}": {p: v + 0.5 for p, v in base[s].items()} for s in base
    }
    groups = [("x", {s: f"a{s}" for s in base}), ("y", {s: f"b{s}" for s in base})]
    kl = {"a0": 0.1, "a1": 0.3, "a2": 0.2, "b0": 0.4, "b1": 0.4, "b2": 0.4}
    rows = seeds.over_seeds(groups, gains, kl, {a: None for a in kl})
    assert "vs_first" not in rows[0]
    diff = rows[1]["vs_first"]
    assert abs(diff["mean"] - 0.5) < 1e-12 and diff["ci95"][0] > 0.49 and diff["ci95"][1] < 0.51
    assert (diff["seeds"], diff["prompts"]) == (3, 12)
    assert rows[0]["sqrt_kl"] == {"mean": (0.1 + 0.3 + 0.2) / 3, "min": 0.1, "max": 0.3, "n": 3}
    assert rows[0]["win_rate"] is None
    md = "\n".join(seeds.section(rows))
    assert "| y | b0, b1, b2 | " in md and "(3 seeds × 12 prompts)" in md and "− x's, paired by seed" in md
    assert seeds.section([]) == []


def test_the_report_reads_each_arm_s_manifest_and_its_prompt_by_prompt_gain(tmp_path):
    """policies._over_seeds: settings from the policy stages' manifests, gains final − SFT prompt by prompt."""
    dirs = {}
    for arm, critic, s in [("a0", "separate", 0), ("a1", "separate", 1), ("b0", "value_head", 0)]:
        d = dirs[arm] = tmp_path / arm
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"config": _config(critic, s)}))
    rep = SimpleNamespace(index=SimpleNamespace(stage_dir=lambda s, a=None: tmp_path / s))
    scores = {a: {"by_id": {"p0": 1.0 + i, "p1": 2.0}} for i, a in enumerate(dirs)}
    baseline = {a: {"by_id": {"p0": 0.5, "p1": 2.0, "p2": 9.0}} for a in dirs}
    kl = {a: {"mean": 0.04, "ci95": [0.01, 0.09], "n": 2} for a in dirs}
    wins = {"a0": {"win_rate": 0.5}, "a1": {"win_rate": 0.75}, "b0": None}
    rows = policies._over_seeds(rep, dirs, scores, baseline, kl, wins)
    assert [r["setting"] for r in rows] == ["ppo.critic=separate", "ppo.critic=value_head"]
    gain = rows[0]["gain"]
    assert abs(gain["mean"] - (0.5 + 0.0 + 1.5 + 0.0) / 4) < 1e-12 and gain["prompts"] == 2
    assert rows[0]["win_rate"]["mean"] == 0.625 and abs(rows[0]["sqrt_kl"]["mean"] - 0.2) < 1e-12
    assert rows[1]["vs_first"]["mean"] == (2.5 - 0.5) / 2 and rows[1]["vs_first"]["seeds"] == 1  # seed 0 only
