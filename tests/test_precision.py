"""The precision policy at the settings GPU users run, proved on the CPU with the tiny model in bf16: every
training stage learns (fp32 master weights), heads and scores stay fp32, the first step of a PPO update starts
at ratio 1, rollouts come from the recipe's sampling settings alone, and a checkpoint another run wrote is
refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from test_ppo import lowercase_fraction
from test_preference_model import feedback_fixture, synthetic_pairs
from test_sft import cr_dir, mean_loglik, run_sft  # noqa: F401  (cr_dir: a fixture)

from cai.config.fields import LoraConfig
from cai.config.policy import PPOConfig
from cai.errors import UserError
from cai.rl import checkpoint
from cai.rl import ppo_math as pm
from cai.rl.modules import PolicyModel, ValueModel
from cai.rl.rewards import FunctionReward
from cai.rl.trainer import PPOTrainer
from cai.runtime.models import load_model, load_tokenizer, wrap_lora
from cai.runtime.rundir import MetricsLog, read_jsonl, read_manifest
from cai.runtime.settings import Precision, Settings, fp32_head
from cai.stages.policy import reference

PROMPTS = [{"messages": [{"role": "user", "content": f"Write something, please ({i})."}]} for i in range(8)]
BF16 = Settings(dtype="bfloat16")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed-precision mode cannot change: these tests switch
    between fp32 and bf16 in one process (a run does not: one recipe, one dtype)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def saved_dtypes(folder) -> set:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_policy_and_fp32_heads():
    p = Precision.of(BF16, "cpu")
    assert (p.compute, p.master, p.frozen, p.heads, p.save, p.mixed) == (
        "bfloat16",
        "float32",
        "bfloat16",
        "float32",
        "float32",
        "bf16",
    )
    assert (
        Precision.of(Settings(), "cpu").mixed == "no"
        and Precision.of(Settings(), "cuda:0").compute == "bfloat16"
    )
    # a head on a bf16 trunk under autocast: fp32 weights, fp32 maths, an unquantised score
    head = torch.nn.Linear(64, 1).to(torch.bfloat16)
    fp32_head(head)
    h = torch.randn(3, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(h)
    assert out.dtype == torch.float32 and head.weight.dtype == torch.float32
    assert torch.allclose(out, h.float() @ head.weight.T + head.bias, atol=1e-6)


def test_sft_learns_in_bf16_and_saves_fp32_master_weights(tiny, cr_dir, tmp_path):  # noqa: F811
    base, tok = tiny
    ctx = run_sft(cr_dir, tmp_path / "sft", "dtype=bfloat16")
    revisions = [r for r in read_jsonl(cr_dir / "data.jsonl") if r["kind"] == "red_team"]
    trained = load_model(str(tmp_path / "sft" / "model"))
    assert mean_loglik(trained, tok, revisions) > mean_loglik(base, tok, revisions) + 0.05
    assert saved_dtypes(tmp_path / "sft" / "model") == {torch.float32}
    assert ctx.summary["precision"]["compute"] == "bfloat16"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_learns_in_bf16_from_its_packed_log_probs(tmp_path, lora):
    """Soft-label DPO under bf16 autocast on fp32 master weights (the reference a frozen bf16 copy, or the
    adapters off): its packed sequence log-probs move the implicit reward to the learnable preference."""
    from test_policy import dpo_trainer, learnable_pairs

    from cai.eval.implicit import implicit_accuracy

    trainer = dpo_trainer(tmp_path, learnable_pairs(), lora=lora, lr=1e-2 if lora else 3e-3, dtype="bfloat16")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert trainer.packs(trainer.model, batch) and trainer.args.bf16
    before = implicit_accuracy(trainer)  # near ties: the policy is its reference, up to bf16 rounding
    trainer.train()
    after = implicit_accuracy(trainer)
    assert after["accuracy"] >= 0.9 and after["mean_margin"] > before["mean_margin"] + 0.5, (before, after)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize(
    "head,lora", [("classifier", False), ("classifier", True), ("value_head", False), ("value_head", True)]
)
def test_pm_learns_in_bf16(tiny_recipe, tmp_path, head, lora):
    """bf16 compute (autocast) on fp32 master weights: the PM learns a learnable preference, for both heads,
    full and LoRA; the saved weights are the fp32 masters; the manifest records the policy."""
    from cai import pipeline

    sets = [
        "dtype=bfloat16",
        "stages=[feedback,preference_model]",
        f"preference_model.head={head}",
        "preference_model.max_steps=16",
        "preference_model.batch_size=8",
        f"preference_model.learning_rate={1e-2 if lora else 3e-3}",
        "preference_model.eval_fraction=0.25",
        "preference_model.save_steps=50",
    ]
    if lora:
        sets.append("preference_model.lora={r: 8, alpha: 16}")
    run = tmp_path / "run"
    rows = synthetic_pairs(96)
    feedback_fixture(run, rows)
    recipe = tiny_recipe(*sets)
    pipeline.run(recipe, only=["preference_model"], quiet=True)
    out = run / "preference_model"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["held_out"]["accuracy"] >= 0.85 > ev["held_out_before"]["accuracy"], ev
    assert saved_dtypes(out / "model") == {torch.float32}
    assert read_manifest(out)["summary"]["precision"]["compute"] == "bfloat16"
    # the held-out figures and score_norm.json are those of the saved PM as PPO's reward loads it (bf16 trunk,
    # the fp32 head as saved): the normalised rewards PPO computes have mean 0 and std 1 on the reference set
    from types import SimpleNamespace

    from cai.pm.pairs import held_out_eval, split_pairs
    from cai.pm.scoring import RewardScorer
    from cai.stages.preference_model import reference_responses

    scorer = RewardScorer(out / "model", recipe.settings)
    train, held = split_pairs(rows, 0.25, recipe.seed)
    again = held_out_eval(scorer.model, scorer.tokenizer, held, 256, 8)
    assert again["accuracy"] == ev["held_out"]["accuracy"]
    assert again["mean_margin"] == pytest.approx(ev["held_out"]["mean_margin"], abs=1e-6)
    cap = recipe.preference_model.norm_sample
    ref, _ = reference_responses(SimpleNamespace(input_dir=lambda stage: run / stage), train, held, cap, 0)
    scores = scorer.score([h["messages"] + [{"role": "assistant", "content": h["text"]}] for h in ref])
    norm = json.loads((out / "model" / "score_norm.json").read_text())
    assert float(scores.mean()) == pytest.approx(norm["mean"], abs=1e-6)


def test_a_pm_head_stays_fp32_through_a_bf16_save_and_a_bf16_load(tiny_dir, tmp_path):
    """save_dtype bfloat16 wrote the classifier's score head in bf16 (the value head in fp32 files holding
    bf16-rounded values), and a bf16 load rounded an fp32 head: the head is saved and reloaded as trained."""
    from types import SimpleNamespace

    from safetensors import safe_open

    from cai.pm.build import fresh_pm
    from cai.pm.scoring import RewardScorer, scalar_head
    from cai.runtime.training import save_trained

    for head_kind, head_file, key in (
        ("classifier", "model.safetensors", "score.weight"),
        ("value_head", "value_head.safetensors", "weight"),
    ):
        model, tok = fresh_pm("tiny-random-llama", head_kind, Settings(seed=3))
        trained = scalar_head(model).weight.detach().clone()
        assert not torch.equal(trained, trained.bfloat16().float())  # values bf16 cannot hold
        folder = tmp_path / head_kind
        save_trained(SimpleNamespace(), model, tok, folder, merge=False, dtype="bfloat16")
        with safe_open(str(folder / head_file), "pt") as f:
            assert torch.equal(f.get_tensor(key), trained)  # fp32, as trained
        loaded = scalar_head(RewardScorer(folder, BF16).model).weight
        assert loaded.dtype == torch.float32 and torch.equal(loaded.detach(), trained)


def test_a_pm_folder_without_its_head_is_refused_not_scored_with_a_random_one(tiny_dir, tmp_path):
    import shutil

    from cai.errors import UserError
    from cai.pm.build import fresh_pm
    from cai.pm.scoring import RewardScorer
    from cai.runtime.training import save_trained

    with pytest.raises(UserError, match="no trained score head"):
        RewardScorer(tiny_dir)  # a causal LM folder: no score head in its weights
    model, tok = fresh_pm("tiny-random-llama", "value_head", Settings())
    from types import SimpleNamespace

    save_trained(SimpleNamespace(), model, tok, tmp_path / "vh", merge=False)
    shutil.copytree(tmp_path / "vh", tmp_path / "headless")
    (tmp_path / "headless" / "value_head.safetensors").unlink()
    with pytest.raises(UserError, match="value_head.safetensors: missing"):
        RewardScorer(tmp_path / "headless")


def ppo_trainer(tmp_path, *, lora: bool, value_head: bool, dtype: str = "bfloat16", lm_dir=None, **over):
    """One tiny PPO trainer as the ppo stage builds it: fp32 master policy (and critic), the reference as the
    stage loads it (cai.stages.policy.reference: the policy's weights dtype, run under its autocast)."""

    settings = Settings(dtype=dtype)
    precision = Precision.of(settings, "cpu")
    ref_dir = lm_dir or "tiny-random-llama"
    base = dict(
        updates=1, rollout_batch_size=8, response_length=8, ppo_epochs=1, learning_rate=1e-5, temperature=1.0
    )
    cfg = PPOConfig(
        lora=LoraConfig(r=8, alpha=16) if lora else None,
        critic="value_head" if value_head else "separate",
        **{**base, **over},
    )
    torch.manual_seed(0)
    lm = load_model(ref_dir, precision.trainable(settings))
    ref = None if lora else reference(ref_dir, settings, "cpu")
    if lora:
        lm = wrap_lora(lm, cfg.lora)
    critic = (
        None if value_head else ValueModel(load_model(ref_dir, precision.trainable(settings), kind="seq_cls"))
    )
    policy = PolicyModel(lm, value_head=value_head)
    return tiny_ppo_trainer(cfg, policy, critic, ref, load_tokenizer(ref_dir), precision, tmp_path)


def tiny_ppo_trainer(cfg, policy, critic, ref, tok, precision, tmp_path):
    """A PPOTrainer on the given models, the lowercase-fraction reward and the test prompts, on the CPU."""
    from accelerate import Accelerator

    return PPOTrainer(
        cfg,
        policy=policy,
        tokenizer=tok,
        reward=FunctionReward(lowercase_fraction),
        prompts=PROMPTS,
        out_dir=tmp_path,
        critic=critic,
        ref_model=ref,
        accelerator=Accelerator(cpu=True, mixed_precision=precision.mixed),
        seed=0,
        metrics=MetricsLog(tmp_path / "metrics.jsonl"),
        show_progress=False,
        precision=precision,
        run_token="token-a",
    )


@pytest.mark.parametrize("lora,value_head", [(False, False), (False, True), (True, False), (True, True)])
def test_ppo_learns_in_bf16_and_starts_each_update_at_ratio_one(tmp_path, lora, value_head):
    """One update at lr 1e-5 in bf16 changes at least 90% of the trained tensors (AdamW on bf16 weights would
    leave most of them exactly as they were), the first step starts at ratio 1 within the bf16 tolerance
    (old log-probs from a training-like forward), and values are fp32."""
    trainer = ppo_trainer(tmp_path, lora=lora, value_head=value_head)
    assert trainer.logprobs_from_generation is False
    trained = {n: p for n, p in trainer.policy.named_parameters() if p.requires_grad and "v_head" not in n}
    assert {p.dtype for p in trained.values()} == {torch.float32}
    if lora:  # LoRA's B matrices start at 0, so only they move on the first step (A's gradient is B-weighted)
        trained = {n: p for n, p in trained.items() if "lora_B" in n}
    before = {n: p.detach().clone() for n, p in trained.items()}
    (row,) = trainer.train()
    changed = sum(not torch.equal(before[n], p) for n, p in trained.items())
    assert changed >= 0.9 * len(trained), f"{changed} of {len(trained)} tensors changed"
    assert row["policy/first_step_approx_kl"] <= trainer.first_step_tolerance == 1e-3
    batch = trainer.rollout(1)
    assert batch.values.dtype == torch.float32


def test_critic_forwards_with_gradients_all_run_in_the_recipe_precision(tmp_path, monkeypatch):
    """With one minibatch the rollout's critic forward keeps its graph for epoch 0; in bf16 it runs under the
    same autocast as the critic forwards of the other epochs (and as the values without that reuse)."""
    from cai.rl.modules import ValueModel

    seen = []
    forward = ValueModel.forward

    def recording(self, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ValueModel, "forward", recording)
    trainer = ppo_trainer(tmp_path, lora=False, value_head=False, ppo_epochs=2)
    trainer.train()
    assert trainer.cfg.num_minibatches == 1 and trainer.reuse_graphs
    assert seen == [True, True]  # epoch 0's (from the rollout) and epoch 1's


def test_first_step_ratio_is_exactly_one_in_fp32(tmp_path):
    """In fp32 the old log-probs come from the sampling logits, and the training forward reproduces them."""
    trainer = ppo_trainer(tmp_path, lora=False, value_head=True, dtype="float32")
    assert trainer.logprobs_from_generation is True
    (row,) = trainer.train()
    assert row["policy/first_step_approx_kl"] < 1e-10 and row["policy/first_step_ratio_dev"] < 1e-4


def test_first_step_warning_names_the_cause(tmp_path, capsys):
    """The first-step check runs every update: with old log-probs from the sampling logits (here in bf16) a
    warning is printed when approx-KL exceeds the tolerance, naming that setting as the likely cause, and none
    within it. Whether the KV-cache logits differ from the training forward at all depends on the CPU and the
    weights (on the tiny model they can agree to the bit), so the first update checks that it warned exactly
    when its approx-KL exceeded bf16's default tolerance, and the second sets the tolerance below any approx-KL,
    so that it must."""
    trainer = ppo_trainer(tmp_path, lora=False, value_head=True, logprobs_from_generation=True)
    (row,) = trainer.train()
    kl = row["policy/first_step_approx_kl"]
    assert kl >= 0 and ("approx-KL" in capsys.readouterr().out) == (kl > trainer.first_step_tolerance)
    trainer.first_step_tolerance = -1.0  # below any approx-KL: the next update must warn
    trainer.cfg = trainer.cfg.model_copy(update={"updates": 2})
    (row,) = trainer.train()
    out = capsys.readouterr().out
    assert f"before the first step approx-KL is {row['policy/first_step_approx_kl']:.3g}" in out
    assert "update 2 (bfloat16)" in out and "logprobs_from_generation: false" in out
    for from_generation, cause in ((True, "sampling logits"), (False, "not deterministic")):
        assert cause in pm.first_step_warning(2e-3, 0.1, 1e-3, from_generation)
        assert pm.first_step_warning(1e-3, 0.1, 1e-3, from_generation) is None


def test_a_model_generation_config_does_not_change_ppo_rollouts(tmp_path, tiny_dir):
    """A model folder whose generation_config.json sets a repetition penalty and top-k (as instruct models
    publish) gives exactly the rollouts of the same weights without it: PPO samples from the distribution it
    optimises, the recipe's alone."""
    plain, published = tmp_path / "plain", tmp_path / "published"
    for d in (plain, published):
        shutil.copytree(tiny_dir, d)
    cfg = json.loads((published / "generation_config.json").read_text())
    cfg.update(repetition_penalty=1.3, top_k=5, do_sample=True)
    (published / "generation_config.json").write_text(json.dumps(cfg))
    a = ppo_trainer(tmp_path / "a", lora=False, value_head=True, dtype="float32", lm_dir=str(plain)).rollout(
        0
    )
    b = ppo_trainer(
        tmp_path / "b", lora=False, value_head=True, dtype="float32", lm_dir=str(published)
    ).rollout(0)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.logprobs, b.logprobs)


def test_ppo_refuses_sampling_settings_it_does_not_model():
    for key, value in (("top_k", 5), ("top_p", 0.9), ("kl_estimator", "k3")):
        with pytest.raises(ValueError, match=key):
            PPOConfig(**{key: value})


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    trainer = ppo_trainer(tmp_path, lora=True, value_head=True, dtype="float32", save_every=1)
    trainer.train()
    assert (tmp_path / "checkpoints" / "step-000001" / "state.json").is_file()
    trainer.run_token = "token-b"  # a run directory whose checkpoint another run wrote
    with pytest.raises(UserError, match="not written by this run"):
        checkpoint.resume(trainer)
    # the HF trainers' checkpoints (SFT, PM) carry the token in a file beside them
    from cai.runtime.training import TOKEN_FILE, resume_point

    ck = tmp_path / "hf" / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    (ck / TOKEN_FILE).write_text("token-a\n")
    assert resume_point(tmp_path / "hf", tmp_path / "m.jsonl", "sft", "token-a") == str(ck)
    with pytest.raises(UserError, match="not written by this run"):
        resume_point(tmp_path / "hf", tmp_path / "m.jsonl", "sft", "token-b")
    assert read_jsonl(tmp_path / "m.jsonl") == []


def test_the_gpu_smoke_script_runs_its_phases_on_the_cpu(tmp_path):
    """bench/gpu_smoke.py is for a GPU; its --tiny mode runs every phase (and every invariant check) on the CPU
    with a tiny model, so the script does not rot between GPU runs."""
    import subprocess
    import sys
    from pathlib import Path

    from cai.runtime import vllm_engine as vllm

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "gpu_smoke.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = [r["phase"] for r in json.loads(out.read_text())]
    assert phases[:3] == ["sft", "pm-classifier", "pm-value_head"] and len(phases) == 12 - (
        not vllm.available()
    )
    assert phases[7:10] == ["forward-16-padded", "forward-16-batched", "forward-16-loop"]
    assert phases[10:] == ["generate-hf", "generate-vllm"][: len(phases) - 10]  # vLLM's when it is installed


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_bf16_full_fine_tune_starts_at_kl_zero_to_its_reference(tmp_path, tiny_dir, algorithm):
    """Before any step the policy is its reference: with the stage's models (fp32 masters under bf16 autocast,
    the reference loaded and run as the policy) the KL of the first rollout is exactly 0, k1 and k3, in bf16 as
    in fp32 (a bf16-weights reference without autocast gave a KL of +0.002 on this model)."""
    from accelerate import Accelerator

    from cai.rl.group import GroupTrainer
    from cai.stages.policy import build_models

    settings = Settings(dtype="bfloat16", device="cpu")
    precision = Precision.of(settings, "cpu")
    cfg = PPOConfig(critic="value_head", rollout_batch_size=4, response_length=16, temperature=1.0)
    torch.manual_seed(0)
    policy, ref, critic, tok = build_models(cfg, settings, str(tiny_dir), "cpu", critic=algorithm == "ppo")
    assert ref is not None and {p.dtype for p in ref.parameters()} == {torch.float32}
    common = dict(
        policy=policy,
        ref_model=ref,
        tokenizer=tok,
        reward=FunctionReward(lowercase_fraction),
        prompts=PROMPTS,
        out_dir=tmp_path,
        accelerator=Accelerator(cpu=True, mixed_precision=precision.mixed),
        show_progress=False,
        precision=precision,
    )
    if algorithm == "ppo":
        trainer = PPOTrainer(cfg, critic=critic, **common)
    else:
        trainer = GroupTrainer(cfg, algorithm=algorithm, samples_per_prompt=2, **common)
    batch = trainer.rollout(0)
    assert batch.mask.sum() > 0
    assert torch.equal(batch.logprobs * batch.mask, batch.ref_logprobs * batch.mask)
    assert batch.stats["objective/kl"] == 0.0 and batch.stats["objective/kl_k3"] == 0.0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_dpo_before_training_is_all_ties_and_its_probe_at_kl_zero(tmp_path, lora, monkeypatch):
    """The untrained DPO policy against its reference in bf16: every held-out pair a tie (accuracy 0.5, margin 0)
    and the step-0 probe's KL exactly 0, as in fp32 (the policy's forwards ran without autocast, the reference's
    with it: accuracy 0.29, margin -3e-4); the probe's forwards run in bf16 (they ran fp32 maths)."""
    from test_policy import learnable_pairs

    from cai.config.policy import DPOConfig
    from cai.eval.implicit import implicit_accuracy
    from cai.rl import dpo
    from cai.stages.policy import reference

    settings = Settings(dtype="bfloat16", device="cpu")
    precision = Precision.of(settings, "cpu")
    cfg = DPOConfig(
        max_steps=1, batch_size=8, beta=0.1, max_length=128, lora=LoraConfig(r=8, alpha=16) if lora else None
    )
    tok, model = (
        load_tokenizer("tiny-random-llama"),
        load_model("tiny-random-llama", precision.trainable(settings)),
    )
    ref = None if lora else reference("tiny-random-llama", settings, "cpu")
    rows = learnable_pairs()
    trainer = dpo.build_trainer(cfg, 0, "cpu", precision, model, ref, tok, rows, rows, tmp_path / "ckpt", [])
    before = implicit_accuracy(trainer)
    assert before["n"] == len(rows) and (before["accuracy"], before["mean_margin"]) == (0.5, 0.0), before
    probe = dpo.Probe(PPOConfig(response_length=16), tok, PROMPTS[:4], None, 0, precision.autocast("cpu"))
    seen, forward = [], PolicyModel.forward

    def recording(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PolicyModel, "forward", recording)
    row = probe(trainer.model, ref)
    assert row["objective/kl"] == 0.0 and row["objective/kl_k3"] == 0.0, row
    assert seen == [True, True]  # the policy's and the reference's


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selected_logprobs_gradient_on_bf16_logits_is_the_exact_one_rounded_once(temperature):
    """The gradient (onehot - softmax) g / T on bf16 logits is formed in fp32 and rounded once into bf16: within
    one bf16 step of the exact (fp64) gradient, or 1e-5 (fp32's own 1 - p at p ~ 1 - 1e-6). Formed in bf16, the
    1 - p of a confident target (p ~ 0.99) lost most of its digits (errors of 1e-3 to 100% at the target)."""
    from cai.runtime.forward import selected_logprobs

    torch.manual_seed(0)
    n, vocab = 40, 1000  # more rows than one block of the backward
    z = torch.randn(n, vocab) * 2
    tokens = torch.randint(0, vocab, (n,))
    z[torch.arange(n), tokens] += torch.linspace(0.0, 16.0, n)  # from unsure targets to p ~ 0.999
    weights = torch.rand(n) + 0.5
    zb = z.bfloat16()
    x = zb.clone().requires_grad_(True)
    (selected_logprobs(x, tokens, temperature) * weights).sum().backward()
    y = zb.double().requires_grad_(True)
    logp = torch.log_softmax(y / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)
    (logp * weights.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    exact = y.grad.float()
    torch.testing.assert_close(x.grad.float(), exact, rtol=2**-8, atol=1e-5)
    at_target = x.grad.float()[torch.arange(n), tokens]
    assert at_target.min() > 0  # 1 - p never cancels to 0


@pytest.mark.parametrize("head", ["classifier", "value_head"])
def test_untrained_pm_baseline_is_held_in_the_recipe_dtype_with_an_fp32_head(tiny_dir, head):
    """`cai evaluate pm`'s untrained baseline under dtype bfloat16 is held as the trained PM it is compared with
    is loaded: a bf16 trunk and the fp32 head, whose values are those fresh_pm initialised (it was a whole fp32
    model)."""
    from cai.pm.build import fresh_pm, untrained_scorer
    from cai.pm.scoring import scalar_head

    settings = Settings(dtype="bfloat16", device="cpu", seed=5)
    scorer = untrained_scorer("tiny-random-llama", head, settings)
    head_params = {id(p) for p in scalar_head(scorer.model).parameters()}
    trunk = {p.dtype for p in scorer.model.parameters() if id(p) not in head_params}
    assert trunk == {torch.bfloat16}
    fresh = scalar_head(fresh_pm("tiny-random-llama", head, settings)[0]).weight
    assert scalar_head(scorer.model).weight.dtype == torch.float32
    assert torch.equal(scalar_head(scorer.model).weight.detach(), fresh.detach())


# ---- a LoRA adapter's frozen base in the compute dtype, merged in fp32 at save time


def held_dtypes(model) -> set:
    """(trains, dtype) of every floating parameter of `model` but the frozen original of a head that peft trains a
    copy of (`modules_to_save`: an fp32 head, left as it was)."""
    named = model.named_parameters()
    return {
        (p.requires_grad, p.dtype) for n, p in named if p.is_floating_point() and "original_module" not in n
    }


def fp32_merge_by_hand(base, trained: dict, peft_cfg=None):
    """The weights an fp32 base gives: `trained` (adapters and heads) copied into `base` (loaded in fp32, wrapped
    with `peft_cfg` unless it is wrapped already) and merged in fp32."""
    import copy

    from peft import get_peft_model

    if peft_cfg is not None:
        base = get_peft_model(base, copy.deepcopy(peft_cfg))
    params = dict(base.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value.float())
    return base.merge_and_unload().state_dict()


def capture_trained(model) -> dict:
    """What the save merges: the trained parameters, and the merge of them into the half base (for contrast)."""
    import copy

    return {
        "dtypes": held_dtypes(model),
        "trained": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "half_merge": {k: v.float() for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()},
    }


def assert_fp32_merge(saved: dict, by_hand: dict, half_merge: dict) -> None:
    assert saved.keys() == by_hand.keys() and not any("lora_" in k for k in saved)
    worst = max(float((saved[k].float() - by_hand[k].float()).abs().max()) for k in saved)
    assert worst <= 1e-7, worst
    assert any(not torch.equal(saved[k].float(), half_merge[k]) for k in saved)  # not the bf16 base's merge


def test_bf16_lora_sft_holds_its_base_in_bf16_and_saves_the_fp32_merge(cr_dir, tmp_path, monkeypatch):  # noqa: F811
    from cai.stages import sft

    seen, save = {}, sft.save_trained

    def capturing(trainer, model, *args, **kwargs):
        seen.update(capture_trained(model), config=model.peft_config["default"])
        return save(trainer, model, *args, **kwargs)

    monkeypatch.setattr(sft, "save_trained", capturing)
    out = tmp_path / "sft"
    run_sft(cr_dir, out, "dtype=bfloat16", "sft.lora={r: 4, alpha: 8}", "sft.learning_rate=1.0e-2")
    assert seen["dtypes"] == {
        (False, torch.bfloat16),
        (True, torch.float32),
    }  # frozen base bf16, adapters fp32
    assert saved_dtypes(out / "model") == {torch.float32}
    saved = load_model(str(out / "model")).state_dict()
    by_hand = fp32_merge_by_hand(load_model("tiny-random-llama"), seen["trained"], seen["config"])
    assert_fp32_merge(saved, by_hand, seen["half_merge"])


@pytest.mark.parametrize("head", ["classifier", "value_head"])
def test_bf16_lora_pm_holds_its_base_in_bf16_and_merges_in_fp32(tmp_path, monkeypatch, head):
    """The PM a stage trains with LoRA under bf16: the frozen trunk bf16, adapters and the fp32 head fp32; the
    trained PM fit returns (and saves) is the adapters merged into the backbone loaded in fp32."""
    from cai.config.blocks import PreferenceModelConfig
    from cai.pm import build

    settings = Settings(dtype="bfloat16", device="cpu")
    lora = LoraConfig(r=8, alpha=16)
    cfg = PreferenceModelConfig(
        backbone="tiny-random-llama", head=head, lora=lora, max_steps=2, batch_size=8, learning_rate=1e-2
    )
    model, tok = build.fresh_pm(cfg.backbone, head, settings, lora)
    seen, merge = {}, build.merged_lora

    def capturing(trained, fresh):
        seen.update(capture_trained(trained))
        seen["config"] = trained.peft_config["default"] if head == "classifier" else None
        return merge(trained, fresh)

    monkeypatch.setattr(build, "merged_lora", capturing)
    rows, log = synthetic_pairs(16), MetricsLog(tmp_path / "metrics.jsonl")
    merged, _ = build.fit(cfg, settings, model, tok, rows, tmp_path, log, "pm", loss="soft")
    assert seen["dtypes"] == {(False, torch.bfloat16), (True, torch.float32)}
    fp32 = build.fresh_pm(cfg.backbone, head, settings.with_(dtype="float32"), lora)[0]
    by_hand = fp32_merge_by_hand(fp32, seen["trained"], seen["config"])
    assert_fp32_merge(merged.state_dict(), by_hand, seen["half_merge"])


def test_bf16_lora_ppo_holds_policy_and_critic_bases_in_bf16_and_saves_the_fp32_merge(tmp_path):

    from cai.stages.policy import build_models, fresh_policy

    settings = Settings(dtype="bfloat16", device="cpu")
    precision = Precision.of(settings, "cpu")
    cfg = PPOConfig(lora=LoraConfig(r=8, alpha=16), critic="separate", updates=1, rollout_batch_size=8)
    policy, ref, critic, tok = build_models(cfg, settings, "tiny-random-llama", "cpu")
    assert ref is None
    assert held_dtypes(policy.lm) == held_dtypes(critic) == {(False, torch.bfloat16), (True, torch.float32)}
    torch.manual_seed(1)
    with torch.no_grad():  # trained adapters: B away from its zero start
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    seen = capture_trained(policy.lm)
    trainer = tiny_ppo_trainer(cfg, policy, critic, None, tok, precision, tmp_path)
    trainer.save_policy(
        tmp_path / "policy", fresh_policy=lambda: fresh_policy(cfg, settings, "tiny-random-llama")
    )
    assert saved_dtypes(tmp_path / "policy") == {torch.float32}
    saved = load_model(str(tmp_path / "policy")).state_dict()
    by_hand = fp32_merge_by_hand(fresh_policy(cfg, settings, "tiny-random-llama"), seen["trained"])
    assert_fp32_merge(saved, by_hand, seen["half_merge"])


def test_fp32_lora_bases_stay_fp32_and_a_half_base_stays_fp32_under_sharding(monkeypatch):
    lora = LoraConfig(r=8, alpha=16)
    fp32, bf16 = Settings(dtype="float32"), Settings(dtype="bfloat16")
    assert Precision.of(fp32, "cpu").base(fp32, lora).dtype == "float32"
    assert Precision.of(bf16, "cpu").base(bf16, None).dtype == "float32"  # full fine-tuning: fp32 masters
    assert Precision.of(bf16, "cpu").base(bf16, lora).dtype == "bfloat16"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # whole-model engines keep one dtype: fp32 as before
    assert Precision.of(bf16, "cpu").base(bf16, lora).dtype == "float32"


def test_grpo_per_response_mean_learns_in_bf16(tmp_path, sampled_reward):
    """GRPO with the GRPO paper's per-response mean (`loss_mean: sequence`) and its k3 term, under bf16 autocast
    with fp32 master weights: every update starts at ratio 1 within the bf16 tolerance, losses and KL stay finite,
    and the sampled reward rises as in fp32 (tests/test_policy.py)."""
    from test_policy import group_trainer

    settings = Settings(dtype="bfloat16", device="cpu")
    precision = Precision.of(settings, "cpu")
    trainer = group_trainer(tmp_path, "grpo", loss_mean="sequence", precision=precision)
    assert trainer.precision.compute == "bfloat16" and trainer.logprobs_from_generation is False
    start = load_model("tiny-random-llama")
    before = sampled_reward(start, trainer.tok, trainer.prompt_ids, lowercase_fraction)
    hist = trainer.train()
    after = sampled_reward(trainer.policy.lm, trainer.tok, trainer.prompt_ids, lowercase_fraction)
    assert after > before + 0.05, (before, after, [h["objective/score"] for h in hist])
    assert all(math.isfinite(h["loss/policy"]) and math.isfinite(h["loss/kl"]) for h in hist)
    assert hist[-1]["objective/kl_k3"] > 0
    assert max(h["policy/first_step_approx_kl"] for h in hist) <= trainer.first_step_tolerance == 1e-3
