"""Multi-process runs under `accelerate launch`: two CPU processes over gloo reproduce a single-process run.

The recipe is recipes/tiny.yaml, shortened (8 new tokens, 2 SFT and 2 PM steps, 1 PPO update). The same
global batch is kept by halving the per-device batch sizes in the 2-process run. Checks:
- every stage manifest records world size 2 (engine 'ddp'), and 1 ('single') in the reference run;
- generation stages: the 2-process outputs equal the single-process ones, row for row in file order;
- SFT and PM: per-step losses and gradient norms agree within LOSS_RTOL / GRAD_RTOL, and the saved weights
  within WEIGHT_ATOL (DDP averages gradients over ranks, so the maths is the same up to float summation
  order: measured differences are ~1e-7 relative);
- PPO runs one update with rollouts sharded over the two processes; so does GRPO with its per-response mean;
- soft-label DPO's packed log-probs give the one-process losses, gathered reward metrics and weights.
DeepSpeed (when installed): one-process ZeRO-2 and ZeRO-3 runs of the SFT and PM stages through
recipes/accelerate/zero{2,3}.yaml match the reference run (losses, gradient norms, saved weights), and every
shipped DeepSpeed config passes DeepSpeed's own config parser. (With 2 CPU processes accelerate gives
DeepSpeed a world of 1 on each rank, so multi-process DeepSpeed is left to GPUs: docs/scaling.md.)
The launcher line is the one that really starts two CPU processes (`--cpu --num_processes 2` starts one).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cai.runtime.rundir import read_jsonl, read_manifest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
CONFIGS = ROOT / "recipes" / "accelerate"
LOSS_RTOL = 1e-4  # relative, per logged step
GRAD_RTOL = 1e-3  # relative, per logged step
# absolute, every saved tensor: 4% of the tiny recipe's learning rate (1e-3). Float order alone moves a weight by
# ~1% of it where its gradient nearly cancels, as Adam divides by |gradient|: 1.2e-5 for the PM on an AMD EPYC
WEIGHT_ATOL = 4e-5
PPO_TOL = 1e-5  # PPO metrics of one update: absolute, or relative above 1
GLOBAL_BATCH = 4

COMMON = [
    "stages=[critique_revise, sft, feedback, preference_model, policy]",
    "generation.max_new_tokens=8",
    "sft.max_steps=2",
    "preference_model.max_steps=2",
    "ppo.updates=1",
    "ppo.ppo_epochs=1",
    "ppo.response_length=8",
    f"feedback.check_set={{path: {ROOT.parent / 'shared/data/hh-rlhf/harmless-base-dev.jsonl.gz'}, limit: 6}}",
]


def per_device(n: int) -> list[str]:
    b = GLOBAL_BATCH // n
    return [f"sft.batch_size={b}", f"preference_model.batch_size={b}", f"ppo.rollout_batch_size={b}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    cmd: list[str], env_extra: dict | None = None, unset: tuple[str, ...] = (), timeout: int = 600
) -> str:
    # faulthandler: a process killed by a signal prints its threads' Python stacks (a rare SIGABRT, "terminate
    # called without an active exception", hit finished ranks in interpreter teardown: dist.end_process)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}
    env.update(env_extra or {})
    for k in unset:
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-8000:]}"
    return out


def cai_run(run_dir: Path, sets: list[str], only: list[str] | None = None) -> list[str]:
    args = ["-m", "cai", "run", "recipes/tiny.yaml", "--run-dir", str(run_dir)]
    for s in only or []:
        args += ["--only", s]
    for s in sets:
        args += ["--set", s]
    return args


def two_cpu_processes() -> list[str]:
    return [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    """A single-process reference run (no PPO) and a 2-process run of the whole pipeline body."""
    if not ACCELERATE.is_file():
        pytest.fail(f"{ACCELERATE} is missing: accelerate is a dependency of cai")
    base = tmp_path_factory.mktemp("dist")
    one, two = base / "one", base / "two"
    launch([sys.executable] + cai_run(one, COMMON + per_device(1)))
    log = launch(two_cpu_processes() + cai_run(two, COMMON + per_device(2)), {"ACCELERATE_USE_CPU": "1"})
    return one, two, log


def assert_close(a: float, b: float, rtol: float, what: str) -> None:
    assert math.isfinite(a) and math.isfinite(b), what
    assert abs(a - b) <= rtol * max(abs(a), abs(b), 1e-8), f"{what}: {a} vs {b} (rtol {rtol})"


def compare_metrics(
    one: Path, two: Path, stage: str, steps: int, batch_metrics: tuple[str, ...] = ()
) -> None:
    """Per-step loss and gradient norm agree; so do `batch_metrics` (statistics of the global batch, which a
    multi-process run must gather from every rank: within 1e-5 absolute)."""
    rows1 = [r for r in read_jsonl(one / stage / "metrics.jsonl") if "loss" in r]
    rows2 = [r for r in read_jsonl(two / stage / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == list(range(1, steps + 1))
    for a, b in zip(rows1, rows2):
        assert_close(a["loss"], b["loss"], LOSS_RTOL, f"{stage} loss at step {a['step']}")
        assert_close(a["grad_norm"], b["grad_norm"], GRAD_RTOL, f"{stage} grad_norm at step {a['step']}")
        for k in batch_metrics:
            assert abs(a[k] - b[k]) <= 1e-5, f"{stage} {k} at step {a['step']}: {a[k]} vs {b[k]}"


def compare_weights(a: Path, b: Path, atol: float = WEIGHT_ATOL) -> None:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    tied = {
        "lm_head.weight": "model.embed_tokens.weight"
    }  # a gathered (DeepSpeed) save writes tied weights out
    for w in (wa, wb):
        for k, src in tied.items():
            if k in w and src in w:
                assert torch.equal(w[k], w[src]), f"{k} is not tied to {src}"
                del w[k]
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = float((wa[k].float() - wb[k].float()).abs().max())
        assert diff <= atol, f"{a}: tensor {k} differs by {diff}"


def test_two_processes_world_size_and_engine(runs):
    one, two, log = runs
    for stage in ("critique_revise", "sft", "feedback", "preference_model", "policy"):
        m = read_manifest(two / stage)
        assert m["status"] == "complete" and m["world_size"] == 2 and m["engine"] == "ddp", (stage, m)
        m1 = read_manifest(one / stage)
        assert m1["world_size"] == 1 and m1["engine"] == "single", (stage, m1)
        # peak memory over both processes: the larger of the two, and what they held together
        peak = m["peak_memory"]
        assert peak["processes"] == 2 and peak["rss_mib"] < peak["rss_mib_total"] <= 2 * peak["rss_mib"], peak
        assert "processes" not in m1["peak_memory"], m1["peak_memory"]
    # only the main process prints the pipeline's lines and writes files
    assert log.count("[cai] sft: running") == 1
    assert log.count("[critique_revise] ") == 1  # the stage's summary line
    assert read_jsonl(two / "sft" / "metrics.jsonl")  # written once, not once per rank
    assert len(read_jsonl(two / "sft" / "metrics.jsonl")) == len(read_jsonl(one / "sft" / "metrics.jsonl"))


def test_generation_stages_match_single_process(runs):
    one, two, _ = runs
    for name in ("prompts.jsonl", "held_out.jsonl", "data.jsonl", "rejected.jsonl"):
        rows1, rows2 = read_jsonl(one / "critique_revise" / name), read_jsonl(two / "critique_revise" / name)
        assert rows1 == rows2, f"critique_revise/{name} differs between 1 and 2 processes"
    assert read_jsonl(one / "critique_revise" / "data.jsonl")
    r1, r2 = (
        read_jsonl(one / "feedback" / "responses.jsonl"),
        read_jsonl(two / "feedback" / "responses.jsonl"),
    )
    assert r1 and r1 == r2, "feedback/responses.jsonl differs between 1 and 2 processes"
    c1, c2 = (json.loads((run / "feedback" / "check.json").read_text()) for run in (one, two))
    assert c1["n"] == 6 and c1["agreement"] == c2["agreement"], "the labeller check is split across ranks"
    assert abs(c1["mean_order_gap"] - c2["mean_order_gap"]) <= 1e-6
    p1, p2 = read_jsonl(one / "feedback" / "pairs.jsonl"), read_jsonl(two / "feedback" / "pairs.jsonl")
    assert len(p1) == len(p2) >= 2 * GLOBAL_BATCH
    for a, b in zip(p1, p2):  # labels come from forward passes on other batch shapes: equal up to float error
        fa, fb = (
            {k: v for k, v in a.items() if not isinstance(v, float)},
            {k: v for k, v in b.items() if not isinstance(v, float)},
        )
        assert fa == fb
        for k, v in a.items():
            if isinstance(v, float):
                assert abs(v - b[k]) <= 1e-5, (k, v, b[k])


def test_training_losses_match_single_process(runs):
    one, two, _ = runs
    compare_metrics(one, two, "sft", steps=2)
    compare_metrics(
        one, two, "preference_model", steps=2, batch_metrics=("accuracy", "margin", "mean_reward")
    )
    compare_weights(one / "sft" / "model", two / "sft" / "model")
    compare_weights(one / "preference_model" / "model", two / "preference_model" / "model")


def same_update(one: Path, two: Path, keys) -> tuple[dict, dict]:
    """Two runs' single policy update: the same samples, and `keys` of its metrics within PPO_TOL (absolute, or
    relative above 1); their metrics rows."""
    (a,), (b,) = (read_jsonl(d / "policy" / "metrics.jsonl") for d in (one, two))
    s1, s2 = (read_jsonl(d / "policy" / "samples.jsonl") for d in (one, two))
    assert len(s1) == GLOBAL_BATCH and [r["response"] for r in s1] == [r["response"] for r in s2]
    for k in keys:
        assert abs(a[k] - b[k]) <= PPO_TOL * max(1.0, abs(a[k])), f"{k}: {a[k]} vs {b[k]}"
    return a, b


def test_ppo_update_on_two_processes_equals_one_process(runs, tmp_path):
    """DDP PPO with the global batch split over 2 processes, from the very same SFT model and PM, gives the
    one-process update: the same samples (each row seeded by its place in the global batch, whichever rows share
    its generate call: ppo.generation_batch_size is left at its default, one call of 4 rows against one of 2 on
    each process), the same rewards and advantages (global whitening statistics), the same step (losses are token
    sums over the global token count). What remains is float summation order: PPO_TOL on the metrics, 1e-6 on the
    policy (a tenth of one Adam step at its learning rate)."""
    one, two, _ = runs
    assert (
        read_manifest(two / "policy")["world_size"] == 2
        and read_manifest(two / "policy")["summary"]["updates"] == 1
    )
    split = tmp_path / "split"
    shutil.copytree(one, split)
    shutil.rmtree(split / "policy")
    sets = COMMON + per_device(1)[:2] + [f"ppo.rollout_batch_size={GLOBAL_BATCH // 2}"]
    launch(two_cpu_processes() + cai_run(split, sets, only=["policy"]), {"ACCELERATE_USE_CPU": "1"})
    assert read_manifest(split / "policy")["world_size"] == 2
    # the same samples: entropy differs only by float order (the logits of 2 rows against 4 take other kernel
    # paths on some CPUs: 44.169006 against 44.169004 on an AMD EPYC), while other samples would move it by ~1e-2
    keys = ("objective/entropy", "objective/score", "objective/reward", "objective/kl", "loss/value")
    a, b = same_update(one, split, (*keys, "loss/policy", "grad/norm"))
    assert a["response/length"] == b["response/length"]
    compare_weights(one / "policy" / "policy", split / "policy" / "policy", atol=1e-6)  # lr 1e-5: 7e-9 apart


def policy_on_one_and_two_processes(one: Path, base: Path, sets_of) -> dict:
    """{1: run, 2: run}: copies of the reference run `one` whose policy stage is run again alone, with the
    `--set` items `sets_of(n)`, by one process and by two gloo processes."""
    out = {}
    for n in (1, 2):
        d = out[n] = base.with_name(f"{base.name}-{n}")
        shutil.copytree(one, d)
        shutil.rmtree(d / "policy")
        cmd = cai_run(d, sets_of(n), only=["policy"])
        if n == 1:
            launch([sys.executable] + cmd)
        else:
            launch(two_cpu_processes() + cmd, {"ACCELERATE_USE_CPU": "1"})
        assert read_manifest(d / "policy")["world_size"] == n
    return out


def test_dpo_on_two_processes_equals_one_process(runs, tmp_path):
    """Soft-label DPO (full fine-tune against a frozen copy, packed log-probs) with the global batch of pairs
    split over 2 processes: the same per-step losses, gradient norms and reward metrics (gathered from both) and
    the same trained policy as one process, from the very same SFT model and pairs. One epoch whose last batch
    is partial: the pairs accelerate repeats to even it out over the processes are left out of the step."""
    sets = COMMON + per_device(1)[:2] + ["policy.algorithm=dpo", "dpo.epochs=1", "dpo.probe_prompts=1"]
    sets += ["dpo.learning_rate=1e-3", "dpo.probe_every=10"]
    sets += ["dpo.eval_fraction=0.25"]  # held-out pairs that each process holds a share of; 9 to train on
    out = policy_on_one_and_two_processes(
        runs[0], tmp_path / "dpo", lambda n: sets + [f"dpo.batch_size={GLOBAL_BATCH // n}"]
    )
    pairs = json.loads((out[1] / "policy" / "eval.json").read_text())["train_pairs"]
    assert pairs % GLOBAL_BATCH, pairs  # a partial last batch
    batch = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    compare_metrics(out[1], out[2], "policy", steps=-(-pairs // GLOBAL_BATCH), batch_metrics=batch)
    compare_weights(out[1] / "policy" / "policy", out[2] / "policy" / "policy")
    # the held-out implicit accuracy counts every process's pairs, and the token count every process's tokens
    evals = [json.loads((out[n] / "policy" / "eval.json").read_text()) for n in (1, 2)]
    for key in ("held_out_before", "held_out"):
        assert evals[0][key]["n"] == evals[1][key]["n"] >= 2
        assert evals[0][key]["accuracy"] == evals[1][key]["accuracy"]
        assert evals[0][key]["clusters"] == evals[1][key]["clusters"] >= 2  # each pair's prompt, gathered
        assert evals[0][key]["ci95"] == evals[1][key]["ci95"]
        assert_close(evals[0][key]["mean_margin"], evals[1][key]["mean_margin"], 1e-3, key)
    tokens = [
        [r["policy_tokens"] for r in read_jsonl(out[n] / "policy" / "metrics.jsonl") if "loss" in r]
        for n in (1, 2)
    ]
    assert tokens[0] == tokens[1] and tokens[0][-1] > 0


def test_lora_ppo_with_its_default_value_head_on_two_processes_equals_one_process(runs, tmp_path):
    """PPO as the quickstart runs it: a LoRA policy whose critic is, by default, a value head on its adapters, and
    the reference its adapters off. The global batch of 4 split over 2 DDP processes gives one process's samples,
    losses, value loss and step, and the same saved (merged) policy. Two epochs at a large learning rate, so that
    the second moves the adapters and the head away from the rollout's."""
    sets = COMMON + per_device(1)[:2] + ["ppo.lora={r: 8, alpha: 16}", "ppo.ppo_epochs=2"]
    sets += ["ppo.learning_rate=3e-3"]
    out = policy_on_one_and_two_processes(
        runs[0], tmp_path / "lora", lambda n: sets + [f"ppo.rollout_batch_size={GLOBAL_BATCH // n}"]
    )
    assert read_manifest(out[2] / "policy")["config"]["ppo"]["critic"] == "value_head"
    keys = ("objective/score", "objective/reward", "objective/kl", "loss/policy", "loss/value", "grad/norm")
    a, _ = same_update(out[1], out[2], (*keys, "policy/approx_kl", "val/explained_variance"))
    assert a["grad/norm"] > 0 and a["policy/approx_kl"] > 1e-4, a
    compare_weights(out[1] / "policy" / "policy", out[2] / "policy" / "policy")


def test_grpo_per_response_mean_on_two_processes_equals_one_process(runs, tmp_path):
    """GRPO with `policy.loss_mean: sequence` (the loss counts responses, over every process) and groups of 2
    samples, the global batch of 4 responses split over 2 processes: the same samples, losses and step as one
    process, from the very same SFT model and PM. Two epochs, so that the second moves away from the rollout's
    policy: approx-KL and the clip fraction, token means pooled over both processes, are one process's too."""
    sets = COMMON + per_device(1)[:2] + ["ppo.ppo_epochs=2", "ppo.learning_rate=3e-3"]
    sets += ["policy.algorithm=grpo", "policy.samples_per_prompt=2", "policy.loss_mean=sequence"]
    out = policy_on_one_and_two_processes(
        runs[0], tmp_path / "grpo", lambda n: sets + [f"ppo.rollout_batch_size={GLOBAL_BATCH // n}"]
    )
    keys = ("objective/score", "objective/reward", "loss/policy", "loss/kl", "grad/norm", "group/reward_std")
    a, _ = same_update(out[1], out[2], (*keys, "policy/approx_kl", "policy/clipfrac"))
    assert a["grad/norm"] > 0 and a["policy/approx_kl"] > 1e-4, a
    compare_weights(out[1] / "policy" / "policy", out[2] / "policy" / "policy")


def one_batch_of_4_and_two_processes(tmp_path, upstream: tuple[str, str], rows, stage: str, sets) -> dict:
    """{1: run, 2: run}: `stage` run alone on `rows` (the upstream stage's file, marked complete) by one process
    with batch 4, and by two gloo processes with batch 1 × grad_accum 2 (the same global batch of 4)."""
    from cai.runtime.rundir import append_jsonl, write_json

    out = {}
    for n, (bs, ga) in ((1, (4, 1)), (2, (1, 2))):
        run = out[n] = tmp_path / f"run{n}"
        (run / upstream[0]).mkdir(parents=True)
        append_jsonl(run / upstream[0] / upstream[1], rows)
        write_json(
            run / upstream[0] / "manifest.json",
            {"stage": upstream[0], "status": "complete", "fingerprint": "f", "output": "o"},
        )
        cmd = cai_run(run, sets + [f"{stage}.batch_size={bs}", f"{stage}.grad_accum={ga}"], only=[stage])
        if n == 1:
            launch([sys.executable] + cmd)
        else:
            launch(two_cpu_processes() + cmd, {"ACCELERATE_USE_CPU": "1"})
        assert read_manifest(run / stage)["world_size"] == n
    return out


def test_pm_partial_last_batch_on_two_processes_equals_one_batch(tmp_path, tiny_dir):
    """A value-head PM with an LM term on 11 training pairs, global batch 4: the third step has 3 pairs, which
    accelerate evens over 2 processes × 2 micro-batches by repeating a pair. The repeat is left out of the loss
    and the metrics, and each step is the mean over its global batch's pairs: one process with one batch of 4
    takes the same steps (losses, gradient norms, pooled metrics, weights)."""
    from safetensors.torch import load_file

    words = ["alpha", "kilo", "tango", "zulu", "yes", "no"]
    rows = [
        {
            "id": f"s{i}",
            "prompt_id": f"q{i}",
            "messages": [{"role": "user", "content": f"q{i % 5}?"}],
            "response_a": f"{words[i % 4]} {words[4 + i % 2]}.",
            "response_b": f"{words[(i + 1) % 4]} {words[5 - i % 2]}.",
            "p_a": [0.9, 0.2, 0.5][i % 3],
            "source": "ai",
        }
        for i in range(14)
    ]
    sets = [
        "stages=[feedback, preference_model]",
        "preference_model.head=value_head",
        "preference_model.lm_coef=0.5",
        # the value head's bias has a zero gradient without centring: Adam would turn float noise into steps
        "preference_model.center_coef=0.01",
        "preference_model.max_steps=3",
        "preference_model.eval_fraction=0.2",  # 3 of the 14 prompts: 11 training pairs
        "preference_model.norm_sample=2",
    ]
    out = one_batch_of_4_and_two_processes(
        tmp_path, ("feedback", "pairs.jsonl"), rows, "preference_model", sets
    )
    assert json.loads((out[1] / "preference_model" / "eval.json").read_text())["train_pairs"] == 11
    batch = ("accuracy", "margin", "mean_reward", "lm_loss")
    compare_metrics(out[1], out[2], "preference_model", steps=3, batch_metrics=batch)
    compare_weights(out[1] / "preference_model" / "model", out[2] / "preference_model" / "model")
    heads = [load_file(str(out[n] / "preference_model" / "model" / "value_head.safetensors")) for n in (1, 2)]
    for k in heads[0]:
        assert float((heads[0][k] - heads[1][k]).abs().max()) <= WEIGHT_ATOL, k


def test_sft_partial_last_batch_on_two_processes_equals_one_batch(tmp_path, tiny_dir):
    """SFT on 11 examples, global batch 4: the third step has 3 examples, which accelerate evens over 2 processes
    × 2 micro-batches by repeating one. The repeat is left out of the loss, its token count and the logged metrics
    (num_tokens; entropy and accuracy pooled over the step's real tokens): one process with one batch of 4 takes
    the same steps (losses, gradient norms, metrics, weights)."""

    words = ["alpha", "kilo", "tango", "zulu", "yes", "no", "maybe"]
    rows = [
        {
            "kind": "red_team",
            "prompt": [{"role": "user", "content": f"q{i} {words[i % 7]}?"}],
            "final": " ".join(words[(i + k) % 7] for k in range(2 + i % 4)) + ".",
        }
        for i in range(11)
    ]
    sets = ["stages=[critique_revise, sft]", "sft.max_steps=3", "sft.save_steps=10"]
    out = one_batch_of_4_and_two_processes(tmp_path, ("critique_revise", "data.jsonl"), rows, "sft", sets)
    compare_metrics(
        out[1], out[2], "sft", steps=3, batch_metrics=("entropy", "mean_token_accuracy", "num_tokens")
    )
    compare_weights(out[1] / "sft" / "model", out[2] / "sft" / "model")


# ------------------------------------------------------------------------------------------- DeepSpeed
def filled_deepspeed_config(ds_file: Path, micro_batch: int = 2, grad_accum: int = 1, world: int = 1) -> dict:
    """A DeepSpeed JSON with its "auto" entries filled the way accelerate and the HF Trainer fill them."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(ds_file))
    hidden = 4096
    plugin.deepspeed_config_process(
        must_match=False,
        train_micro_batch_size_per_gpu=micro_batch,
        train_batch_size=micro_batch * grad_accum * world,
        gradient_accumulation_steps=grad_accum,
        gradient_clipping=1.0,
        **{
            "bf16.enabled": True,
            "fp16.enabled": False,
            "zero_optimization.reduce_bucket_size": hidden * hidden,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
        },
    )
    return plugin.deepspeed_config


ENGINE_FILES = ["multi_gpu.yaml", "zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "fsdp.yaml"]
EXPECTED = {  # config file -> (distributed type, ZeRO stage, offload device)
    "multi_gpu.yaml": ("MULTI_GPU", None, None),
    "zero2.yaml": ("DEEPSPEED", 2, None),
    "zero3.yaml": ("DEEPSPEED", 3, None),
    "zero3_offload.yaml": ("DEEPSPEED", 3, "cpu"),
    "fsdp.yaml": ("FSDP", None, None),
}


@pytest.mark.parametrize("name", ENGINE_FILES)
def test_accelerate_configs_parse(name):
    """accelerate reads every shipped config; the DeepSpeed ones pass DeepSpeed's own parser once filled."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / name))
    kind, stage, offload = EXPECTED[name]
    assert str(cfg.distributed_type).endswith(kind)
    assert (CONFIGS / name).read_text().lstrip().startswith("#"), "each config starts with when to pick it"
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # stage outputs are HF folders
        # true would make transformers load zeros into every model on ranks != 0 (check_launch_env refuses it)
        assert cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
    if kind != "DEEPSPEED":
        return
    ds_file = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
    assert ds_file.is_file() and ds_file.parent == CONFIGS
    raw = json.loads(ds_file.read_text())
    assert raw["zero_optimization"]["stage"] == stage
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = filled_deepspeed_config(ds_file)
    assert "auto" not in json.dumps(filled), "an 'auto' entry that neither accelerate nor the Trainer fills"
    parsed = DeepSpeedConfig(filled)
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_micro_batch_size_per_gpu == 2
    got = parsed.zero_config.offload_optimizer.device if parsed.zero_config.offload_optimizer else None
    assert (str(got.value if hasattr(got, "value") else got) if got else None) == offload
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save, "ZeRO-3 must save whole weights"


def test_fsdp_cpu_ram_efficient_loading_is_refused(monkeypatch):
    """A user's FSDP config with fsdp_cpu_ram_efficient_loading: true (accelerate's launcher exports it) is refused
    in one line before any model loads: transformers would give every rank but the first zero weights."""
    from cai.errors import UserError
    from cai.runtime import distributed as dist

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(UserError, match="fsdp_cpu_ram_efficient_loading") as err:
        dist.init_from_env()
    assert "\n" not in str(err.value)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    dist.check_launch_env()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    dist.check_launch_env()


def test_deepspeed_parser_rejects_a_bad_config(tmp_path):
    """The check above can fail: a misspelt ZeRO key is refused by DeepSpeed's parser."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((CONFIGS / "ds_zero3.json").read_text())
    raw["zero_optimization"]["stage3_prefetch_bucket_sz"] = 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(Exception, match="stage3_prefetch_bucket_sz"):
        DeepSpeedConfig(filled_deepspeed_config(bad))


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_training_stages_under_deepspeed(runs, tmp_path, engine):
    """One process through recipes/accelerate/<engine>.yaml: SFT, PM and a PPO update train as without
    DeepSpeed, and the saved models (ZeRO-3: gathered from the shards on save) equal the reference run's."""
    pytest.importorskip("deepspeed")
    one, _, _ = runs
    run_dir = tmp_path / engine
    run_dir.mkdir()
    for stage in ("critique_revise", "feedback"):
        shutil.copytree(one / stage, run_dir / stage)
    shutil.copy(one / "recipe.json", run_dir / "recipe.json")
    cmd = [
        str(ACCELERATE),
        "launch",
        "--config_file",
        str(CONFIGS / f"{engine}.yaml"),
        "--num_processes",
        "1",
        "--main_process_port",
        str(free_port()),
    ]
    # no ACCELERATE_USE_CPU here: it would turn the DeepSpeed launch into a plain CPU one
    out = launch(
        cmd + cai_run(run_dir, COMMON + per_device(1), only=["sft", "preference_model", "policy"]),
        unset=("ACCELERATE_USE_CPU",),
    )
    # a world of one on a CPU: DeepSpeed's shared-memory all-reduce kernel is neither built nor loaded
    assert "shm_comm" not in out, out[-2000:]
    for stage in ("sft", "preference_model", "policy"):
        m = read_manifest(run_dir / stage)
        assert m["status"] == "complete" and m["engine"] == f"deepspeed-{engine}" and m["world_size"] == 1
    for stage in ("sft", "preference_model"):
        compare_metrics(one, run_dir, stage, steps=2)
        compare_weights(one / stage / "model", run_dir / stage / "model")
    # PPO: the engine's own checkpoint, the same update as the reference run, and the gathered policy
    assert (run_dir / "policy" / "checkpoints" / "step-000001" / "deepspeed").is_dir()
    (a,), (b,) = (
        read_jsonl(one / "policy" / "metrics.jsonl"),
        read_jsonl(run_dir / "policy" / "metrics.jsonl"),
    )
    for k in ("objective/score", "objective/kl", "loss/value", "loss/policy"):
        assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), f"ppo {k}: {a[k]} vs {b[k]}"
    compare_weights(one / "policy" / "policy", run_dir / "policy" / "policy")


ENGINE_CASES = [("zero2", False), ("zero3", False), ("fsdp", False), ("zero3", True), ("fsdp", True)]


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """tests/ppo_engine_run.py launched once per engine, with every variant ENGINE_CASES asks of that engine
    (one launch, as one `cai run` trains several models): engine -> its output folder."""
    done: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in done:
            out = tmp_path_factory.mktemp(engine)
            variants = ["lora" if lora else "full" for e, lora in ENGINE_CASES if e == engine]
            script = [str(ROOT / "tests" / "ppo_engine_run.py"), str(out), engine, *variants]
            if engine == "fsdp":
                launch([sys.executable] + script, {"MASTER_PORT": str(free_port())})
            else:
                pytest.importorskip("deepspeed")
                cmd = [str(ACCELERATE), "launch", "--config_file", str(CONFIGS / f"{engine}.yaml")]
                cmd += ["--num_processes", "1", "--main_process_port", str(free_port())]
                launch(cmd + script, unset=("ACCELERATE_USE_CPU",))
            done[engine] = out
        return done[engine]

    return get


@pytest.mark.parametrize("engine,lora", ENGINE_CASES)
def test_ppo_trainer_under_an_engine_matches_and_resumes(tmp_path, engine_runs, engine, lora):
    """The PPO trainer under DeepSpeed ZeRO-2/3 (one process) or FSDP2 (one process over gloo; see
    tests/ppo_engine_run.py for how FSDP is started on a CPU) trains exactly as without an engine, with
    minibatches, gradient accumulation and a critic warm-up; it resumes from its checkpoint to the same weights,
    and the policy gathered from the shards on save equals the plain run's. With `lora`: a LoRA policy with a
    value head, whose reference is the policy with its adapters off, merged on save."""
    import ppo_engine_run
    import torch
    from safetensors.torch import load_file

    out = engine_runs(engine) / ("lora" if lora else "full")
    saved = "model.safetensors" if engine == "fsdp" else "deepspeed"
    assert (out / "resumed" / "checkpoints" / "step-000003" / saved).exists()
    plain = ppo_engine_run.build(tmp_path / "plain", lora=lora)
    plain.train()
    want = ppo_engine_run.weights(plain)
    for run in ("straight", "resumed"):
        got = load_file(str(out / f"{run}.safetensors"))
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=WEIGHT_ATOL, msg=f"{run} {name}")
    rows = read_jsonl(out / "straight" / "metrics.jsonl")
    assert [r["loss/policy"] == 0 for r in rows] == [True, False, False]  # the critic warm-up update
    for a, b in zip(rows, read_jsonl(tmp_path / "plain" / "metrics.jsonl")):
        assert_close(a["loss/value"], b["loss/value"], LOSS_RTOL, f"loss/value at update {a['step']}")
        assert_close(a["objective/score"], b["objective/score"], LOSS_RTOL, f"score at update {a['step']}")
    # clipping was active once the policy trains (the largest gradient norm of the update over max_grad_norm)
    assert all(r["grad/norm"] > 0.2 for r in rows[1:]), [r["grad/norm"] for r in rows]
    plain.save_policy(tmp_path / "plain_policy")
    compare_weights(tmp_path / "plain_policy", out / "policy")


def test_a_non_finite_reward_on_one_process_stops_every_process(tmp_path):
    """Rank 1's reward turns NaN at the second update: both processes raise the same one-line error (none is
    left waiting in the next collective) and a checkpoint of the diverged state is written."""
    script = [str(ROOT / "tests" / "ppo_engine_run.py"), str(tmp_path), "nan"]
    launch(two_cpu_processes() + script, {"ACCELERATE_USE_CPU": "1"}, timeout=300)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert msgs[0] == msgs[1] and "non-finite reward at update 2 on 1 of 2 process(es)" in msgs[0], msgs
    assert (tmp_path / "run" / "checkpoints" / "diverged-step-000001" / "state.json").is_file()


ENDS_ITSELF = """
import atexit, os, sys
import torch.distributed as d
from cai.runtime import distributed as dist
from cai.cli.main import main
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
d.init_process_group("gloo", rank=0, world_size=1)
if sys.argv[2] == "left":
    dist.shutdown()
atexit.register(lambda: print("exit functions ran"))
print("buffered output", end="")
main(["recipe", "validate", "no-such-recipe.yaml"])
print("returned from main")
"""


@pytest.mark.parametrize("group", ["left", "open"])
def test_cai_ends_a_process_that_was_in_a_group_with_its_exit_code(group):
    """`cai` ends a process that has been in a process group itself (os._exit after the exit functions), so that
    gloo's threads, alive after the group is destroyed, cannot abort it in the interpreter's teardown: the
    command's exit code (2, a bad recipe path), buffered output and exit functions all survive, with the group
    left or still open (a stage's error)."""
    proc = subprocess.run(
        [sys.executable, "-c", ENDS_ITSELF, str(free_port()), group],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no-such-recipe.yaml" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "buffered outputexit functions ran\n", proc.stdout


def test_deepspeed_launch_keeps_deepspeed_on_cpu(monkeypatch):
    """accelerate switches DeepSpeed off when told cpu=True: under a DeepSpeed launch the stages must not."""
    from cai.runtime import distributed as dist

    assert dist.accelerator_cpu("cpu") and not dist.accelerator_cpu("cuda")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert not dist.accelerator_cpu("cpu")


@pytest.mark.parametrize(
    "device, use_cpu, expected",
    [("cpu", "", "gloo"), ("auto", "", "nccl"), ("cuda", "", "nccl"), ("auto", "true", "gloo")],
)
def test_process_group_backend_follows_the_recipe_device(monkeypatch, device, use_cpu, expected):
    """On a machine with GPUs, a launch of a `device: cpu` recipe joins a gloo group (nccl cannot reduce the CPU
    tensors its models give); a GPU recipe joins nccl, and a launch with --cpu gloo."""
    import torch
    import torch.distributed as tdist

    from cai.runtime import distributed as dist

    if tdist.is_available() and tdist.is_initialized():
        pytest.skip("a process group is already open in this process")
    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(("device", i)))
    monkeypatch.setattr(tdist, "init_process_group", lambda backend: chosen.append(("backend", backend)))
    dist.init_from_env(device)
    assert ("backend", expected) in chosen
    assert (("device", 1) in chosen) == (expected == "nccl")
