"""The sqrt(KL) fit on synthetic data with known a and b, the over-optimisation warning, and the CLI."""

from __future__ import annotations

import json
import math
import random

import pytest

from cai.cli.main import main
from cai.report.klfit import KL_K3, fit_sqrt_kl, kl_reward, overoptimisation
from cai.runtime.rundir import append_jsonl
from cai.stats import linear_fit


def _synthetic(a, b, n=40, noise=0.0, seed=0, kl_max=16.0):
    rng = random.Random(seed)
    kl = [kl_max * (i / (n - 1)) ** 2 for i in range(n)]
    return kl, [a + b * math.sqrt(k) + rng.gauss(0, noise) for k in kl]


def test_fit_recovers_known_a_and_b():
    kl, r = _synthetic(-0.7, 0.45)
    f = fit_sqrt_kl(kl, r)
    assert f["a"] == pytest.approx(-0.7, abs=1e-9) and f["b"] == pytest.approx(0.45, abs=1e-9)
    assert f["r2"] == pytest.approx(1.0) and f["n"] == 40
    kl, r = _synthetic(1.5, 0.3, n=200, noise=0.1, seed=1)
    f = fit_sqrt_kl(kl, r)
    assert f["a"] == pytest.approx(1.5, abs=0.05) and f["b"] == pytest.approx(0.3, abs=0.02)
    assert 0.8 < f["r2"] < 1.0
    assert overoptimisation(kl, r, f) is None


def test_linear_fit_by_hand_and_negative_kl_is_never_clamped():
    f = linear_fit([0.0, 1.0, 2.0], [1.0, 2.0, 4.0])  # b = 1.5, a = 5/6
    assert f["b"] == pytest.approx(1.5) and f["a"] == pytest.approx(5 / 6)
    assert f["r2"] == pytest.approx(1 - (1 / 36 + 1 / 9 + 1 / 36) / (14 / 3))
    with pytest.raises(ValueError, match="KL >= 0"):
        fit_sqrt_kl([-0.01, 1.0, 4.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError):
        linear_fit([1.0], [1.0])


def test_the_fit_uses_k3_and_leaves_negative_k1_out_with_a_note(tmp_path, capsys):
    """The quickstart's PPO log had objective/kl -0.099, -0.028, -0.025: they were fitted at sqrt(KL) = 0."""
    kl, r = _synthetic(0.2, 0.5, n=8)
    k1 = [-0.099, -0.028, -0.025] + kl[3:]  # the reward's k1 estimates: noisy, negative early on
    rows = [
        {"step": i, "objective/kl": a, "objective/kl_k3": b, "objective/score": s}
        for i, (a, b, s) in enumerate(zip(k1, kl, r))
    ]
    append_jsonl(tmp_path / "new" / "policy" / "metrics.jsonl", rows)
    old = [{k: v for k, v in row.items() if k != "objective/kl_k3"} for row in rows]  # a log from before k3
    append_jsonl(tmp_path / "old" / "ppo" / "metrics.jsonl", old)  # a run from before the rename
    assert (
        main(
            [
                "analyze",
                "kl-reward",
                str(tmp_path / "new"),
                str(tmp_path / "old"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    new_s, old_s = json.loads((tmp_path / "o" / "kl_reward.json").read_text())["series"]
    assert new_s["kl_key"] == "objective/kl_k3" and new_s["n"] == 8 and new_s["dropped"] == 0
    assert new_s["b"] == pytest.approx(0.5) and new_s["note"] is None
    assert old_s["kl_key"] == "objective/kl" and old_s["n"] == 5 and old_s["dropped"] == 3
    assert old_s["b"] == pytest.approx(0.5)  # the five non-negative points lie on the line; nothing sits at 0
    out = capsys.readouterr()
    assert "(KL: objective/kl_k3, k3 estimate (never negative))" in out.out
    assert (
        "3 of 8 updates have a negative KL estimate (objective/kl" in out.err
        and "left out of the fit" in out.err
    )


def test_warns_when_reward_flattens_or_falls_at_high_kl():
    kl = [0.25 * i * i for i in range(30)]  # sqrt(KL) from 0 to 7.25
    rising_then_flat = [min(math.sqrt(k), 3.0) for k in kl]
    assert "flattens" in overoptimisation(kl, rising_then_flat)
    rising_then_falling = [math.sqrt(k) if math.sqrt(k) < 4 else 8 - math.sqrt(k) for k in kl]
    assert "falls" in overoptimisation(kl, rising_then_falling)
    assert "does not rise" in overoptimisation(kl, [-0.1 * math.sqrt(k) for k in kl])
    assert overoptimisation(kl, [0.5 + 0.2 * math.sqrt(k) for k in kl]) is None


def test_cli_writes_png_and_json_for_runs_and_arms(tmp_path, capsys):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    kl, r = _synthetic(0.1, 0.5, n=12)
    append_jsonl(
        run_a / "policy" / "metrics.jsonl",
        [
            {"step": i, "objective/kl": k, "objective/score": s, "loss/policy": 0.1}
            for i, (k, s) in enumerate(zip(kl, r))
        ],
    )
    kl2, r2 = _synthetic(-0.2, 0.25, n=10)
    for arm in ("x", "y"):
        append_jsonl(
            run_b / "arms" / arm / "policy" / "metrics.jsonl",
            [{"step": i, "objective/kl": k, "objective/score": s} for i, (k, s) in enumerate(zip(kl2, r2))],
        )
    out = tmp_path / "out"
    assert main(["analyze", "kl-reward", str(run_a), str(run_b), "--out", str(out)]) == 0
    data = json.loads((out / "kl_reward.json").read_text())
    assert [s["label"] for s in data["series"]] == ["a", "b/x", "b/y"]
    assert data["series"][0]["a"] == pytest.approx(0.1) and data["series"][0]["b"] == pytest.approx(0.5)
    assert data["series"][2]["b"] == pytest.approx(0.25)
    png = (out / "kl_reward.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "score = 0.1 + 0.5·sqrt(KL)" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["analyze", "kl-reward", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["analyze", "kl-reward", str(tmp_path / "empty")]) == 2
    assert "no policy log found" in capsys.readouterr().err
    assert not kl_reward.__doc__.startswith(" ")


def test_a_run_directory_gives_its_current_arms_in_recipe_order(tmp_path, root, monkeypatch):
    from cai.config.load import load_recipe
    from cai.report.klfit import find_ppo_logs
    from cai.runtime.rundir import write_json

    monkeypatch.chdir(root)
    run = tmp_path / "run"
    recipe = load_recipe(root / "recipes/tiny.yaml", ["sweep={ppo.kl_coef: [0.2, 0.02]}"])
    write_json(run / "recipe.json", recipe.model_dump(mode="json"))
    for d in (
        "policy",
        "arms/kl_coef=0.02/policy",
        "arms/kl_coef=0.2/ppo",
        "arms/old/policy",
    ):  # stale: policy/, old/
        append_jsonl(run / d / "metrics.jsonl", [{"step": 1, "objective/kl": 0.1, "objective/score": 0.2}])
    assert [label for label, _ in find_ppo_logs(run)] == ["kl_coef=0.2", "kl_coef=0.02"]


def test_online_rounds_are_fitted_over_the_last_round_with_a_note(tmp_path):
    """Each online round's PM is retrained, so its raw scores are not comparable with another round's: a fit over
    every round read round 2's higher scale as a steep gain."""
    from cai.report.klfit import analyze_logs

    rows = [
        {
            "step": s,
            "round": 1 if s <= 6 else 2,
            KL_K3: 0.1 * s,
            "objective/score": (3.0 if s > 6 else 0.0) + 0.01 * s,
        }
        for s in range(1, 13)
    ]
    append_jsonl(tmp_path / "metrics.jsonl", rows)
    s = analyze_logs([("run", tmp_path / "metrics.jsonl")])[0]
    assert s["n"] == 6 and s["round"] == 2 and s["kl"] == pytest.approx([0.1 * k for k in range(7, 13)])
    assert s["fit"]["b"] < 0.2 and "the fit uses only the last round (2)" in s["note"]
    append_jsonl(
        tmp_path / "one.jsonl", [{KL_K3: 0.1 * k, "objective/score": k, "step": k} for k in range(1, 5)]
    )
    one = analyze_logs([("one", tmp_path / "one.jsonl")])[0]
    assert one["note"] is None and one["round"] is None and one["n"] == 4


def test_the_proxy_curve_of_online_rounds_uses_the_last_round(tmp_path):
    from types import SimpleNamespace

    from cai.report import overopt
    from cai.runtime.rundir import SAMPLES

    log = [{"step": s, "round": 1 if s <= 3 else 2, KL_K3: 0.1 * s} for s in range(1, 7)]
    append_jsonl(tmp_path / "metrics.jsonl", log)
    samples = [
        {
            "update": s,
            "i": i,
            "prompt_id": f"p{i}",
            "response": "x" * (i + 1),
            "score": (5.0 if s > 3 else 0.0) + i,
        }
        for s in range(1, 7)
        for i in range(4)
    ]
    append_jsonl(tmp_path / SAMPLES, samples)
    rep = SimpleNamespace(index=SimpleNamespace(stage_dir=lambda s, a=None: None))
    res = overopt._analyse(rep, None, tmp_path)
    assert res["proxy"]["kl"] == pytest.approx([0.4, 0.5, 0.6]) and res["proxy"]["gain"] == [0.0, 0.0, 0.0]
    assert res["length_proxy"]["n"] == 12 and "proxy curve and its length check" in res["note"]


def test_slope_interval_uses_t_with_n_minus_2_degrees_of_freedom():
    from cai.stats import slope_ci

    fit = linear_fit([0.0, 1.0, 2.0, 3.0, 4.0], [0.1, 0.9, 2.2, 2.8, 4.1])
    lo, hi = slope_ci(fit)
    assert (lo + hi) / 2 == pytest.approx(fit["b"]) and (hi - lo) / 2 == pytest.approx(3.182 * fit["se_b"])
    assert slope_ci(linear_fit([0.0, 1.0], [0.0, 1.0])) is None  # two points: no interval
    wide = {"b": 0.0, "se_b": 1.0, "n": 42}  # 40 degrees of freedom: t = 2.021
    assert slope_ci(wide)[1] == pytest.approx(2.021, abs=1e-3)


def test_metrics_files_get_a_default_out_and_distinct_labels(tmp_path, capsys):
    """A metrics.jsonl target without --out crashed (NotADirectoryError: FILE/analysis); two logs given by path
    were both labelled 'metrics.jsonl'. The fit's b now comes with its 95% interval."""
    kl, r = _synthetic(0.1, 0.5, n=8)
    rows = [{"step": i, KL_K3: k, "objective/score": s} for i, (k, s) in enumerate(zip(kl, r))]
    for d in ("x/a/policy", "x/b/policy", "y/b/policy"):
        append_jsonl(tmp_path / d / "metrics.jsonl", rows)
    log = tmp_path / "x/a/policy/metrics.jsonl"
    assert main(["analyze", "kl-reward", str(log)]) == 0
    assert (tmp_path / "x/a/policy/analysis/kl_reward.json").is_file()
    assert "score = 0.1 + 0.5·sqrt(KL) (b 95% CI 0.5 to 0.5)" in capsys.readouterr().out
    logs = [str(tmp_path / d / "metrics.jsonl") for d in ("x/a/policy", "x/b/policy", "y/b/policy")]
    assert main(["analyze", "kl-reward", *logs, "--out", str(tmp_path / "o")]) == 0
    data = json.loads((tmp_path / "o" / "kl_reward.json").read_text())
    assert [s["label"] for s in data["series"]] == ["a", "x/b", "y/b"]
    assert data["series"][0]["b_ci95"] == pytest.approx([0.5, 0.5])


def test_bad_log_lines_are_one_line_errors_but_a_torn_last_line(tmp_path, capsys):
    """A PNG or a non-UTF-8 line crashed with UnicodeDecodeError, a JSON line that is not an object with
    AttributeError; one bad line in the middle silently dropped every update after it. Only a torn last line
    (a kill mid-write: no newline) is left out."""
    from cai.runtime.rundir import read_jsonl

    kl, r = _synthetic(0.1, 0.5, n=8)
    good = "".join(json.dumps({KL_K3: k, "objective/score": s}) + "\n" for k, s in zip(kl, r))
    cases = {
        "png": (b"\x89PNG\r\n\x1a\n\x00\x00", r"png/metrics.jsonl:1: not UTF-8 text"),
        "latin1": (good.encode() + b"\xff\xfe\n", r"latin1/metrics.jsonl:9: not UTF-8 text"),
        "array": ((good + "[1, 2]\n").encode(), r"array/metrics.jsonl:9: an array; expected one JSON object"),
        "middle": ((good[:40] + "\n" + good).encode(), r"middle/metrics.jsonl:1: not valid JSON"),
    }
    for name, (raw, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_bytes(raw)
        assert main(["analyze", "kl-reward", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err.replace("\\", "/"), err
    (tmp_path / "torn.jsonl").write_text(good + good[:30])
    assert len(read_jsonl(tmp_path / "torn.jsonl")) == 8


def test_rows_appended_after_a_torn_last_line_start_on_a_line_of_their_own(tmp_path):
    """A kill mid-write leaves a torn last line; the resumed run's next append joined it, which reads as one bad
    line in the middle (now a refusal, before a silent loss of every later row)."""
    from cai.runtime.rundir import append_jsonl, read_jsonl

    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, [{"step": 1}, {"step": 2}])
    log.write_bytes(log.read_bytes() + b'{"step": 3, "loss"')  # killed while writing step 3
    append_jsonl(log, [{"step": 3}, {"step": 4}])
    assert read_jsonl(log) == [{"step": s} for s in (1, 2, 3, 4)]


def test_each_label_keeps_its_colour_in_every_curve_panel(tmp_path, monkeypatch):
    """DPO logs no policy/clipfrac: in that panel the arms after it took the next colour of the cycle, so an
    arm's colour changed from panel to panel of ppo_curves.png."""
    import matplotlib.figure

    from cai.plots import curves_png

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))
    )
    on_policy = {"objective/score": ([1, 2], [0.1, 0.2]), "policy/clipfrac": ([1, 2], [0.0, 0.1])}
    data = {
        "ppo": on_policy,
        "dpo": {"objective/score": ([0, 2], [0.1, 0.3])},
        "rloo": on_policy,
        "online": on_policy,
    }
    panels = [("objective/score", "PM score"), ("policy/clipfrac", "clip fraction")]
    assert curves_png(tmp_path / "curves.png", panels, data)
    (fig,) = figures
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes[:2]]
    assert set(colours[0]) == set(data) and set(colours[1]) == {"ppo", "rloo", "online"}
    assert all(colours[1][label] == colours[0][label] for label in colours[1])
    assert len(set(colours[0].values())) == len(data)


def test_the_fit_table_counts_points_and_says_they_are_a_dpo_runs_probes(tmp_path):
    """The row said "updates" and gave DPO's 3 probes though DPO took 4 steps; the curve panel called the raw
    objective/score "PM score (reward)" though objective/reward is another number (normalised score − β·Σ KL)."""
    from types import SimpleNamespace

    from cai.report.sections import PPO_PANELS, ppo_section

    kl, r = _synthetic(0.1, 0.5, n=4)
    rows = [
        {"step": 2 * i, "objective/kl_k3": k, "objective/score": s} for i, (k, s) in enumerate(zip(kl, r))
    ]
    append_jsonl(tmp_path / "run" / "policy" / "metrics.jsonl", rows)
    index = SimpleNamespace(stage_dir=lambda stage, arm: tmp_path / "run" / stage)
    rep = SimpleNamespace(arms=[None], label=lambda a: "dpo", out=tmp_path / "out", data={}, index=index)
    md = "\n".join(ppo_section(rep))
    assert "| points (PPO/RLOO/GRPO: updates; DPO: probes) | 4 |" in md
    assert "| updates |" not in md
    title = dict(PPO_PANELS)["objective/score"]
    assert title == "PM score (raw, not the reward)"
