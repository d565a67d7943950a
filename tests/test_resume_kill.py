"""`kill -9` at any point, then the same command again, finishes the run.

`python -m cai run <tiny recipe>` is killed with SIGKILL three times — during critique_revise generation
(after a batch was streamed to its JSONL), during SFT training (after a checkpoint) and during PPO (after
a checkpoint) — and the same command is then run to the end. Every stage's manifest must be complete,
the killed stages must say they resumed, and what was saved before a kill must have been reused.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cai.errors import UserError
from cai.runtime.rundir import append_jsonl, read_jsonl, read_manifest
from cai.runtime.training import STATE_FILE, TOKEN_FILE, resume_point, token_callback

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["critique_revise", "sft", "feedback", "preference_model", "policy"]
SETS = [
    "stages=[critique_revise,sft,feedback,preference_model,policy]",
    "sft.max_steps=8",
    "sft.save_steps=2",
    "ppo.updates=4",
    "ppo.save_every=1",
]


def _status(rdir: Path, stage: str) -> str | None:
    return (read_manifest(rdir / stage) or {}).get("status")


def _run_until(cmd: list[str], log: Path, point, what: str, timeout: float = 240.0) -> None:
    """Start the command and SIGKILL it as soon as `point()` holds."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            while time.time() - t0 < timeout:
                if point():
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
                if proc.poll() is not None:
                    pytest.fail(
                        f"the run ended (rc {proc.returncode}) before the kill point '{what}':\n{log.read_text()[-3000:]}"
                    )
                time.sleep(0.05)
            pytest.fail(f"no kill point '{what}' within {timeout:.0f}s:\n{log.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigkill_in_three_stages_then_the_same_command_finishes(tmp_path, tiny_dir):
    rdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cai", "run", "recipes/tiny.yaml", "--run-dir", str(rdir)]
    for s in SETS:
        cmd += ["--set", s]
    log = tmp_path / "log.txt"
    steps = rdir / "critique_revise" / "steps"

    def generated_a_batch():
        return _status(rdir, "critique_revise") == "running" and any(
            read_jsonl(p) for p in steps.glob("*.jsonl")
        )

    _run_until(cmd, log, generated_a_batch, "critique_revise wrote a batch")
    assert _status(rdir, "critique_revise") == "running"
    kept = {p.name: len(read_jsonl(p)) for p in steps.glob("*.jsonl")}

    def sft_checkpointed():
        return _status(rdir, "sft") == "running" and any(
            (rdir / "sft" / "checkpoints").glob("checkpoint-*/trainer_state.json")
        )

    _run_until(cmd, log, sft_checkpointed, "sft saved a checkpoint")
    assert _status(rdir, "critique_revise") == "complete" and _status(rdir, "sft") == "running"

    def ppo_checkpointed():
        return _status(rdir, "policy") == "running" and any(
            (rdir / "policy" / "checkpoints").glob("step-*/state.json")
        )

    _run_until(cmd, log, ppo_checkpointed, "ppo saved a checkpoint")
    assert _status(rdir, "sft") == "complete" and _status(rdir, "policy") == "running"

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "policy: resuming an interrupted run" in done.stdout
    assert "critique_revise: up to date, skipped" in done.stdout and "sft: up to date, skipped" in done.stdout
    for stage in STAGES:
        m = read_manifest(rdir / stage)
        assert m["status"] == "complete" and m["output"] and m["fingerprint"], stage
    for stage in ("critique_revise", "sft", "policy"):
        assert read_manifest(rdir / stage)["resumed"] is True, stage
    # the rows streamed before the first kill were reused, not generated again
    stats = json.loads((rdir / "critique_revise" / "stats.json").read_text())
    for name, n in kept.items():
        assert stats["timing"]["steps"][name.removesuffix(".jsonl")]["resumed"] >= n > 0 or n == 0
    # training resumed from checkpoints: the SFT loss log has one row per step, the PPO log one per update
    assert [r["step"] for r in read_jsonl(rdir / "policy" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (rdir / "sft" / "model" / "config.json").is_file() and (
        rdir / "policy" / "policy" / "config.json"
    ).is_file()


def test_a_kill_while_an_hf_checkpoint_is_saved_leaves_the_run_resumable(tmp_path):
    """The token goes in before the trainer writes the checkpoint; trainer_state.json (written last) marks it
    complete. A folder a kill left without it is removed and the run resumes from the one before."""
    hf = tmp_path / "hf"
    args = SimpleNamespace(output_dir=str(hf))
    callback = token_callback("token-a")
    for step in (2, 4):
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        callback.on_step_end(args, state, SimpleNamespace(should_save=step == 4))
    assert not (hf / "checkpoint-2").exists()  # no save decided at step 2: nothing written
    assert (hf / "checkpoint-4" / TOKEN_FILE).read_text() == "token-a\n"  # before the trainer's own files
    # a complete checkpoint at step 2, and step 4 killed after the weights, before trainer_state.json
    (hf / "checkpoint-2").mkdir()
    (hf / "checkpoint-2" / STATE_FILE).write_text("{}")
    (hf / "checkpoint-2" / TOKEN_FILE).write_text("token-a\n")
    (hf / "checkpoint-4" / "model.safetensors").write_bytes(b"partial")
    metrics = tmp_path / "m.jsonl"
    append_jsonl(metrics, [{"step": s} for s in (1, 2, 3, 4)])
    assert resume_point(hf, metrics, "sft", "token-a") == str(hf / "checkpoint-2")
    assert not (hf / "checkpoint-4").exists() and [r["step"] for r in read_jsonl(metrics)] == [1, 2]
    # a complete checkpoint without the token is still refused
    (hf / "checkpoint-2" / TOKEN_FILE).unlink()
    with pytest.raises(UserError, match="not written by this run"):
        resume_point(hf, metrics, "sft", "token-a")


def test_a_kill_while_a_resume_rewrites_the_metrics_log_keeps_its_rows(tmp_path):
    """A resume drops the rows logged after its checkpoint by rewriting metrics.jsonl. It was unlink, then append:
    a kill between the two (here: the process SIGKILLs itself when the rows are serialised) left no file, and the
    next resume kept none of the rows before the checkpoint. The rewrite is now one rename of a synced file."""
    hf, metrics = tmp_path / "hf", tmp_path / "metrics.jsonl"
    (hf / "checkpoint-2").mkdir(parents=True)
    (hf / "checkpoint-2" / STATE_FILE).write_text(json.dumps({"global_step": 2}))
    append_jsonl(metrics, [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])  # step 3 after the checkpoint
    child = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "import cai.runtime.rundir as rundir\n"
        "from cai.runtime.training import resume_point\n"
        "rundir.json.dumps = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"resume_point(Path({str(hf)!r}), Path({str(metrics)!r}), 'sft')\n"
    )
    assert subprocess.run([sys.executable, "-c", child]).returncode == -signal.SIGKILL
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2, 3]  # the old rows, whole
    assert resume_point(hf, metrics, "sft") == str(hf / "checkpoint-2")
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2]
    assert not list(tmp_path.glob("metrics.jsonl.tmp*"))
