"""The benchmarks' own arithmetic and checks: the compute floor the PPO benchmark reports (bench/floor.py: its
FLOP count is the one torch counts, and a hand count on small shapes), the TRL virtualenv's pinned versions, the
pm eval agreement check of bench/pair_scoring.py, and bad arguments failing in one line before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from floor import (  # noqa: E402
    adapter_weights,
    decoder_shapes,
    floor_seconds,
    head_flops,
    linear_weights,
    trunk_flops,
    update_work,
)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attn_implementation="eager",  # attention as matmuls, so that torch counts them
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), decoder_shapes(cfg.to_dict())


def counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_forward_flops_are_torchs_count(llama):
    model, s = llama
    L = 10
    ids = torch.randint(0, 300, (1, L))
    trunk = counted(lambda: model.model(input_ids=ids))
    # torch counts the eager attention's full square; the floor counts the causal triangle it needs
    square = 4 * s["layers"] * s["heads"] * s["head_dim"] * L * L
    assert trunk - square == 2 * linear_weights(s) * L
    assert trunk_flops(s, L) - 2 * linear_weights(s) * L == square * (L + 1) / (2 * L)
    with_head = counted(lambda: model(input_ids=ids, logits_to_keep=4))
    assert with_head - trunk == head_flops(s, 4)


def test_a_backward_is_twice_its_forward_and_the_update_adds_up(llama):
    model, s = llama
    ids = torch.randint(0, 300, (1, 10))
    forward = counted(lambda: model(input_ids=ids))
    assert counted(lambda: model(input_ids=ids).logits.sum().backward()) == 3 * forward
    full = update_work(s, [6, 4], response_length=5, epochs=4)
    lora = update_work(s, [6, 4], response_length=5, epochs=4, lora_r=2)
    assert full["train"] > lora["train"] and full["ref"] == lora["ref"]
    assert full["flops"] == pytest.approx(
        sum(full[k] for k in ("prefill", "ref", "value", "reward", "train"))
    )
    rates = {"matmul_flops": 1e9, "copy_bytes": 1e12}  # decoding bound by its matmuls here
    assert floor_seconds(full, rates) == pytest.approx((full["flops"] + full["decode_flops"]) / 1e9)


# d 4, MLP 6, 1 layer, 2 heads of 2, 1 kv head, vocabulary 10: linears q 4x4, k 4x2, v 4x2, o 4x4, gate, up 4x6,
# down 6x4 = 16 + 8 + 8 + 16 + 24 + 24 + 24 = 120 weights; attention 4 x 1 layer x 2 heads x 2 = 16 FLOPs per
# attended pair
SMALL = {"d": 4, "ffn": 6, "layers": 1, "heads": 2, "kv_heads": 1, "head_dim": 2, "vocab": 10}


def test_the_floor_by_hand_with_a_shared_prefix_a_reused_value_forward_and_lora():
    s = SMALL
    assert linear_weights(s) == 120
    # rank 1 adapters on all seven: r (in + out) = 8 + 6 + 6 + 8 + 10 + 10 + 10
    assert adapter_weights(s, 1) == 58 and adapter_weights(s, 1, ("q", "v")) == 14
    # prompts 3 and 5, responses 2: rows of 5 and 7 tokens, the first 2 shared (computed once)
    args = (s, [3, 5], 2, 1)
    # settings' floor (no sharing): linears 2 x 120 x 12 positions; attention 16 x (15 + 28) pairs
    full = 2 * 120 * 12 + 16 * 43
    head = 2 * 4 * 10 * 4  # the LM head on the 2 x 2 response positions
    prefill = 2 * 120 * 8 + 16 * (6 + 15)
    w = update_work(*args)
    assert (w["prefill"], w["ref"], w["value"], w["reward"]) == (prefill, full + head, full, full)
    assert w["train"] == 3 * ((full + head) + full)
    # the second row's copy of the 2 shared tokens drops out: 10 positions, its 3 pairs among themselves
    shared = 2 * 120 * 10 + 16 * (43 - 3)
    w = update_work(*args, shared_prefix=2, rollout_value=False)
    assert w["prefill"] == 2 * 120 * 6 + 16 * (21 - 3)
    assert (w["ref"], w["value"], w["reward"]) == (shared + head, 0, shared)
    assert w["train"] == 3 * ((shared + head) + shared)
    assert w["flops"] == w["prefill"] + w["ref"] + w["reward"] + w["train"]
    # LoRA r 1: frozen linears and head 2x (forward, input gradient), attention 3x, adapters 3x their forward
    adapters = 2 * 58 * 10
    one = 2 * (2 * 120 * 10) + 3 * 16 * 40 + 3 * adapters
    w = update_work(*args, lora_r=1, shared_prefix=2)
    assert w["train"] == (one + 2 * head) + one
    assert w["value"] == shared + adapters and w["ref"] == shared + head and w["reward"] == shared
    # two epochs: twice the training, the rest once
    assert update_work(s, [3, 5], 2, 2, lora_r=1, shared_prefix=2)["train"] == 2 * w["train"]
    # without each row's last token (rows of 4 and 6): 8 positions, pairs 10 + 21 - 3; the reward keeps it
    short = 2 * 120 * 8 + 16 * (31 - 3)
    w = update_work(*args, shared_prefix=2, rollout_value=False, last_token=False)
    assert (w["ref"], w["value"], w["reward"]) == (short + head, 0, shared)
    assert w["train"] == 3 * ((short + head) + short)


def test_adapter_flops_are_torchs_count(llama):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model, s = llama
    L = 10
    ids = torch.randint(0, 300, (1, L))
    base = counted(lambda: model.model(input_ids=ids))
    lora = get_peft_model(LlamaForCausalLM(model.config), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        adapted = counted(lambda: lora.base_model.model.model(input_ids=ids))
    assert adapted - base == 2 * adapter_weights(s, 4) * L


def test_ppo_vs_trl_gives_each_side_its_own_floor(tmp_path):
    import ppo_vs_trl as bench

    from cai.runtime.packing import common_prefix

    opening = list(range(100, 124))  # 24 tokens every prompt begins with
    ids = [opening + [200 + i] + [7] * n for i, n in enumerate((20, 30, 25))]
    (tmp_path / "prompts.json").write_text(json.dumps({"input_ids": ids}))
    config = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=300
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    count = bench.count_inputs(str(tmp_path), str(tmp_path / "prompts.json"))
    assert count["shared_prefix"] == common_prefix(ids) == 24 and count["prompt_lens"] == [45, 55, 50]
    works = bench.floor_works(count)
    args = (count["shapes"], count["prompt_lens"], 48, 4)
    assert works["trl"] == works["trl-kept"] == (update_work(*args),) * 2
    settings, own = works["ours"]
    assert settings == update_work(*args)
    assert own == update_work(*args, shared_prefix=24, rollout_value=False, last_token=False)
    assert own["value"] == 0
    assert works["ours-lora-separate"] == (
        update_work(*args, lora_r=16),
        update_work(*args, lora_r=16, shared_prefix=24, rollout_value=False, last_token=False),
    )
    # the LoRA default: one trunk for policy and critic, the rollout's values from epoch 0's trunk forward
    assert works["ours-lora"] == (
        update_work(*args, lora_r=16, critic=False),
        update_work(*args, lora_r=16, shared_prefix=24, critic=False, rollout_value=False, last_token=False),
    )
    rates = {"matmul_flops": 1e9, "copy_bytes": 1e12}
    run = {"round": 0, "updates": [{"seconds": 10.0}]}
    shares = bench.floor_shares(
        {"rates": [{"round": 0, **rates, "count": count}], "ours": [run], "trl": [run]}
    )
    f_set, s_set, f_own, s_own = shares["ours"]
    assert f_set == floor_seconds(settings, rates) > f_own == floor_seconds(own, rates)
    assert (s_set, s_own) == (f_set / 10, f_own / 10) and shares["trl"][0] == shares["trl"][2] == f_set


def test_the_trl_venv_is_pinned_to_this_interpreters_versions(tmp_path, monkeypatch):
    import ppo_vs_trl as bench

    want = {"trl": "1.12.0", **{p: version(p) for p in ("torch", "transformers", "accelerate", "datasets")}}
    py = tmp_path / "bin" / "python"
    py.parent.mkdir()
    py.write_text("")
    installed = {**want, "transformers": "5.23.0"}  # a venv built with another transformers
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if "install" in cmd:
            installed.update(a.split("==") for a in cmd if "==" in a)
        out = json.dumps({n: installed[n] for n in cmd[3:]}) if "-c" in cmd else ""
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(bench.subprocess, "run", run)
    assert bench.ensure_venv(tmp_path) == py
    pips = [c for c in calls if "install" in c]
    assert [a for a in pips[0] if "==" in a] == [
        f"torch=={want['torch']}"
    ]  # alone and first, its wheel's label kept
    assert sorted(a for a in pips[1] if "==" in a) == sorted(
        f"{k}=={v}" for k, v in want.items() if k != "torch"
    )
    calls.clear()
    # all five match now: nothing installed
    assert bench.ensure_venv(tmp_path) == py and not [c for c in calls if "install" in c]
    rows = {
        "trl": [{"versions": {**want, "transformers": "5.23.0"}}],
        "ours": [{"versions": {k: v for k, v in want.items() if k != "trl"}}],
    }
    line = bench.versions_line(rows)
    assert (
        "TRL trl 1.12.0, torch" in line
        and "; ours torch" in line
        and "transformers 5.23.0" in line
        and line.endswith("two sides: transformers")
    )


def test_pair_scoring_fails_when_packed_and_padded_scores_differ(monkeypatch, tmp_path, capsys):
    import pair_scoring as ps

    import cai.pm.scoring as scoring

    padded = [0.10, -0.20, 0.30, -0.05]
    for packed, fails in (([x + 0.5 * (-1) ** i for i, x in enumerate(padded)], True), (padded, False)):
        monkeypatch.setattr(ps, "make_pm", lambda out: out)
        monkeypatch.setattr(ps, "feedback_rows", lambda n, seed=0: [])
        monkeypatch.setattr(
            ps,
            "time_eval",
            lambda pm, n, packed=packed: (
                1.0,
                {"accuracy": 0.5, "mean_margin": 0.0, "scores": packed if scoring.PACKED else padded},
            ),
        )
        monkeypatch.setattr(
            sys, "argv", ["pair_scoring.py", "--skip-stage", "--rounds", "2", "--pm", str(tmp_path)]
        )
        if fails:
            with pytest.raises(SystemExit, match=r"disagree: largest score difference 5.0e-01 > 1e-04"):
                ps.main()
        else:
            ps.main()
            out = capsys.readouterr().out
            assert "largest raw score difference 0.0e+00 over 4 scores" in out and "pm eval agrees" in out
    assert ps.eval_disagreement(
        {"accuracy": 1.0, "scores": padded}, {"accuracy": 0.75, "scores": padded}
    ) == (0.0, "accuracy 1.0000 packed, 0.7500 padded")


def test_bad_arguments_fail_in_one_line_before_any_model_loads(tmp_path):
    partial = tmp_path / "partial.jsonl"  # an interrupted run: its rates and TRL's first process only
    rates = {"kind": "rates", "round": 0, "matmul_flops": 1e9, "copy_bytes": 1e9}
    trl = {"kind": "trl", "round": 0, "updates": [{"seconds": 1.0, "cpu_seconds": 1.0}], "peak_rss_mb": 1.0}
    partial.write_text(json.dumps(rates) + "\n" + json.dumps(trl) + "\n")
    results = tmp_path / "results.jsonl"
    results.write_text("kept\n")
    cases = [
        (["ppo_vs_trl.py", "--summarize", str(tmp_path / "nope.jsonl")], "no such file"),
        (["ppo_vs_trl.py", "--summarize", str(partial)], "holds no rows of ours"),
        (
            ["ppo_vs_trl.py", "--rounds", "0", "--results", str(results)],
            "--rounds: a whole number of 1 or more",
        ),
        (["sft_step.py", "--rounds", "0"], "--rounds: a whole number of 1 or more is expected, not '0'"),
        (["dpo_step.py", "--pairs", "-3"], "--pairs: a whole number"),
        (["logprobs_head.py", "--batch-sizes", "8,x"], "--batch-sizes: comma-separated whole numbers"),
        (["generation.py", "--batch-sizes", "x"], "--batch-sizes: comma-separated whole numbers"),
        (["decode_sampler.py", "--rounds", "0"], "--rounds: a whole number"),
        (["pair_scoring.py", "--eval-pairs", "0"], "--eval-pairs: a whole number"),
        (["floor.py", "--help"], "is a module of the benchmarks"),
        (["rounds.py", "--help"], "is a module of the benchmarks"),
    ]
    procs = [
        (subprocess.Popen([sys.executable, str(BENCH / a[0]), *a[1:]], stdout=-1, stderr=-1, text=True), a, m)
        for a, m in cases
    ]
    for proc, args, message in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()[-1]) < 200 and not out, args
    assert results.read_text() == "kept\n"  # the bad --rounds left the results file alone
