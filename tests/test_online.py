"""The policy stage end to end on a copy of the tiny run: online RLAIF rounds (round 2 samples from round 1's
policy, a kill between rounds resumes without redoing round 1), and every algorithm's metrics.jsonl read by the
report and the sqrt(KL) fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cai import pipeline
from cai.config.layout import plan, stage_view
from cai.config.load import load_recipe
from cai.rl import online
from cai.runtime.rundir import read_jsonl, read_manifest

CHECK = "feedback.check_set={path: ../shared/data/hh-rlhf/harmless-base-dev.jsonl.gz, limit: 8}"


@pytest.fixture
def run_copy(tiny_run, tmp_path, root, monkeypatch):
    """A copy of the session's tiny run (every stage done) and a maker of recipes for it."""
    rdir = tmp_path / "run"
    shutil.copytree(tiny_run, rdir)
    monkeypatch.chdir(root)
    return rdir, lambda *sets: load_recipe(root / "recipes/tiny.yaml", [f"run_dir={rdir}", CHECK, *sets])


def test_round_two_samples_round_ones_policy_and_a_kill_between_rounds_resumes(run_copy, monkeypatch):
    from cai.config.fields import merged_generation
    from cai.feedback.pairs import sample_responses
    from cai.hashing import derive_seed
    from cai.rl.trainer import PPOTrainer

    rdir, make = run_copy
    recipe = make("policy.rounds=2", "ppo.updates=2", "ppo.learning_rate=0.01")
    real_label = online.label_pairs

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(online, "label_pairs", killed)  # killed while labelling round 2's pairs
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe, only=["policy"], quiet=True)
    out = rdir / "policy"
    assert read_manifest(out)["status"] == "interrupted"
    assert online.is_complete(out, 1) and not online.is_complete(out, 2)
    first = out / "rounds" / "round-1" / "policy"
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    rows_before = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["round"]) for r in rows_before] == [(1, 1), (2, 1)]

    monkeypatch.setattr(online, "label_pairs", real_label)
    spans, train = [], PPOTrainer.train

    def spy(self, until=None):
        spans.append((self.step, until))
        return train(self, until)

    monkeypatch.setattr(PPOTrainer, "train", spy)
    pipeline.run(recipe, only=["policy"], quiet=True)
    assert spans == [(2, 4)]  # round 2 only, resumed from round 1's last checkpoint
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps  # round 1's policy not rewritten
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["round"]) for r in rows] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert rows[:2] == rows_before
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and (out / "policy" / "config.json").is_file()

    # round 2 sampled from the folder round 1 wrote: its hash is in the round record and the stage manifest
    r1, r2 = online.read_round(out, 1), online.read_round(out, 2)
    assert r2["sampled_from"] == {"path": "rounds/round-1/policy", "hash": online.folder_hash(first)}
    assert r1["policy_hash"] == r2["sampled_from"]["hash"]
    stage_pm = (
        rdir / "preference_model" / "model"
    )  # named relative to the run: no absolute path in the record
    assert r2["pm_from"] == {"path": "preference_model/model", "hash": online.folder_hash(stage_pm)}
    assert manifest["summary"]["rounds"][1]["sampled_from"]["hash"] == r1["policy_hash"]
    assert r2["pairs"]["pairs"] > 0 and r2["pm_agreement"]["n"] > 0 and (r2["pm_held_out"]["n"] or 0) >= 1
    assert (out / "rounds" / "round-2" / "pm" / "model" / "score_norm.json").is_file()
    # round 2's PM continued the stage's PM: no prompt that PM trained on is held out to measure the new one
    stage_split = json.loads((rdir / "preference_model" / "model" / "pm_split.json").read_text())
    round_split = json.loads((out / "rounds" / "round-2" / "pm" / "model" / "pm_split.json").read_text())
    assert round_split["held_out_prompts"] and stage_split["train_prompts"]
    assert not set(round_split["held_out_prompts"]) & set(stage_split["train_prompts"])
    # ... and its responses are exactly what that policy samples with the round's seed (not the SFT model's)
    c = stage_view(recipe, "policy")
    settings = c.settings.with_(seed=derive_seed(f"{c.settings.seed}:round-2:sample"))
    gen = merged_generation(c.generation, c.feedback.generation)
    prompts = read_jsonl(rdir / "critique_revise" / "prompts.jsonl")
    sampled = {r["id"]: r["text"] for r in read_jsonl(out / "rounds" / "round-2" / "responses.jsonl")}
    again = sample_responses(str(first), settings, gen, prompts, 2, rdir / "again.jsonl", "check")
    sft = sample_responses(
        str(rdir / "sft" / "model"), settings, gen, prompts, 2, rdir / "sft.jsonl", "check"
    )
    assert {r["id"]: r["text"] for r in again} == sampled
    assert {r["id"]: r["text"] for r in sft} != sampled
    # the report shows score and KL across rounds and the labeller's agreement per round
    from cai.report import policies
    from cai.report.build import Report, RunIndex

    index = RunIndex(rdir, [], plan(recipe, rdir).run_index())
    rep = Report(stage_view(recipe, "report"), index, rdir / "rep", rdir / "g")
    md = "\n".join(policies.rounds_section(rep))
    assert "## Online rounds" in md and "| 1 | 1–2 |" in md and "| 2 | 3–4 |" in md
    assert f"(n = {r2['pm_agreement']['n']}" in md


def test_every_algorithms_log_is_read_by_the_report_and_the_kl_fit(run_copy):
    from cai.report import sections
    from cai.report.build import Report, RunIndex
    from cai.report.klfit import analyze_logs, find_ppo_logs

    rdir, make = run_copy
    recipe = make(
        "sweep={policy.algorithm: [rloo, grpo, dpo]}",
        "ppo.updates=3",
        "dpo.max_steps=4",
        "dpo.batch_size=4",
        "dpo.probe_every=2",
        "dpo.learning_rate=1e-3",
    )
    torch.manual_seed(0)
    pipeline.run(recipe, only=["policy"], quiet=True)
    arms = ["algorithm=rloo", "algorithm=grpo", "algorithm=dpo"]
    logs = find_ppo_logs(rdir)
    assert [label for label, _ in logs] == arms
    for label, path in logs:
        rows = read_jsonl(path)
        assert any("tokens_per_s" in r and r["tokens_per_s"] > 0 for r in rows), label
        assert any("time/generate" in r for r in rows) and any("time/train" in r for r in rows), label
        summary = read_manifest(path.parent)["summary"]
        assert summary["algorithm"] == label.split("=")[1] and summary["seconds_per_1k_policy_tokens"] > 0
        assert read_manifest(path.parent)["peak_memory"]["rss_mib"] > 0
    series = analyze_logs(logs)
    assert all(s["fit"] is not None and s["n"] >= 3 for s in series), [s.get("warning") for s in series]
    layout = plan(recipe, rdir)
    rep = Report(
        stage_view(recipe, "report"), RunIndex(rdir, arms, layout.run_index()), rdir / "rep", rdir / "g"
    )
    rep.out.mkdir()
    md = "\n".join(sections.ppo_section(rep))
    assert "## Policy optimisation (DPO, GRPO, RLOO)" in md and "![PPO curves](ppo_curves.png)" in md
    assert set(rep.data["kl_fit"]) == set(arms)
    assert (rdir / "arms" / "algorithm=dpo" / "policy" / "eval.json").is_file()


def test_a_rounds_chain_of_thought_labeller_gets_the_recipe_settings_and_vllm_memory(
    root, tmp_path, monkeypatch
):
    """As in the feedback stage: the online round's labeller started its reasoning engine on vLLM with
    trust_remote_code off, seed 0 and the default memory share, whatever the recipe said."""
    from test_feedback import labeller_engine_start

    monkeypatch.chdir(root)
    recipe = load_recipe(
        root / "recipes/tiny.yaml",
        [f"run_dir={tmp_path}", "policy.rounds=2", "feedback.chain_of_thought=true"]
        + ["generation.backend=vllm", "generation.vllm_memory=0.2", "trust_remote_code=true", "seed=5"],
    )
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(2)]
    view = stage_view(recipe, "policy")
    kw = labeller_engine_start(
        monkeypatch,
        online,
        "label_pairs",
        lambda: online.sample_and_label(view, tmp_path / "policy", 2, prompts),
    )
    assert (kw["trust_remote_code"], kw["seed"], kw["memory"]) == (True, 5, 0.2)


def test_dpo_killed_after_its_last_checkpoint_still_logs_its_last_probe(run_copy, monkeypatch):
    """A kill after DPO's last checkpoint, before its closing probe (on_train_end): the rerun found every step
    done, never trained, so never probed; the log and the stage summary then ended at the probe before."""
    from cai.rl import dpo

    rdir, make = run_copy
    sets = ("policy.algorithm=dpo", "dpo.max_steps=3", "dpo.save_steps=1", "dpo.probe_every=2")
    sets += ("dpo.batch_size=4", "dpo.learning_rate=1e-3")
    straight_dir = rdir.with_name("straight")
    shutil.copytree(rdir, straight_dir)
    straight = make(*sets, f"run_dir={straight_dir}")  # a later --set item wins
    torch.manual_seed(0)
    pipeline.run(straight, only=["policy"], quiet=True)
    real = dpo.probe_callback

    def killed_at_the_end(*args, **kwargs):
        cb = real(*args, **kwargs)

        def on_train_end(*a, **k):
            raise KeyboardInterrupt

        cb.on_train_end = on_train_end
        return cb

    monkeypatch.setattr(dpo, "probe_callback", killed_at_the_end)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(make(*sets), only=["policy"], quiet=True)
    assert read_manifest(rdir / "policy")["status"] == "interrupted"
    monkeypatch.setattr(dpo, "probe_callback", real)
    pipeline.run(make(*sets), only=["policy"], quiet=True)

    def probes(d):
        return [
            (r["step"], r["objective/kl"])
            for r in read_jsonl(d / "policy" / "metrics.jsonl")
            if "objective/kl" in r
        ]

    assert probes(rdir) == probes(straight_dir) and probes(rdir)[-1][0] == 3
    summary, want = (read_manifest(d / "policy")["summary"] for d in (rdir, straight_dir))
    timing = {k for k in want if k.startswith("seconds")}
    assert {k: v for k, v in summary.items() if k not in timing} == {
        k: want[k] for k in want if k not in timing
    }
