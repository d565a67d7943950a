"""critique_revise: clean-up filters, conversations, principle sampling, few-shot, reproducible and resumable runs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cai.constitution.fewshot import fewshot_messages, load_fewshot, parse_transcript
from cai.constitution.schema import Constitution, Principle
from cai.errors import UserError
from cai.runtime.rundir import read_jsonl
from cai.stages.critique_revise import (
    clean_text,
    conversation,
    echoes_request,
    is_degenerate,
    revision_problem,
    round_requests,
    sample_principle,
)

ROOT = Path(__file__).resolve().parents[1]
# Small batches and longer answers: several batches per step, so a kill lands in the middle of a step.
SETS = ["generation.batch_size=2", "generation.max_new_tokens=24"]
RECORD_KEYS = {"id", "prompt", "initial", "rounds", "final", "category", "source", "kind"}

# --- pure functions -----------------------------------------------------------------------------------------


def test_clean_text_strips_role_tags_and_leaked_labels():
    assert clean_text("Assistant: Revision: I can't help with that.") == (
        "I can't help with that.",
        {"stripped_prefix"},
    )
    assert clean_text("Critique: The answer is harmful.")[0] == "The answer is harmful."
    assert clean_text("  <|im_start|>assistant\nSure.")[0] == "Sure."
    text, fixes = clean_text("I won't help.\n\nHuman: ok then\n\nAssistant: fine")
    assert text == "I won't help." and fixes == {"cut_at_role_tag"}
    assert clean_text("A normal answer: with a colon.") == ("A normal answer: with a colon.", set())


def test_echo_and_degenerate_filters():
    req = "Rewrite the assistant's response to remove anything harmful."
    assert echoes_request("Rewrite the assistant's response to remove anything harmful", [req])
    assert echoes_request("rewrite the assistant's response", [req])  # a sizeable piece of the request
    assert echoes_request("Sure! Rewrite the assistant's response to remove anything harmful. Done.", [req])
    assert not echoes_request(
        "I can't help with hurting anyone, but I can suggest ways to resolve the conflict.", [req]
    )
    assert is_degenerate("I am sorry. " * 30)
    assert is_degenerate("no no no no no no no no no no no no no no no no")
    assert is_degenerate("ha" * 60)
    assert not is_degenerate(
        "Picking locks you don't own is illegal. If you're locked out, call a licensed locksmith "
        "or your landlord, who can let you in and check your identity."
    )
    assert revision_problem("   ", [req]) == "empty_revision"
    assert revision_problem(req, [req]) == "echoed_request"
    assert revision_problem("sorry " * 40, [req]) == "degenerate_repetition"
    assert revision_problem("I can't help with that, but here is a safer idea.", [req]) is None


def test_a_prompts_system_turn_stays_before_the_few_shot_examples():
    prompt = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi?"}]
    fewshot = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    msgs = conversation(prompt, "Arr.", [{"critique_request": "CR"}], fewshot)
    assert [(m["role"], m["content"]) for m in msgs] == [
        ("system", "You are a pirate."),
        ("user", "Q"),
        ("assistant", "A"),
        ("user", "Hi?"),
        ("assistant", "Arr."),
        ("user", "CR"),
    ]


def test_conversation_carries_on_round_after_round():
    prompt = [{"role": "user", "content": "How do I pick a lock?"}]
    r1 = {"critique_request": "CR1", "critique": "C1", "revision_request": "RR1", "revision": "R1"}
    msgs = conversation(prompt, "Use a pin.", [r1, {"critique_request": "CR2"}])
    assert [m["role"] for m in msgs] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert [m["content"] for m in msgs] == [
        "How do I pick a lock?",
        "Use a pin.",
        "CR1",
        "C1",
        "RR1",
        "R1",
        "CR2",
    ]
    state = {
        "a": {
            "prompt": {"messages": prompt},
            "initial": "Use a pin.",
            "rounds": [
                {"principle_id": "p", "critique_request": "CR1", "revision_request": "RR1", "critique": "C1"}
            ],
        }
    }
    few = [{"role": "user", "content": "example"}, {"role": "assistant", "content": "revised example"}]
    crit = round_requests(state, ["a"], "critique", few)[0]
    rev = round_requests(state, ["a"], "revision", few)[0]
    assert crit["messages"][:2] == few and crit["messages"][-1] == {"role": "user", "content": "CR1"}
    assert rev["messages"][-2:] == [
        {"role": "assistant", "content": "C1"},
        {"role": "user", "content": "RR1"},
    ]
    assert crit["meta"] == {"principle_id": "p"}


def test_principles_are_seeded_per_prompt_and_round_and_respect_weights():
    def principle(pid, w):
        return Principle(id=pid, critique="c", revision="r", feedback="f", weight=w)

    c = Constitution(name="t", kind="specific", principles=[principle("heavy", 9.0), principle("light", 1.0)])
    draws = [sample_principle(c, 0, f"p{i}", 1).id for i in range(2000)]
    share = Counter(draws)["heavy"] / len(draws)
    assert 0.86 < share < 0.94
    assert draws == [sample_principle(c, 0, f"p{i}", 1).id for i in range(2000)]
    assert draws != [sample_principle(c, 1, f"p{i}", 1).id for i in range(2000)]
    assert [sample_principle(c, 0, "p1", k).id for k in range(1, 40)] != [draws[1]] * 39  # rounds differ


def test_fewshot_file_of_the_paper(shared_data, tmp_path):
    path = shared_data / "cai-paper" / "CritiqueRevisionFewShotPrompts.json"
    shots = load_fewshot(path)
    assert len(shots) >= 3
    for t in shots:
        roles = [m["role"] for m in t]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))
    first = parse_transcript(json.loads(path.read_text())[0])
    labels = [m["label"] for m in first]
    assert labels[-4:] == ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"]
    assert first[-1]["content"].startswith("I'm sorry, I shouldn't have agreed to help.")
    assert fewshot_messages(path, 2) == shots[0] + shots[1]
    assert fewshot_messages(None, 2) == [] and fewshot_messages(path, 0) == []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["\n\nHuman: hi\n\nAssistant: hello"]))
    with pytest.raises(UserError, match="item 0"):
        load_fewshot(bad)


# --- the stage on the tiny model ----------------------------------------------------------------------------


def stage_files(run_dir: Path) -> dict[str, bytes]:
    d = run_dir / "critique_revise"
    files = {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.jsonl"))}
    stats = json.loads((d / "stats.json").read_text())
    stats.pop("timing")
    files["stats.json"] = json.dumps(stats, sort_keys=True).encode()
    return files


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_dir):
    from cai import pipeline
    from cai.config.load import load_recipe

    run_dir = tmp_path_factory.mktemp("cr") / "run"
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        recipe = load_recipe(ROOT / "recipes/tiny.yaml", [f"run_dir={run_dir}", *SETS])
        pipeline.run(recipe, only=["critique_revise"])
    finally:
        os.chdir(old)
    return run_dir


def test_stage_writes_records_with_the_contract_fields(first_run):
    d = first_run / "critique_revise"
    prompts, held = read_jsonl(d / "prompts.jsonl"), read_jsonl(d / "held_out.jsonl")
    assert len(prompts) == 12 and len(held) == 4  # tiny.yaml: 12 red-team + 4 helpful, 25% held out
    assert not {p["id"] for p in prompts} & {p["id"] for p in held}
    data = read_jsonl(d / "data.jsonl")
    rejected = read_jsonl(d / "rejected.jsonl")
    stats = json.loads((d / "stats.json").read_text())
    assert len(data) + len(rejected) == len(prompts) and data
    assert stats["records"]["written"] == len(data) and stats["rejected"]["total"] == len(rejected)
    assert sum(stats["rejected"]["by_reason"].values()) == len(rejected)
    assert stats["timing"]["tokens_per_s"] > 0
    by_id = {p["id"]: p for p in prompts}
    for rec in data:
        assert set(rec) == RECORD_KEYS
        p = by_id[rec["id"]]
        assert (
            rec["prompt"] == p["messages"]
            and rec["category"] == p["category"]
            and rec["source"] == p["source"]
        )
        if rec["kind"] == "helpful":
            assert rec["rounds"] == [] and rec["final"] == rec["initial"]
        else:
            assert len(rec["rounds"]) == 1 and set(rec["rounds"][0]) == {
                "principle_id",
                "critique",
                "revision",
            }
            assert rec["final"] == rec["rounds"][0]["revision"]
    assert {r["kind"] for r in data} == {"red_team", "helpful"}
    steps = {p.name for p in (d / "steps").iterdir()}
    assert steps == {"initial.jsonl", "critique_1.jsonl", "revision_1.jsonl"}
    # only red-team prompts are critiqued
    assert {r["id"] for r in read_jsonl(d / "steps" / "critique_1.jsonl")} == {
        p["id"] for p in prompts if p["kind"] == "red_team"
    }
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["records"] == len(data)


def test_same_seed_gives_identical_files(first_run, tmp_path):
    from cai import pipeline
    from cai.config.load import load_recipe

    old = os.getcwd()
    os.chdir(ROOT)
    try:
        recipe = load_recipe(ROOT / "recipes/tiny.yaml", [f"run_dir={tmp_path / 'again'}", *SETS])
        pipeline.run(recipe, only=["critique_revise"])
    finally:
        os.chdir(old)
    assert stage_files(tmp_path / "again") == stage_files(first_run)


def test_kill_mid_run_and_rerun_finishes_without_redoing_items(first_run, tmp_path, capsys):
    run_dir = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "cai",
        "run",
        "recipes/tiny.yaml",
        "--only",
        "critique_revise",
        "--run-dir",
        str(run_dir),
    ]
    for s in SETS:
        cmd += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first = run_dir / "critique_revise" / "steps" / "initial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not read_jsonl(first):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    steps = run_dir / "critique_revise" / "steps"
    before = {p.name: p.read_text() for p in steps.glob("*.jsonl")}
    done_before = {
        name: [json.loads(x)["id"] for x in text.splitlines() if x.endswith("}")]
        for name, text in before.items()
    }
    assert 0 < len(done_before["initial.jsonl"]) < 12, "killed mid-step"
    assert not (run_dir / "critique_revise" / "data.jsonl").exists()

    from cai.cli.main import main

    old = os.getcwd()
    os.chdir(ROOT)
    try:  # the rerun in this process (the same command line), which saves a second start-up
        assert main(cmd[3:]) == 0
    finally:
        os.chdir(old)
    assert "resuming" in capsys.readouterr().out
    for name, ids in done_before.items():
        after = (steps / name).read_text()
        rows = [json.loads(x) for x in after.splitlines()]
        counts = Counter(r["id"] for r in rows)
        assert all(counts[i] == 1 for i in ids), f"{name}: finished items were generated again"
        complete_lines = "".join(x + "\n" for x in before[name].splitlines() if x.endswith("}"))
        assert after.startswith(complete_lines)  # finished rows kept as they were
    # and the result is the same as a run that was never interrupted
    assert stage_files(run_dir) == stage_files(first_run)


def test_random_module_state_does_not_leak_into_sampling():
    """Principle draws depend only on (seed, prompt, round), not on the global random state."""
    c = Constitution(
        name="t",
        kind="specific",
        principles=[Principle(id=f"p{i}", critique="c", revision="r", feedback="f") for i in range(5)],
    )
    random.seed(1)
    a = [sample_principle(c, 0, "x", k).id for k in range(20)]
    random.seed(2)
    assert a == [sample_principle(c, 0, "x", k).id for k in range(20)]
