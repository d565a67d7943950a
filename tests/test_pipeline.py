"""`cai run`: skipping, reruns on config change, --only/--from, resume, arms and sweeps, trackers, summary.

Most tests swap the stage modules for small stand-ins (fast, and they record what ran and with what);
one test runs the real tiny recipe end to end.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest

from cai import pipeline
from cai.config.layout import STAGES, inputs_of, plan, stage_view
from cai.config.load import load_recipe, load_run_recipe
from cai.errors import UserError
from cai.runtime.rundir import read_jsonl, read_manifest

BODY = ["critique_revise", "sft", "feedback", "preference_model", "policy"]


class FakeStages:
    """Stand-ins that write an output depending on their config and inputs, and record every call."""

    def __init__(self, run_dir: Path, fail_once: set[str] | None = None):
        self.run_dir = run_dir
        self.calls: list[str] = []
        self.ctxs: dict[str, object] = {}
        self.fail_once = set(fail_once or ())
        self.vary: set[str] = set()  # stages whose output differs on every call (not reproducible)

    def load(self, stage: str):
        def run(ctx):
            key = str(ctx.out_dir.relative_to(self.run_dir))
            self.calls.append(key)
            self.ctxs[key] = ctx
            parts = [json.dumps(ctx.config.fingerprint_dict(), sort_keys=True)]
            for name, d in sorted(ctx.inputs.items()):
                parts.append(f"{name}:{(d / 'out.txt').read_text() if (d / 'out.txt').is_file() else '-'}")
            partial = ctx.out_dir / "partial.txt"
            if stage in self.fail_once:
                self.fail_once.discard(stage)
                partial.write_text("half")
                raise RuntimeError("killed half-way")
            resumed = partial.is_file()
            text = str(hash("|".join(parts))) + (f"#{len(self.calls)}" if stage in self.vary else "")
            (ctx.out_dir / "out.txt").write_text(text)
            for name in STAGES[stage].outputs:  # what the output id hashes: the same text
                out = ctx.out_dir / name if "." in name else ctx.out_dir / name / "out.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"text": text}) + "\n" if name.endswith(".jsonl") else text)
            if stage == "feedback":
                rows = read_jsonl(ctx.shared_path("responses.jsonl"))
                if not rows:
                    (ctx.shared_path("responses.jsonl")).write_text('{"id": "p0-0", "text": "sampled"}\n')
                    ctx.summary["sampled"] = 1
                else:
                    ctx.summary["sampled"] = 0
            ctx.metrics().log({"loss": 1.0 / (1 + len(self.calls))}, step=1)
            ctx.summary.update(resumed=resumed, calls=len(self.calls))

        return types.SimpleNamespace(run=run)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    stages = FakeStages(tmp_path / "run")
    monkeypatch.setattr(pipeline, "_load_stage", stages.load)
    return stages


@pytest.fixture
def recipe(tmp_path, root, monkeypatch):
    monkeypatch.chdir(root)

    def make(*overrides: str, path: str = "recipes/tiny.yaml"):
        return load_recipe(root / path, [f"run_dir={tmp_path / 'run'}", *overrides])

    return make


def test_rerun_skips_every_stage_whose_manifest_matches(fake, recipe, capsys):
    m_recipe = recipe()
    rdir = pipeline.run(m_recipe, quiet=True)
    assert fake.calls == BODY + ["report"]
    for s in BODY + ["report"]:
        m = read_manifest(rdir / s)
        assert m["status"] == "complete" and m["fingerprint"] and m["output"] and "seconds" in m
        # the gold judge is off; PPO with a PM reward reads the PM, not the feedback pairs
        assert m["inputs"].keys() == set(inputs_of(m_recipe, s)) - {"gold"}
    fake.calls.clear()
    capsys.readouterr()
    pipeline.run(recipe())
    assert fake.calls == []
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 6
    assert "0 stage(s) ran, 6 skipped" in out
    summary = json.loads((rdir / "summary.json").read_text())
    assert [r["status"] for r in summary["stages"]] == ["skipped"] * 6


def test_config_change_reruns_the_stage_and_everything_downstream(fake, recipe):
    pipeline.run(recipe(), quiet=True)
    fake.calls.clear()
    pipeline.run(recipe("ppo.kl_coef=0.2"), quiet=True)
    assert fake.calls == ["policy", "report"]
    fake.calls.clear()
    pipeline.run(recipe("ppo.kl_coef=0.2", "sft.learning_rate=0.01"), quiet=True)
    assert fake.calls == ["sft", "feedback", "preference_model", "policy", "report"]
    fake.calls.clear()
    pipeline.run(recipe("ppo.kl_coef=0.2", "sft.learning_rate=0.01"), quiet=True)
    assert fake.calls == []


def test_feedback_sampling_from_the_base_model_does_not_read_the_sft_output(fake, recipe):
    """With `feedback.policy: base` the stage samples from models.policy: a retrained SFT model reruns the
    policy stage (its reference) but not the labelled pairs and the PM."""
    pipeline.run(recipe("feedback.policy=base"), quiet=True)
    assert "sft" not in fake.ctxs["feedback"].inputs
    fake.calls.clear()
    pipeline.run(recipe("feedback.policy=base", "sft.learning_rate=0.01"), quiet=True)
    assert fake.calls == ["sft", "policy", "report"]


def test_the_dtype_of_saved_models_reruns_only_the_stages_that_save_one(fake, recipe):
    """critique_revise writes no model: a new save_dtype reran its generation. The stages that save (and those
    reading what they saved) rerun."""
    pipeline.run(recipe(), quiet=True)
    fake.calls.clear()
    pipeline.run(recipe("save_dtype=bfloat16"), quiet=True)
    assert fake.calls == ["sft", "feedback", "preference_model", "policy", "report"]
    assert fake.ctxs["feedback"].config.settings.save_dtype == "float32"  # not its to read
    assert fake.ctxs["sft"].config.settings.save_dtype == "bfloat16"


def test_only_and_from(fake, recipe, tmp_path, capsys):
    with pytest.raises(UserError, match="'feedback' needs 'critique_revise'"):
        pipeline.run(recipe(), only=["feedback"], quiet=True)
    pipeline.run(recipe(), quiet=True)
    fake.calls.clear()
    capsys.readouterr()
    pipeline.run(recipe(), only=["sft"])
    assert fake.calls == []  # --only runs a stage that is out of date; this one is not
    out = capsys.readouterr().out
    assert "sft: up to date, skipped" in out and "--force reruns it" in out
    pipeline.run(recipe(), only=["sft"], force=True, quiet=True)
    assert fake.calls == ["sft"]  # --force reruns it, nothing else
    fake.calls.clear()
    pipeline.run(recipe(), quiet=True)  # it wrote the same files: everything downstream is still fresh
    assert fake.calls == []
    pipeline.run(recipe(), start="preference_model", quiet=True)
    assert fake.calls == []
    pipeline.run(recipe(), start="preference_model", force=True, quiet=True)
    assert fake.calls == ["preference_model", "policy", "report"]
    with pytest.raises(UserError, match="unknown stage 'sfx'"):
        pipeline.run(recipe(), only=["sfx"], quiet=True)


def test_a_rerun_that_writes_different_files_makes_what_follows_stale(fake, recipe):
    fake.vary = {"sft"}
    pipeline.run(recipe(), quiet=True)
    fake.calls.clear()
    pipeline.run(recipe(), only=["sft"], force=True, quiet=True)
    assert fake.calls == ["sft"]
    fake.calls.clear()
    pipeline.run(recipe(), quiet=True)
    assert fake.calls == ["feedback", "preference_model", "policy", "report"]


def test_what_reads_an_out_of_date_stage_is_listed_out_of_date_too(fake, recipe, capsys):
    """A changed SFT setting with `--only critique_revise`: the summary listed sft alone as out of date, though
    everything that reads it (and the report, printed as if current) is out of date with it."""
    pipeline.run(recipe(), quiet=True)
    (fake.run_dir / "report" / "report.md").write_text("the report\n")  # the fake report stage writes none
    capsys.readouterr()
    pipeline.run(recipe("sft.learning_rate=0.5"), only=["critique_revise"])
    out = capsys.readouterr().out
    assert "out of date (not selected): sft, feedback, preference_model, policy, report" in out
    assert "report.md (out of date: the stages it reads changed and it was not rebuilt)" in out
    pipeline.run(recipe(), only=["critique_revise"])
    assert "out of date" not in capsys.readouterr().out


def test_contradictory_or_impossible_selections_are_errors(fake, recipe):
    with pytest.raises(UserError, match="--only sft and --from policy contradict each other"):
        pipeline.run(recipe(), only=["sft"], start="policy", quiet=True)
    with pytest.raises(UserError, match="--only policy: stage 'policy' is not in this recipe's stages"):
        pipeline.run(recipe("stages=[critique_revise, sft]"), only=["policy"], quiet=True)
    with pytest.raises(UserError, match="--from report: stage 'report' is not in"):
        pipeline.run(recipe("stages=[critique_revise, sft]"), start="report", quiet=True)
    with pytest.raises(UserError, match="--from gold: the stage is off; set gold.enabled: true"):
        pipeline.run(recipe(), start="gold", quiet=True)  # was a ValueError traceback
    assert fake.calls == []


def test_output_ids_hash_content_not_time(tmp_path):
    from cai.hashing import hash_outputs

    d = tmp_path / "stage"
    (d / "model").mkdir(parents=True)
    (d / "model" / "w.bin").write_bytes(b"\x00\x01")
    (d / "stats.json").write_text(json.dumps({"n": 3, "timing": {"gen": {"seconds": 1.5, "items": 3}}}))
    (d / "metrics.jsonl").write_text('{"time/generate": 0.1}\n')
    first = hash_outputs(d, ("model", "stats.json"))
    (d / "stats.json").write_text(json.dumps({"n": 3, "timing": {"gen": {"seconds": 9.0, "items": 3}}}))
    (d / "metrics.jsonl").write_text('{"time/generate": 0.7}\n')
    assert hash_outputs(d, ("model", "stats.json")) == first  # timings and logs are not outputs
    (d / "model" / "w.bin").write_bytes(b"\x00\x02")
    assert hash_outputs(d, ("model", "stats.json")) != first
    assert hash_outputs(d, ("absent",)) != hash_outputs(d, ("model",))


def test_an_interrupted_stage_resumes_in_place_and_a_changed_one_starts_clean(fake, recipe, capsys):
    fake.fail_once = {"sft"}
    with pytest.raises(RuntimeError):
        pipeline.run(recipe(), quiet=True)
    rdir = fake.run_dir
    assert read_manifest(rdir / "sft")["status"] == "failed"
    assert (rdir / "sft" / "partial.txt").is_file()
    fake.calls.clear()
    pipeline.run(recipe(), quiet=True)
    assert fake.calls == BODY[1:] + ["report"]
    assert "resuming an interrupted run" in capsys.readouterr().out
    m = read_manifest(rdir / "sft")
    assert m["status"] == "complete" and m["resumed"] and m["summary"]["resumed"]  # partial output kept
    # a stage killed under another config does not resume the stale partial output
    fake.fail_once = {"policy"}
    with pytest.raises(RuntimeError):
        pipeline.run(recipe("ppo.kl_coef=0.3"), quiet=True)
    pipeline.run(recipe("ppo.kl_coef=0.4"), quiet=True)
    assert read_manifest(rdir / "policy")["summary"]["resumed"] is False


def test_sweep_expands_into_arms_that_share_upstream_stages(fake, recipe):
    r = recipe("sweep={ppo.kl_coef: [0.02, 0.1]}")
    layout = pipeline.plan(r, fake.run_dir)
    assert list(layout.arms) == ["kl_coef=0.02", "kl_coef=0.1"]
    assert layout.arms["kl_coef=0.1"].ppo.kl_coef == 0.1
    assert [u.key for u in layout.units.values()] == BODY[:4] + [
        "arms/kl_coef=0.02/policy",
        "arms/kl_coef=0.1/policy",
        "report",
    ]
    assert layout.stage_dir("sft", "kl_coef=0.1") == fake.run_dir / "sft"
    pipeline.run(r, quiet=True)
    assert fake.calls == BODY[:4] + ["arms/kl_coef=0.02/policy", "arms/kl_coef=0.1/policy", "report"]
    assert set(read_manifest(fake.run_dir / "report")["inputs"]) == {u for u in fake.calls if u != "report"}
    summary = json.loads((fake.run_dir / "summary.json").read_text())
    assert set(summary["seconds_by_arm"]) == {"shared", "kl_coef=0.02", "kl_coef=0.1", "report"}
    fake.calls.clear()
    pipeline.run(r, quiet=True, arms=["kl_coef=0.1"], start="policy", force=True)
    assert fake.calls == ["arms/kl_coef=0.1/policy", "report"]
    fake.calls.clear()  # --arm with --force reruns that arm's own stages, not the shared ones before them
    pipeline.run(r, quiet=True, arms=["kl_coef=0.1"], force=True)
    assert fake.calls == ["arms/kl_coef=0.1/policy", "report"]


def test_a_sweep_over_the_policy_seed_shares_every_stage_before_the_policy(fake, recipe):
    """Repeating one setting over seeds: only the policy stage runs per seed, and it (not the report) gets it."""
    r = recipe("seed=7", "sweep={policy.seed: [0, 1]}")
    pipeline.run(r, quiet=True)
    assert fake.calls == BODY[:4] + ["arms/seed=0/policy", "arms/seed=1/policy", "report"]
    assert [fake.ctxs[f"arms/seed={s}/policy"].config.settings.seed for s in (0, 1)] == [0, 1]
    assert fake.ctxs["sft"].config.settings.seed == 7
    assert fake.ctxs["report"].config.settings.seed == 7
    outs = {(fake.run_dir / f"arms/seed={s}/policy/out.txt").read_text() for s in (0, 1)}
    assert len(outs) == 2  # the seed is in the policy stage's fingerprint
    fake.calls.clear()
    pipeline.run(recipe("seed=7", "policy.seed=3"), quiet=True)  # without a sweep: the stages before it stand
    assert fake.calls == ["policy", "report"]
    assert fake.ctxs["policy"].config.settings.seed == 3


def test_arms_share_a_later_stage_that_reads_no_stage_they_differ_in(fake, recipe):
    """Arms shared only the stages before the first one that differs: a sweep over SFT settings with feedback
    sampling the base model labelled the same pairs and trained the same PM once per arm."""
    r = recipe("feedback.policy=base", "sweep={sft.learning_rate: [0.001, 0.01]}")
    arms = [f"arms/learning_rate={x}" for x in ("0.001", "0.01")]
    pipeline.run(r, quiet=True)
    assert fake.calls == ["critique_revise", "feedback", "preference_model"] + [
        f"{a}/{s}" for a in arms for s in ("sft", "policy")
    ] + ["report"]
    layout = pipeline.plan(r, fake.run_dir)
    assert layout.units[f"{arms[1]}/policy"].inputs["preference_model"] == "preference_model"
    assert layout.units[f"{arms[1]}/policy"].inputs["sft"] == f"{arms[1]}/sft"
    # feedback that samples the SFT model reads the stage the arms differ in: one per arm, as before
    per_arm = pipeline.plan(recipe("sweep={sft.learning_rate: [0.001, 0.01]}"), fake.run_dir)
    assert [k for k in per_arm.units if k.endswith("feedback")] == [f"{a}/feedback" for a in arms]


def _arms_recipe(recipe, tmp_path, root):
    gfh = tmp_path / "gfh.yaml"
    shutil.copy(root / "constitutions/good-for-humanity.yaml", gfh)
    return recipe(*_arms_args(gfh)), gfh


def test_arms_share_responses_and_a_changed_constitution_reruns_only_that_arm(fake, recipe, tmp_path, root):
    r, gfh = _arms_recipe(recipe, tmp_path, root)
    pipeline.run(r, quiet=True)
    own = ["feedback", "preference_model", "policy"]
    assert fake.calls == ["critique_revise", "sft"] + [f"arms/specific/{s}" for s in own] + [
        f"arms/general/{s}" for s in own
    ] + ["report"]
    caches = {k: fake.ctxs[k].cache_dir for k in ("arms/specific/feedback", "arms/general/feedback")}
    assert len(set(caches.values())) == 1 and next(iter(caches.values())).parent == fake.run_dir / "shared"
    assert read_manifest(fake.run_dir / "arms/specific/feedback")["summary"]["sampled"] == 1
    assert (
        read_manifest(fake.run_dir / "arms/general/feedback")["summary"]["sampled"] == 0
    )  # reused the pairs
    fake.calls.clear()  # a comment, the layout and the quoting are not what the constitution says: nothing reruns
    text = gfh.read_text()
    gfh.write_text(
        "# edited\n" + text.replace("name: good-for-humanity", "name: 'good-for-humanity'  # same")
    )
    pipeline.run(r, quiet=True)
    assert fake.calls == []
    gfh.write_text(text.replace("best for humanity as a whole", "best for everyone"))  # a principle's words
    pipeline.run(r, quiet=True)
    assert fake.calls == [f"arms/general/{s}" for s in own] + ["report"]
    assert fake.ctxs["arms/general/feedback"].cache_dir == caches["arms/general/feedback"]
    # a sampling setting is part of the cache key: new responses, for both arms
    fake.calls.clear()
    pipeline.run(recipe(*_arms_args(gfh), "feedback.responses_per_prompt=3"), quiet=True)
    assert fake.ctxs["arms/general/feedback"].cache_dir != caches["arms/general/feedback"]


def _arms_args(gfh):
    return (
        "arms=[{name: specific, set: {feedback_constitution: constitutions/harmless-specific.yaml}},"
        f" {{name: general, set: {{feedback_constitution: {gfh}}}}}]",
    )


def test_arm_and_sweep_keys_are_validated(recipe, tmp_path):
    rdir = tmp_path / "run"
    with pytest.raises(
        UserError, match=r"arms\.0 \(a\)\.ppo\.kl_cof: unknown key 'ppo\.kl_cof'; did you mean 'kl_coef'"
    ):
        pipeline.plan(recipe("arms=[{name: a, set: {ppo.kl_cof: 0.1}}]"), rdir)
    with pytest.raises(UserError, match="cannot differ between arms"):
        pipeline.plan(recipe("arms=[{name: a, set: {run_dir: x}}]"), rdir)
    # read only by the one report or the one gold judge: an arm's value was silently ignored
    for key, value in (
        ("report.win_rate_prompts", 2),
        ("models.judge", "tiny-random-llama"),
        ("gold.enabled", "true"),
    ):
        with pytest.raises(
            UserError, match=f"'{key}' cannot differ between arms .the report and the gold judge"
        ):
            pipeline.plan(recipe(f"arms=[{{name: a, set: {{{key}: {value}}}}}]"), rdir)
    with pytest.raises(UserError, match="'gold.max_steps' cannot differ"):
        pipeline.plan(recipe("sweep={gold.max_steps: [1, 2]}"), rdir)
    with pytest.raises(UserError, match="used twice"):
        pipeline.plan(recipe("arms=[{name: a}, {name: a}]"), rdir)
    with pytest.raises(UserError, match="must use only"):
        pipeline.plan(recipe("arms=[{name: a/b}]"), rdir)
    with pytest.raises(UserError, match=r"sweep\.ppo\.kl_coef: a non-empty list"):
        pipeline.plan(recipe("sweep={ppo.kl_coef: []}"), rdir)
    with pytest.raises(UserError, match=r"ppo\.kl_coef: Input should be"):
        pipeline.plan(recipe("sweep={ppo.kl_coef: [-1]}"), rdir)
    # names from values: a file path gives its stem; arms × sweep points
    layout = pipeline.plan(
        recipe(
            "arms=[{name: a}, {name: b, set: {ppo: {updates: 3}}}]",
            "sweep={feedback_constitution: [x/gfh.yaml, y/hs.yaml]}",
        ),
        rdir,
    )
    assert list(layout.arms) == ["a_gfh", "a_hs", "b_gfh", "b_hs"]
    assert (
        layout.arms["b_hs"].ppo.updates == 3 and layout.arms["b_hs"].ppo.kl_coef == 0.05
    )  # merged, not replaced


def test_tracker_gets_live_and_replayed_metrics_with_stage_prefixes(fake, recipe, monkeypatch):
    from cai.runtime import runlog

    class Fake:
        def __init__(self):
            self.logged, self.finished = [], False

        def log(self, values, step=None):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    tracker = Fake()
    monkeypatch.setattr(pipeline, "make_tracker", lambda recipe, rdir: tracker)
    monkeypatch.setattr(
        "cai.preflight.tracker_problem", lambda name: None
    )  # as if tensorboard were installed
    pipeline.run(recipe("tracker=tensorboard"), quiet=True)
    keys = {k for _, v in tracker.logged for k in v}
    assert {"sft/loss", "policy/loss", "report/loss"} <= keys and tracker.finished
    # a stage that writes metrics.jsonl itself gets replayed after it finishes
    t2 = runlog.StageTracker(tracker, "arms/x/policy")
    p = fake.run_dir / "m.jsonl"
    p.write_text('{"step": 3, "objective/kl": 0.5, "note": "text"}\n')
    t2.replay_if_silent(p)
    assert tracker.logged[-1] == (3, {"arms/x/policy/objective/kl": 0.5})


def test_tensorboard_without_the_package_is_a_user_error(recipe, tmp_path):
    import importlib.util

    from cai.runtime import runlog

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    with pytest.raises(UserError, match="pip install tensorboard"):
        runlog.make_tracker(recipe("tracker=tensorboard"), tmp_path)
    assert runlog.make_tracker(recipe(), tmp_path) is None
    # found before anything runs or is written (`cai run` wrote the run folder first)
    from cai.preflight import check

    assert check(recipe("tracker=tensorboard"))[-1].endswith(
        "key 'tracker': 'tensorboard' needs the tensorboard package (pip install tensorboard)"
    )


def test_summary_lists_stages_times_and_key_metrics(fake, recipe, capsys):
    pipeline.run(recipe())
    out = capsys.readouterr().out
    assert "[cai] summary of" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("policy "))
    assert "ran" in line and "resumed=False" in line and "s " in line


def test_real_tiny_run_completes_and_a_rerun_skips_every_stage(tiny_run, root, monkeypatch, capsys, tmp_path):
    """The real stages, end to end (the session's tiny run), then the same recipe again: nothing reruns."""
    monkeypatch.chdir(root)
    recipe = load_run_recipe(tiny_run)
    for s in BODY + ["report"]:
        m = read_manifest(tiny_run / s)
        assert m["status"] == "complete" and m["seconds"] > 0 and m["summary"], s
    assert (tiny_run / "report" / "report.md").is_file() and (
        tiny_run / "policy" / "policy" / "config.json"
    ).is_file()
    capsys.readouterr()
    pipeline.run(recipe)
    out = capsys.readouterr().out
    assert (
        out.count("up to date, skipped") == 7 and "0 stage(s) ran" in out
    )  # the six stages and the gold judge
    assert "report: " in out and "policy " in out
    # the README's `--only critique_revise`, forced (on a copy: the session's run stays as it is): the same
    # files again, so nothing after it goes stale
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    before = {s: read_manifest(copy / s)["output"] for s in BODY}
    pipeline.run(recipe, run_dir=copy, only=["critique_revise", "sft"], force=True, quiet=True)
    assert {s: read_manifest(copy / s)["output"] for s in BODY} == before
    capsys.readouterr()
    pipeline.run(recipe, run_dir=copy)
    assert capsys.readouterr().out.count("up to date, skipped") == 7


def test_editing_a_pm_spec_setting_changes_the_preference_model_fingerprint(tmp_path, tiny_recipe, root):
    spec = tmp_path / "my-pm.yaml"
    spec.write_text((root / "cai" / "pm" / "specs" / "soft-full.yaml").read_text())
    recipe = tiny_recipe(f"preference_model.spec={spec}")
    before = pipeline.fingerprint(recipe, "preference_model", {})[0]
    assert pipeline.fingerprint(recipe, "preference_model", {})[0] == before
    spec.write_text(spec.read_text() + "\n# a comment changes nothing the PM reads\n")
    assert pipeline.fingerprint(recipe, "preference_model", {})[0] == before
    spec.write_text(spec.read_text().replace("center_coef: 0.01", "center_coef: 0.02"))
    assert pipeline.fingerprint(recipe, "preference_model", {})[0] != before  # a setting of the spec does


def test_a_new_labeller_check_set_reruns_the_report_but_not_the_pm_or_the_policy(recipe, tmp_path):
    """check.json is the report's alone: the feedback output id the PM and the policy read covers the pairs,
    so a larger check set (a tighter interval) does not retrain them; the report reads the feedback block."""
    from cai.config.layout import fingerprint

    d = tmp_path / "feedback"
    d.mkdir()
    (d / "pairs.jsonl").write_text('{"id": "p0", "p_a": 0.7}\n')
    (d / "check.json").write_text('{"agreement": 0.6}\n')
    before = pipeline._output_id(d, "feedback", "fp")
    (d / "check.json").write_text('{"agreement": 0.7}\n')
    assert pipeline._output_id(d, "feedback", "fp") == before
    (d / "pairs.jsonl").write_text('{"id": "p0", "p_a": 0.2}\n')
    assert pipeline._output_id(d, "feedback", "fp") != before
    # the PM sets its reward normalisation from responses.jsonl: new responses must retrain it
    before = pipeline._output_id(d, "feedback", "fp")
    (d / "responses.jsonl").write_text('{"id": "p0-0", "text": "b"}\n')
    assert pipeline._output_id(d, "feedback", "fp") != before
    check = "feedback.check_set={path: ../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz, limit: %d}"
    a, b = recipe(check % 8), recipe(check % 16)
    inputs = {s: "x" for s in STAGES}
    for stage, reruns in (("preference_model", False), ("policy", False), ("report", True)):
        assert (fingerprint(a, stage, inputs)[0] != fingerprint(b, stage, inputs)[0]) is reruns, stage


def test_editing_a_suite_file_the_report_names_reruns_the_report(recipe, tmp_path):
    """Suites are named references: a path's content was not hashed, so a report over an edited suite file
    stayed "up to date" with the old numbers."""
    from cai.config.layout import fingerprint

    suite = tmp_path / "mine.jsonl"
    suite.write_text(
        '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n'
    )
    r = recipe(f"report.suites=[pairs, {suite}]")
    before = fingerprint(r, "report", {})[0]
    suite.write_text(suite.read_text() * 2)
    assert fingerprint(r, "report", {})[0] != before
    assert (
        fingerprint(recipe("report.suites=[pairs]"), "report", {})[0]
        == fingerprint(recipe("report.suites=[pairs]"), "report", {})[0]
    )


def test_editing_a_dataset_folder_a_prompt_source_names_reruns_critique_revise(recipe, tmp_path):
    """A `dataset` source may name a folder of data files: it counted by its path, so edited prompts left the
    stage "up to date" with the old ones."""
    from cai.config.layout import fingerprint

    folder = tmp_path / "prompts"
    (folder / "part").mkdir(parents=True)
    (folder / "part" / "train.jsonl").write_text('{"prompt": "How do I pick a lock?"}\n')
    r = recipe(f"prompts={{sources: [{{type: dataset, path: {folder}, column: prompt}}]}}")
    before = fingerprint(r, "critique_revise", {})[0]
    assert fingerprint(r, "critique_revise", {})[0] == before
    (folder / "part" / "train.jsonl").write_text('{"prompt": "Something else entirely."}\n')
    edited = fingerprint(r, "critique_revise", {})[0]
    assert edited != before
    (folder / "part" / "train.jsonl").rename(folder / "part" / "test.jsonl")  # a renamed split: other data
    assert fingerprint(r, "critique_revise", {})[0] != edited


def test_a_seed_sweep_records_each_arms_seed(fake, recipe):
    from cai.runtime.rundir import read_run_info

    pipeline.run(recipe("sweep={seed: [1, 2]}"), quiet=True)
    info = read_run_info(fake.run_dir)
    assert info["arm_seeds"] == {"seed=1": 1, "seed=2": 2}  # run.json said seed 0 alone
    pipeline.run(recipe(), run_dir=fake.run_dir / "plain", quiet=True)
    assert "arm_seeds" not in read_run_info(fake.run_dir / "plain")


def test_a_kill_during_a_reset_leaves_the_old_folder_whole_or_nothing(fake, recipe, monkeypatch):
    """`--force` killed while the old files were deleted one by one left the old complete manifest without its
    model (the next run skipped the stage as up to date), or the old files without a manifest."""
    rdir = pipeline.run(recipe(), quiet=True)
    sft = rdir / "sft"
    before = sorted(p.name for p in sft.iterdir())
    real_rmtree, real_unlink = shutil.rmtree, Path.unlink

    def mine(p) -> bool:  # the stage folder's files, or the folder under another name
        return Path(p).parent == sft or (Path(p).parent == rdir and "sft" in Path(p).name)

    def rmtree(path, *a, **k):  # the kill lands just after the first removal
        real_rmtree(path, *a, **k)
        if mine(path):
            raise KeyboardInterrupt

    def unlink(self, *a, **k):
        real_unlink(self, *a, **k)
        if mine(self):
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", rmtree)
        m.setattr(Path, "unlink", unlink)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(recipe(), only=["sft"], force=True, quiet=True)
    assert (sorted(p.name for p in sft.iterdir()) if sft.is_dir() else []) in (before, [])
    fake.calls.clear()
    pipeline.run(recipe(), quiet=True)
    assert fake.calls == ["sft"] and (sft / "model").is_dir() and read_manifest(sft)["status"] == "complete"
    # a trash folder that a kill left is removed by the next run
    trash = pipeline._trash_of(sft)
    (trash / "model").mkdir(parents=True)
    pipeline.run(recipe(), quiet=True)
    assert not trash.exists() and (sft / "model").is_dir()


def test_files_without_a_manifest_start_clean(fake, recipe, capsys):
    """The manifest is written before anything else: files without one (the old config's partial output, left
    by a kill during a reset) were resumed under the new config."""
    fake.fail_once = {"sft"}
    with pytest.raises(RuntimeError):
        pipeline.run(recipe(), quiet=True)
    sft = fake.run_dir / "sft"
    (sft / "manifest.json").unlink()
    pipeline.run(recipe("sft.learning_rate=0.01"), quiet=True)
    assert "files without a manifest" in capsys.readouterr().out
    m = read_manifest(sft)
    assert m["resumed"] is False and m["summary"]["resumed"] is False and not (sft / "partial.txt").exists()


def test_force_reruns_an_interrupted_stage_from_scratch(fake, recipe):
    fake.fail_once = {"sft"}
    with pytest.raises(RuntimeError):
        pipeline.run(recipe(), quiet=True)
    pipeline.run(recipe(), only=["sft"], force=True, quiet=True)
    m = read_manifest(fake.run_dir / "sft")
    assert m["resumed"] is False and m["summary"]["resumed"] is False  # it resumed the partial output
    assert [a["status"] for a in m["attempts"]] == ["complete"]


def test_a_resumed_stage_keeps_every_attempts_time_and_peak_memory(fake, recipe, monkeypatch):
    """A killed attempt (manifest still `running`), a failed one, then the one that completes: the manifest
    recorded only the last attempt's seconds and peak memory, and so did the report."""
    import os
    import time

    from cai.report import build, policies
    from cai.report.build import Report, RunIndex

    level = {"rss_mib": 900.0}
    monkeypatch.setattr(pipeline, "peak_memory", lambda **kw: {**level, "rss_since": "stage"})
    real_write = pipeline._write_manifest

    def sigkill(out_dir, manifest):  # a SIGKILL: sft's failure is never recorded
        if manifest["stage"] != "sft" or manifest["status"] == "running":
            real_write(out_dir, manifest)

    fake.fail_once = {"sft"}
    with monkeypatch.context() as m, pytest.raises(RuntimeError):
        m.setattr(pipeline, "_write_manifest", sigkill)
        pipeline.run(recipe(), quiet=True)
    sft = fake.run_dir / "sft"
    killed = read_manifest(sft)
    assert killed["status"] == "running"
    t0 = time.mktime(time.strptime(killed["started"], "%Y-%m-%dT%H:%M:%S"))
    for f in sft.rglob("*"):  # its last file was written 30 s after it started
        os.utime(f, (t0 + 30, t0 + 30))
    fake.fail_once = {"sft"}
    with pytest.raises(RuntimeError):
        pipeline.run(recipe(), quiet=True)
    level["rss_mib"] = 100.0
    rdir = pipeline.run(recipe(), quiet=True)
    m = read_manifest(sft)
    attempts = m["attempts"]
    assert [a["status"] for a in attempts] == ["killed", "failed", "complete"]
    assert 30 <= attempts[0]["seconds"] < 31.5 and attempts[0]["started"] == killed["started"]
    assert m["seconds"] == attempts[-1]["seconds"] < 5 and m["started"] == attempts[-1]["started"]
    assert m["seconds_total"] == pytest.approx(sum(a["seconds"] for a in attempts), abs=0.02)
    assert m["peak_memory"]["rss_mib"] == 900.0  # the failed attempt's; the last one's is 100
    assert policies._stage_rows({None: sft})[0][1] == f"{m['seconds_total']:.1f} s"
    r = load_run_recipe(rdir)
    rep = Report(
        stage_view(r, "report"), RunIndex(rdir, [], plan(r, rdir).run_index()), rdir / "r", rdir / "g"
    )
    row = next(ln for ln in build.stage_table(rep)[1].splitlines() if ln.startswith("| sft "))
    assert f"| {m['seconds_total']:.1f} s |" in row


def test_the_policy_stage_reads_the_pm_only_for_a_pm_reward(fake, recipe, tmp_path, monkeypatch):
    """With `ppo.reward` a function no algorithm reads the PM, and PPO, RLOO and GRPO read no feedback pairs
    (DPO and online rounds do): a retrained PM reran the policy, and `--only policy` wanted both complete."""
    (tmp_path / "zero_reward_mod.py").write_text(
        "def short(prompts, responses, **kw):\n    return [0.0] * len(responses)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn, all4 = "ppo.reward=zero_reward_mod:short", ("critique_revise", "sft", "feedback", "preference_model")
    cases = {
        (): ("critique_revise", "sft", "preference_model"),
        (fn,): ("critique_revise", "sft"),
        ("policy.algorithm=rloo", fn): ("critique_revise", "sft"),
        ("policy.algorithm=dpo",): all4,  # its probes are scored by the PM
        ("policy.algorithm=dpo", fn): ("critique_revise", "sft", "feedback"),
        ("policy.rounds=2",): all4,
    }
    for sets, reads in cases.items():
        assert inputs_of(recipe(*sets), "policy") == reads, sets
    pipeline.run(recipe(fn), quiet=True)
    assert set(fake.ctxs["policy"].inputs) == {"critique_revise", "sft"}
    fake.calls.clear()
    pipeline.run(recipe(fn, "preference_model.learning_rate=0.01"), quiet=True)
    assert fake.calls == ["preference_model", "report"]
    pipeline.run(recipe(), quiet=True)
    fake.calls.clear()
    pipeline.run(recipe("preference_model.learning_rate=0.01"), quiet=True)
    assert fake.calls == ["preference_model", "policy", "report"]
    other = fake.run_dir / "other"
    pipeline.run(recipe(fn), run_dir=other, only=["critique_revise", "sft"], quiet=True)
    pipeline.run(recipe(fn), run_dir=other, only=["policy"], quiet=True)
    assert read_manifest(other / "policy")["status"] == "complete"


def test_what_ran_names_the_cai_run_that_made_each_stage(fake, recipe):
    """RUN/run.json is the latest `cai run`'s: after `--only report --set report.examples=3` the report showed
    that run's `--set` items and seed for stages trained with others."""
    from cai.report import build
    from cai.report.build import Report, RunIndex

    rdir = pipeline.run(recipe("ppo.kl_coef=0.1", "seed=7"), quiet=True)
    pipeline.run(recipe("report.examples=3"), only=["report"], quiet=True)
    r = load_run_recipe(rdir)
    rep = Report(
        stage_view(r, "report"), RunIndex(rdir, [], plan(r, rdir).run_index()), rdir / "r", rdir / "g"
    )
    md = "\n".join(build.what_ran(rep))
    assert "`--set report.examples=3`" in md.split("Made by an earlier")[0]
    row = next(ln for ln in md.splitlines() if ln.startswith("| `policy` |"))
    assert "`--set ppo.kl_coef=0.1` `--set seed=7` | 7 |" in row and "report.examples" not in row
    pipeline.run(recipe("ppo.kl_coef=0.1", "seed=7"), only=["policy"], force=True, quiet=True)
    md = "\n".join(build.what_ran(rep))
    assert "| `policy` |" not in md and "| `sft` |" in md  # the policy now made by the latest run


def test_cai_run_refuses_a_folder_that_is_not_a_run_directory(fake, recipe, tmp_path, capsys):
    """`--run-dir .` or any folder of the user's: a run reset every folder named like a stage (report/, sft/,
    ...) and deleted the user's files in it. Now one line, rc 2, and the folder is left exactly as it was."""
    from cai.cli.main import main

    proj = tmp_path / "proj"
    (proj / "report").mkdir(parents=True)
    (proj / "report" / "q3.md").write_text("my quarterly report\n")
    fake.run_dir = proj  # where the stand-in stages would write
    assert main(["run", "recipes/tiny.yaml", "--run-dir", str(proj)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --run-dir {proj}: ") and "not a cai run directory" in err
    assert sorted(p.relative_to(proj).as_posix() for p in proj.rglob("*")) == ["report", "report/q3.md"]
    assert (proj / "report" / "q3.md").read_text() == "my quarterly report\n" and fake.calls == []
    with pytest.raises(
        UserError, match=r"^run_dir .*: not a cai run directory, and it holds report, which a run"
    ):
        pipeline.run(recipe(f"run_dir={proj}"), quiet=True)
    assert fake.calls == [] and not (proj / ".lock").exists()
    # a folder of the user's that holds nothing a run writes (its recipe, constitutions, dot-files, a fresh
    # volume's lost+found) is a run directory to be: the run goes ahead and leaves those alone
    exp = tmp_path / "exp"
    for d in ("constitutions", "lost+found"):
        (exp / d).mkdir(parents=True)
    for f in ("recipe.yaml", ".gitkeep", "constitutions/mine.yaml"):
        (exp / f).write_text("x\n")
    fake.run_dir = exp
    pipeline.run(recipe(), run_dir=exp, quiet=True)
    assert fake.calls == BODY + ["report"]
    assert all((exp / f).read_text() == "x\n" for f in ("recipe.yaml", ".gitkeep", "constitutions/mine.yaml"))


def test_a_run_directory_cai_started_runs_and_resumes(fake, recipe, tmp_path):
    """A new or empty folder is fine, and so is a run killed at once, which left only RUN/.lock (the first file a
    run writes) or also recipe.json: the next `cai run` carries on in it."""
    for first in ([], [".lock"], [".lock", "recipe.json"]):
        rdir = tmp_path / f"r{len(first)}"
        rdir.mkdir()
        for name in first:
            (rdir / name).write_text("{}" if name == "recipe.json" else "")
        if first:
            (rdir / "critique_revise").mkdir()  # the stage folder it made, with no manifest yet
        fake.run_dir, fake.calls = rdir, []
        pipeline.run(recipe(), run_dir=rdir, quiet=True)
        assert fake.calls == BODY + ["report"], first
        assert json.loads((rdir / "recipe.json").read_text())["name"] == "tiny"
    # a run assembled from a finished stage (its folder with cai's manifest) and nothing else: the next stages run
    rdir = tmp_path / "assembled"
    shutil.copytree(tmp_path / "r0" / "critique_revise", rdir / "critique_revise")
    fake.run_dir, fake.calls = rdir, []
    pipeline.run(recipe(), run_dir=rdir, quiet=True)
    assert fake.calls == BODY[1:] + ["report"]


def test_a_run_directory_of_another_recipe_is_refused_but_its_arms_share_it(fake, recipe, capsys):
    """A recipe named 'other' given the run directory of run 'tiny' took it over (replaced its stages and
    rewrote recipe.json); the same recipe's arms and sweeps live in its run directory and still run there."""
    from cai.cli.main import main

    rdir = pipeline.run(recipe(), quiet=True)
    before = {p: p.read_bytes() for p in rdir.rglob("*") if p.is_file() and p.name != ".lock"}
    fake.calls.clear()
    assert main(["run", "recipes/tiny.yaml", "--run-dir", str(rdir), "--set", "name=other"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: --run-dir {rdir} holds run 'tiny'; this recipe is 'other': give another --run-dir\n"
    )
    with pytest.raises(
        UserError, match=r"^run_dir .* holds run 'tiny'; this recipe is 'other': give another"
    ):
        pipeline.run(recipe("name=other"), quiet=True)
    assert fake.calls == [] and {p: p.read_bytes() for p in before} == before
    pipeline.run(recipe("sweep={ppo.kl_coef: [0.02, 0.1]}"), quiet=True)
    assert fake.calls == ["arms/kl_coef=0.02/policy", "arms/kl_coef=0.1/policy", "report"]


def test_reset_stage_deletes_only_folders_cai_wrote(tmp_path):
    """_reset_stage deleted any folder it was given; a folder with files, no manifest and outside a cai run
    directory is refused and kept; one with a manifest, or inside a run directory, is emptied."""
    mine = tmp_path / "proj" / "report"
    mine.mkdir(parents=True)
    (mine / "q3.md").write_text("mine")
    with pytest.raises(UserError, match="not cai's to delete"):
        pipeline._reset_stage(mine, tmp_path / "proj")
    assert (mine / "q3.md").read_text() == "mine"
    (mine / "manifest.json").write_text("{}")
    pipeline._reset_stage(mine, tmp_path / "proj")
    assert mine.is_dir() and not any(mine.iterdir())
    rdir = tmp_path / "run"
    (rdir / "arms" / "a" / "sft").mkdir(parents=True)
    (rdir / "arms" / "a" / "sft" / "half.bin").write_text("x")  # a killed reset's files, in a run directory
    (rdir / "recipe.json").write_text("{}")
    pipeline._reset_stage(rdir / "arms" / "a" / "sft", rdir)
    assert not any((rdir / "arms" / "a" / "sft").iterdir())
