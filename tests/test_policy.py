"""Beyond PPO on the tiny random model (CPU): soft-label DPO (its loss by hand and against TRL's, the implicit
reward learning a learnable preference, LoRA's reference), RLOO and GRPO raising a synthetic reward with a finite
KL, and every algorithm's log read by the report and the sqrt(KL) fit. Online rounds: tests/test_online.py."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_ppo import PROMPTS, lowercase_fraction

from cai.config.fields import LoraConfig
from cai.config.policy import DPOConfig, PPOConfig
from cai.errors import UserError
from cai.pm.loss import dpo_loss
from cai.rl.modules import PolicyModel
from cai.rl.rewards import FunctionReward
from cai.runtime.models import load_model, load_tokenizer, wrap_lora
from cai.runtime.rundir import MetricsLog
from cai.runtime.settings import Precision, Settings


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ DPO
def test_soft_dpo_loss_by_hand():
    beta = 0.5
    pa, pb = torch.tensor([-3.0, -2.0, -4.0]), torch.tensor([-5.0, -2.0, -1.0])
    ra, rb = torch.tensor([-4.0, -2.5, -4.0]), torch.tensor([-4.0, -1.5, -2.0])
    p = torch.tensor([1.0, 0.25, 0.5])
    # Δ = (pa − ra) − (pb − rb) = [1 − (−1), 0.5 − (−0.5), 0 − 1] = [2, 1, −1]; βΔ = [1, 0.5, −0.5]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [
        -math.log(sig(1.0)),
        -(0.25 * math.log(sig(0.5)) + 0.75 * math.log(sig(-0.5))),
        -(0.5 * math.log(sig(-0.5)) + 0.5 * math.log(sig(0.5))),
    ]
    got = dpo_loss(pa, pb, ra, rb, p, beta)
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-6)
    # swapping the sides and the label gives the same loss; p = 0.5 is symmetric in Δ
    torch.testing.assert_close(dpo_loss(pb, pa, rb, ra, 1 - p, beta), got, rtol=0, atol=1e-6)


PAIR_WORDS = ["apple", "river", "stone", "cloud", "green", "light", "sound", "table"]


def learnable_pairs(n: int = 24, seed: int = 0) -> list[dict]:
    """Pairs whose preferred side is the lower-case text, either side A or B, with soft labels (0.8 or 0.9)."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        text = " ".join(rng.choice(PAIR_WORDS) for _ in range(4))
        p = 0.9 if i % 2 else 0.8
        a, b = (text, text.upper()) if i % 3 else (text.upper(), text)
        rows.append(
            {
                "id": f"p{i}",
                "prompt_id": f"q{i}",
                "messages": [{"role": "user", "content": f"Say something ({i})."}],
                "response_a": a,
                "response_b": b,
                "p_a": p if i % 3 else 1 - p,
            }
        )
    return rows


def dpo_trainer(
    tmp_path,
    rows,
    *,
    lora: bool,
    steps: int = 12,
    lr: float = 1e-3,
    dtype: str = "float32",
    save_steps=100,
    batch: tuple[int, int] = (8, 1),
):
    from cai.rl.dpo import build_trainer

    cfg = DPOConfig(
        max_steps=steps,
        batch_size=batch[0],
        grad_accum=batch[1],
        learning_rate=lr,
        beta=0.1,
        max_length=128,
        save_steps=save_steps,
        logging_steps=1,
        lora=LoraConfig(r=8, alpha=16) if lora else None,
    )
    tok, model = load_tokenizer("tiny-random-llama"), load_model("tiny-random-llama")
    precision = Precision(compute=dtype)
    ref = None if lora else load_model("tiny-random-llama", Settings(dtype=precision.frozen))
    args = (cfg, 0, "cpu", precision, model, ref, tok, rows, rows, tmp_path / "ckpt", [])
    return build_trainer(*args)


def test_soft_dpo_equals_trls_sigmoid_loss_at_p_one(tmp_path):
    from trl import DPOTrainer

    trainer = dpo_trainer(tmp_path, learnable_pairs(8), lora=False)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off the reference, so the loss is not log 2 everywhere
        for param in trainer.model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert inputs["p"].min() >= 0.5  # the preferred side is TRL's 'chosen'
    inputs["p"] = torch.ones_like(inputs["p"])
    ours = trainer._compute_loss(trainer.model, inputs, False)
    theirs = DPOTrainer._compute_loss(
        trainer, trainer.model, {k: v for k, v in inputs.items() if k != "p"}, False
    )
    assert abs(float(ours.detach()) - math.log(2)) > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_sequence_logps_equal_trls_padded_ones_values_and_gradients(tmp_path, lora, monkeypatch):
    """Each pair's prompt once, no padding, the head at the completions only: the same policy and reference
    log-probs, and the same gradients, as TRL's padded forward."""
    from cai.rl import dpo

    rows = learnable_pairs(8)
    for i, r in enumerate(rows):  # prompts and replies of different lengths
        r["messages"][0]["content"] += " Please." * i
        r["response_b"] += " and more" * (i % 3)
    trainer = dpo_trainer(tmp_path, rows, lora=lora)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off the reference
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    lengths = inputs["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # rows of different lengths: the padded batch pads
    assert trainer.packs(trainer.model, inputs)
    weights = torch.randn(inputs["input_ids"].shape[0])

    def logps_and_grads(packed: bool):
        monkeypatch.setattr(dpo, "PACKED", packed)
        trainer.model.zero_grad()
        (policy, ref) = trainer.pair_logps(trainer.model, inputs)
        (torch.cat(policy) * weights).sum().backward()
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        return torch.cat(policy).detach(), torch.cat(ref), grads

    packed, padded = logps_and_grads(True), logps_and_grads(False)
    assert (packed[0] - packed[1]).abs().max() > 1e-3  # the policy is not its reference
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-4)
    assert len(packed[2]) == len(padded[2]) > 0
    for a, b in zip(packed[2], padded[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dpo_learns_a_learnable_preference_and_its_lora_reference_is_the_base(tmp_path):
    from cai.eval.implicit import implicit_accuracy

    trainer = dpo_trainer(tmp_path, learnable_pairs(), lora=True, lr=1e-2)
    before = implicit_accuracy(trainer)
    assert before["n"] == 24 and before["accuracy"] == 0.5  # policy = reference: every margin is 0, a tie
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad():
        policy0, ref0 = trainer.pair_logps(trainer.model, batch)
    trainer.train()
    with torch.no_grad():
        policy1, ref1 = trainer.pair_logps(trainer.model, batch)
    for a, b in zip(ref1, ref0):  # the reference (adapters off) did not move while the policy did
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert (policy1[0] - policy0[0]).abs().max() > 1e-2
    after = implicit_accuracy(trainer)
    assert after["accuracy"] >= 0.9 and after["mean_margin"] > 0.5, after
    rows = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    assert (
        rows[-1]["rewards/accuracies"] > 0.8 and rows[-1]["tokens_per_s"] > 0 and rows[-1]["time/train"] > 0
    )
    # with LoRA the reference is the same weights with the adapters switched off: the base model
    lm, base = trainer.model, PolicyModel(load_model("tiny-random-llama")).eval()
    ids = torch.tensor([[258, 65, 66, 67, 68, 69, 70, 71]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), lm.disable_adapter():
        ref = PolicyModel(lm)(ids, mask, 4)["logprobs"]
    torch.testing.assert_close(ref, base(ids, mask, 4)["logprobs"], rtol=0, atol=1e-6)
    with torch.no_grad():
        assert (PolicyModel(lm)(ids, mask, 4)["logprobs"] - ref).abs().max() > 1e-3


def test_dpo_grad_accum_and_a_partial_last_batch_take_the_one_batch_step(tmp_path):
    """11 pairs, a global batch of 4 (the third step has 3 pairs) as 4×1, 2×2 and 1×4 micro-batches ×
    accumulation: each step is the mean over its pairs, so the weights, losses and metrics are those of one batch
    of 4. Each micro-batch's mean divided by the accumulation count weighed the 2+1 window's lone pair double."""
    got = {}
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        trainer = dpo_trainer(
            tmp_path / f"b{bs}", learnable_pairs(11), lora=False, steps=3, lr=1e-2, batch=(bs, ga)
        )
        trainer.args.lr_scheduler_type = "constant"
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        got[bs, ga] = logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    ref_logs, ref_w = got[4, 1]
    assert len(ref_logs) == 3
    for key, (logs, w) in got.items():
        for k in ref_w:  # Adam at lr 1e-2 turns float-order noise into 1.5e-5; the old 2+1 window: 1.2e-2
            assert torch.allclose(w[k], ref_w[k], rtol=0, atol=1e-4), (key, k)
        metrics = (
            "loss",
            "grad_norm",
            "rewards/margins",
            "rewards/accuracies",
            "target/mean",
            "policy_tokens",
        )
        for a, b in zip(ref_logs, logs):
            for k in metrics:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (key, a["step"], k)


def test_the_dpo_probe_runs_on_every_process_and_the_main_one_logs_it(tmp_path):
    """The probe ran on the main process only: under ZeRO-3 or FSDP its forwards need every rank's shard, so the
    main process waited for the others forever. Every rank samples the same prompts; only rank 0 logs."""
    from types import SimpleNamespace

    from cai.rl.dpo import probe_callback

    calls, logged = [], []
    metrics = SimpleNamespace(log=lambda row, step: logged.append(step), path=tmp_path / "metrics.jsonl")
    cb = probe_callback(lambda lm, ref: calls.append(lm) or {"objective/kl": 0.0}, metrics, every=2)
    for main in (True, False):
        calls.clear(), logged.clear()
        cb.done = set()
        state = SimpleNamespace(global_step=0, is_world_process_zero=main)
        cb.on_train_begin(None, state, None, model="lm")
        state.global_step = 2
        cb.on_step_end(None, state, None, model="lm")
        cb.on_train_end(None, state, None, model="lm")  # step 2 again: not probed twice
        assert len(calls) == 2 and logged == ([0, 2] if main else [])


def test_dpo_policy_tokens_carry_across_a_resume(tmp_path):
    """policy_tokens lived in memory only: a run resumed from a checkpoint logged it from 0 again (128, 190, ...
    where the straight run logged 628, 690, ...). Each checkpoint now stores the count."""

    def tokens(trainer):
        return [h["policy_tokens"] for h in trainer.state.log_history if "policy_tokens" in h]

    straight = dpo_trainer(tmp_path / "a", learnable_pairs(), lora=True, steps=4, save_steps=2)
    straight.train()
    resumed = dpo_trainer(tmp_path / "b", learnable_pairs(), lora=True, steps=4, save_steps=2)
    resumed.train()  # the same run, then resumed from its step-2 checkpoint as after a kill at step 3
    ckpt = tmp_path / "b" / "ckpt" / "checkpoint-2"
    again = dpo_trainer(tmp_path / "b", learnable_pairs(), lora=True, steps=4, save_steps=2)
    again.resume_tokens(str(ckpt))
    again.train(resume_from_checkpoint=str(ckpt))
    assert len(tokens(straight)) == 4 and tokens(again)[-2:] == tokens(straight)[-2:]


def judged_by_label(trainer, monkeypatch) -> None:
    """Makes the trainer's implicit reward rank the preferred side higher on the pairs labelled 0.9 and lower on
    those labelled 0.8 (margin ±β), through its own batches (the real forwards, then moved)."""
    pair_logps = trainer.pair_logps

    def judged(model, inputs):
        (pc, pr), (rc, rr) = pair_logps(model, inputs)
        sign = torch.where(inputs["p"] > 0.85, 1.0, -1.0).to(pc)
        return (rc + (pr - rr) + sign, pr), (rc, rr)

    monkeypatch.setattr(trainer, "pair_logps", judged)


def test_dpo_implicit_accuracy_interval_is_clustered_by_prompt(tmp_path, monkeypatch):
    """Held-out pairs of one prompt are not independent: 24 pairs in 6 prompts, each prompt's 4 pairs all right or
    all wrong, hold 6 prompts' worth of evidence. The interval was Wilson's over the 24 pairs ([0.31, 0.69]); it
    is clustered by prompt now (cai.stats.clustered_ci: here Wilson's at n = 6, [0.19, 0.81]), and `clusters`
    counts the prompts of the pairs it scores (a pair labelled 0.5 and its prompt are left out)."""
    from cai.eval.implicit import implicit_accuracy
    from cai.stats import clustered_ci, wilson_ci

    rows = learnable_pairs()
    for i, r in enumerate(rows):  # 4 pairs to each of 6 prompts, all of one prompt's labelled 0.9 or all 0.8
        r["prompt_id"] = f"q{i % 6}"
    rows.append({**rows[0], "id": "tie", "prompt_id": "q-tie", "p_a": 0.5})
    trainer = dpo_trainer(tmp_path, rows, lora=False, batch=(5, 1))  # a prompt's pairs across batches
    judged_by_label(trainer, monkeypatch)
    res = implicit_accuracy(trainer)
    credits = [1.0 if max(r["p_a"], 1 - r["p_a"]) > 0.85 else 0.0 for r in rows[:24]]
    keys = [r["prompt_id"] for r in rows[:24]]
    assert (res["n"], res["clusters"], res["accuracy"]) == (24, 6, 0.5), res
    assert res["ci95"] == pytest.approx(list(clustered_ci(credits, keys)), abs=1e-12)
    assert res["ci95"] == pytest.approx(list(wilson_ci(3, 6)), abs=1e-9)
    wilson = wilson_ci(12, 24)
    assert res["ci95"][0] < wilson[0] - 0.1 and res["ci95"][1] > wilson[1] + 0.1


def test_dpo_implicit_accuracy_with_one_pair_per_prompt_is_wilsons(tmp_path, monkeypatch):
    """One held-out pair per prompt: the clustered interval is exactly the Wilson interval over pairs it was."""
    from cai.eval.implicit import implicit_accuracy
    from cai.stats import wilson_ci

    trainer = dpo_trainer(tmp_path, learnable_pairs(), lora=False, batch=(5, 1))
    judged_by_label(trainer, monkeypatch)
    res = implicit_accuracy(trainer)
    assert (res["n"], res["clusters"], res["accuracy"]) == (24, 24, 0.5), res
    assert res["ci95"] == list(wilson_ci(12.0, 24))
    monkeypatch.undo()  # the untrained policy: every pair a tie, credit 0.5 each
    assert implicit_accuracy(trainer)["ci95"] == list(wilson_ci(12.0, 24))


# ------------------------------------------------------------------------------------------ RLOO, GRPO
def group_trainer(
    tmp_path,
    algorithm: str,
    *,
    lora=False,
    loss_mean="token",
    scale_rewards=True,
    precision=None,
    **overrides,
):
    from cai.rl.group import GroupTrainer

    settings = dict(
        updates=8,
        rollout_batch_size=16,
        response_length=10,
        ppo_epochs=2,
        num_minibatches=2,
        learning_rate=5e-3,
        kl_coef=0.02,
        temperature=1.0,
        save_every=100,
    )
    settings.update(overrides)
    cfg = PPOConfig(lora=LoraConfig(r=8, alpha=16) if lora else None, **settings)
    torch.manual_seed(0)
    lm = load_model("tiny-random-llama")
    lm, ref = (wrap_lora(lm, cfg.lora), None) if lora else (lm, load_model("tiny-random-llama"))
    return GroupTrainer(
        cfg,
        algorithm=algorithm,
        samples_per_prompt=4,
        loss_mean=loss_mean,
        scale_rewards=scale_rewards,
        policy=PolicyModel(lm),
        tokenizer=load_tokenizer("tiny-random-llama"),
        reward=FunctionReward(lowercase_fraction),
        prompts=PROMPTS,
        out_dir=tmp_path,
        ref_model=ref,
        seed=0,
        metrics=MetricsLog(tmp_path / "metrics.jsonl"),
        show_progress=False,
        precision=precision,
    )


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_group_learners_raise_the_reward_with_a_finite_kl(tmp_path, algorithm, sampled_reward):
    trainer = group_trainer(tmp_path, algorithm)
    start = load_model("tiny-random-llama")  # the policy's starting weights (and the reference's)
    before = sampled_reward(start, trainer.tok, trainer.prompt_ids, lowercase_fraction)
    hist = trainer.train()
    after = sampled_reward(trainer.policy.lm, trainer.tok, trainer.prompt_ids, lowercase_fraction)
    assert after > before + 0.05, (before, after, [h["objective/score"] for h in hist])
    assert all(math.isfinite(h["objective/kl"]) and math.isfinite(h["loss/policy"]) for h in hist)
    assert hist[-1]["objective/kl_k3"] > 0  # it moved away from the reference
    assert hist[0]["policy/first_step_approx_kl"] < 1e-6  # sampled and trained with the same weights
    assert ("loss/kl" in hist[-1]) == (algorithm == "grpo") and "loss/value" not in hist[-1]
    assert all(0 <= h["group/no_signal"] <= 1 for h in hist)
    for h in hist:  # the KL-regularised objective, logged as PPO logs it
        want = h["objective/score"] - h["objective/kl_coef"] * h["objective/kl"]
        assert h["objective/reward"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_group_learners_take_epoch_0s_log_probs_from_the_rollouts_forward(tmp_path, algorithm, monkeypatch):
    """With one minibatch and old log-probs from a forward, epoch 0 reads that forward's log-probs with their
    graph: one policy forward fewer per update, the same parameters as recomputing them."""
    calls, runs = [], []

    def counted(self, *args, forward=PolicyModel.forward, **kwargs):
        calls[-1] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PolicyModel, "forward", counted)
    settings = dict(updates=2, num_minibatches=1, logprobs_from_generation=False)
    for reuse in (True, False):
        calls.append(0)
        trainer = group_trainer(tmp_path / str(reuse), algorithm, **settings)
        trainer.reuse_graphs = reuse
        trainer.train()
        runs.append({n: p.detach().clone() for n, p in trainer.policy.named_parameters()})
    assert calls[0] == calls[1] - 2  # two updates
    start = dict(load_model("tiny-random-llama").named_parameters())
    assert max(float((p - start[n.removeprefix("lm.")]).abs().max()) for n, p in runs[0].items()) > 1e-3
    # the kept log-probs are indexed by the shuffled rows: the loss sums in another order
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=1e-5, msg=name)


def test_group_learner_lora_reference_is_the_base_and_batches_hold_whole_groups(tmp_path):
    trainer = group_trainer(tmp_path, "grpo", lora=True, updates=2, learning_rate=2e-2)
    trainer.train()
    base = PolicyModel(load_model("tiny-random-llama")).eval()
    ids = torch.tensor([[258, 258, 65, 66, 67, 68, 69, 70], [71, 72, 73, 74, 75, 76, 77, 78]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    with torch.no_grad():
        with trainer.policy.reference() as ref:
            got = ref(ids, mask, 4)["logprobs"]
        moved = trainer.policy(ids, mask, 4)["logprobs"]
        want = base(ids, mask, 4)["logprobs"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (moved - want).abs().max() > 1e-3
    with pytest.raises(UserError, match="multiple of policy.samples_per_prompt"):
        group_trainer(tmp_path / "bad", "rloo", rollout_batch_size=6)


def test_grpo_weighs_its_kl_term_by_the_coefficient_it_logs(tmp_path, monkeypatch):
    """With an adaptive β the controller moves once per rollout; GRPO's k3 term used the moved value while
    `objective/kl_coef` showed the one before. β is recovered from each micro-batch: (loss - policy loss) / kl."""
    import cai.rl.group as group

    trainer = group_trainer(
        tmp_path, "grpo", updates=2, ppo_epochs=2, num_minibatches=1, adaptive_kl=True, kl_coef=0.5,
        target_kl=0.001, kl_horizon=10,
    )  # fmt: skip
    parts, used = {}, []
    policy_loss, token_mean = group.pm.policy_loss, group.pm.token_mean
    monkeypatch.setattr(group.pm, "policy_loss", lambda *a, **k: parts.update(p=policy_loss(*a, **k)[0]) or (
        parts["p"], policy_loss(*a, **k)[1]))  # fmt: skip
    monkeypatch.setattr(
        group.pm, "token_mean", lambda *a, **k: parts.update(kl=token_mean(*a, **k)) or parts["kl"]
    )
    backward = trainer.stepper.backward

    def recording(loss, last):
        if abs(float(parts["kl"])) > 1e-6:  # 0 while the policy still equals its reference
            used.append((trainer.step, float((loss - parts["p"]) / parts["kl"])))
        return backward(loss, last)

    monkeypatch.setattr(trainer.stepper, "backward", recording)
    hist = trainer.train()
    logged = [h["objective/kl_coef"] for h in hist]
    assert logged[0] != logged[1]  # the controller moved β
    assert {step for step, _ in used} == {0, 1}
    for step, beta in used:
        assert beta == pytest.approx(logged[step], rel=1e-3), step


@pytest.mark.parametrize("loss_mean", ["token", "sequence"])
def test_group_loss_over_uneven_micro_batches_is_the_minibatch_mean(tmp_path, loss_mean):
    """GRPO's clipped loss plus β·k3, accumulated over three micro-batches of responses of different lengths, has
    the gradient of one mean over the minibatch: over its tokens ('token'), or over its responses of each one's
    token mean ('sequence', the GRPO paper's)."""
    trainer = group_trainer(
        tmp_path, "grpo", loss_mean=loss_mean, updates=1, ppo_epochs=1, num_minibatches=1, grad_accum=3,
        rollout_batch_size=8, kl_coef=0.3, learning_rate=1e-3,
    )  # fmt: skip
    trainer.train()  # one update: the policy now differs from its reference, so the KL term has a gradient
    batch = trainer.rollout(1)
    for r in range(8):  # responses of 2 to 5 tokens
        batch.mask[r, 2 + r % 4 :] = 0
    batch.advantages *= batch.mask
    # old log-probs moved off the current policy's, so that ratios differ from 1 and some are clipped
    batch.logprobs.add_(0.3 * torch.randn(batch.logprobs.shape, generator=torch.Generator().manual_seed(0)))
    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    trainer.opt.zero_grad(set_to_none=True)
    n, logs = trainer._loss_count(batch.mask), {k: [] for k in trainer.log_keys}
    for k, mi in enumerate(torch.tensor_split(torch.arange(8), 3)):
        losses = dict.fromkeys(trainer.loss_keys, 0.0)
        trainer._micro_step(batch, mi, n, False, k == 2, 1, logs, losses)
    got = [p.grad.clone() for p in params]

    m, R = batch.mask, batch.mask.shape[1]
    lp = trainer.model(batch.input_ids, batch.attention_mask, R, trainer.cfg.temperature, values=False)[
        "logprobs"
    ]
    ratio = torch.exp(lp - batch.logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    per_token = torch.maximum(-batch.advantages * ratio, -batch.advantages * clipped)
    per_token = per_token + batch.stats["_kl_coef"] * (
        torch.exp(batch.ref_logprobs - lp) - (batch.ref_logprobs - lp) - 1
    )
    if loss_mean == "token":
        want_loss = (per_token * m).sum() / m.sum()
    else:
        want_loss = ((per_token * m).sum(1) / m.sum(1)).mean()
    want = torch.autograd.grad(want_loss, params)
    assert max(float(g.abs().max()) for g in want) > 1e-4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # the logged approx-KL and clip fraction are the minibatch's token means too, not means of the micro-batches'
    diff = (lp - batch.logprobs).detach() * m
    kl = float((0.5 * diff.pow(2)).sum() / m.sum())
    clipped_share = float(
        ((-batch.advantages * clipped > -batch.advantages * ratio).float() * m).sum() / m.sum()
    )
    assert trainer._pooled(logs["policy/approx_kl"]) == pytest.approx(kl, rel=1e-4)
    assert trainer._pooled(logs["policy/clipfrac"]) == pytest.approx(clipped_share, abs=1e-6)
    assert kl > 1e-6 and 0 < clipped_share < 1


def test_grpo_without_reward_scaling_centres_the_same_rollouts_rewards_only(tmp_path):
    scaled = group_trainer(tmp_path / "a", "grpo", updates=1).rollout(0)
    centred = group_trainer(tmp_path / "b", "grpo", updates=1, scale_rewards=False).rollout(0)
    assert torch.equal(scaled.input_ids, centred.input_ids)  # the same samples and rewards
    a, b = scaled.advantages[:, 0].view(-1, 4), centred.advantages[:, 0].view(-1, 4)
    assert b.sum(1).abs().max() < 1e-5 and b.abs().max() > 1e-3  # centred within each prompt's group
    torch.testing.assert_close(a, b / (b.std(1, keepdim=True) + 1e-4))


def test_group_loss_settings_are_refused_for_the_algorithms_they_do_not_apply_to():
    from cai.config.policy import PolicyConfig

    assert PolicyConfig(algorithm="grpo", loss_mean="sequence").loss_mean == "sequence"
    assert PolicyConfig(algorithm="grpo", scale_rewards=False).scale_rewards is False
    for algorithm in ("ppo", "dpo"):
        with pytest.raises(ValueError, match="rloo or grpo"):
            PolicyConfig(algorithm=algorithm, loss_mean="sequence")
    for algorithm in ("ppo", "rloo", "dpo"):
        with pytest.raises(ValueError, match="algorithm grpo"):
            PolicyConfig(algorithm=algorithm, scale_rewards=False)


def test_critic_free_arms_name_the_critic_settings_they_ignore():
    """A `ppo` block shared by a PPO and an RLOO arm may set PPO's critic and GAE settings; the RLOO and GRPO arms
    name the ones the recipe set (not defaults), PPO's arm none."""
    from test_recipe import ROOT

    from cai.config.arms import expand_arms
    from cai.config.load import load_recipe
    from cai.stages.policy import unused_settings

    recipe = load_recipe(
        ROOT / "recipes" / "compare-algorithms.yaml",
        ["ppo.vf_coef=0.5", "ppo.lam=0.9", "ppo.whiten_advantages=false"],
    )
    arms = dict(expand_arms(recipe))
    expected = ["ppo.vf_coef", "ppo.lam", "ppo.whiten_advantages"]

    def critic_keys(arm, algorithm):
        policy = arm.policy.model_copy(update={"algorithm": algorithm})
        return [k for k in unused_settings(arm.ppo, policy) if k.startswith("ppo.")]

    assert critic_keys(arms["rloo"], "rloo") == expected
    assert critic_keys(arms["rloo"], "grpo") == expected
    assert critic_keys(arms["ppo"], "ppo") == []
    assert critic_keys(load_recipe(ROOT / "recipes" / "compare-algorithms.yaml"), "rloo") == []


def test_each_arm_names_the_settings_its_algorithm_or_round_count_does_not_read(tmp_path, capsys):
    """policy.samples_per_prompt with PPO or DPO, policy.round_prompts with one round and the `ppo` block's
    training keys with DPO were accepted and ignored without a word; DPO's probe reads the sampling keys."""
    from test_recipe import MINI, ROOT, write

    from cai.config.arms import expand_arms
    from cai.config.load import load_recipe
    from cai.stages.policy import unused_settings, warn_unused

    sets = ["ppo.vf_coef=0.5", "ppo.temperature=0.9", "ppo.max_prompt_length=64", "ppo.reward=pm"]
    printed = {}
    for name, arm in expand_arms(load_recipe(ROOT / "recipes" / "compare-algorithms.yaml", sets)):
        warn_unused(arm)
        printed[name] = capsys.readouterr().out
    assert printed["ppo"] == (
        "[cai] policy: ppo with 1 round does not read policy.samples_per_prompt, policy.round_prompts; "
        "ignoring them\n"
    )
    assert "does not read ppo.vf_coef, policy.round_prompts;" in printed["rloo"]
    dpo = printed["dpo"]
    for key in ("ppo.updates", "ppo.ppo_epochs", "ppo.learning_rate", "ppo.vf_coef", "ppo.lora"):
        assert key in dpo
    for key in ("temperature", "max_prompt_length", "rollout_batch_size", "response_length", "reward"):
        assert f"ppo.{key}" not in dpo  # the probe samples, cuts and scores with them
    assert "policy.samples_per_prompt" in dpo and "policy.round_prompts" in dpo
    assert printed["online"].startswith(
        "[cai] policy: ppo with 2 rounds does not read policy.samples_per_prompt;"
    )
    path = write(tmp_path, MINI)
    for algorithm, keys in [
        ("ppo", ["ppo.ppo_epochs=2", "ppo.vf_coef=0.5", "policy.rounds=2", "policy.round_prompts=3"]),
        ("rloo", ["policy.samples_per_prompt=2", "policy.loss_mean=sequence", "ppo.kl_coef=0.1"]),
        ("grpo", ["policy.scale_rewards=false", "policy.samples_per_prompt=2"]),
        ("dpo", ["ppo.temperature=0.9", "ppo.rollout_batch_size=2", "ppo.stop_string=END", "dpo.beta=0.2"]),
    ]:
        warn_unused(load_recipe(path, [f"policy.algorithm={algorithm}", *keys]))
        assert capsys.readouterr().out == "", algorithm  # every key set is one the algorithm reads
    both = load_recipe(path, ["ppo.rollout_batch_size=4", "ppo.generation_batch_size=2"])
    dpo = both.policy.model_copy(update={"algorithm": "dpo"})
    assert unused_settings(both.ppo, dpo) == ["ppo.rollout_batch_size"]  # the probe's batch is the latter


@pytest.mark.parametrize("critic", ["separate", "value_head"])
def test_critic_warm_up_tells_ddp_to_expect_parameters_without_gradients(critic):
    """Warm-up updates train the critic alone: a value-head critic's untied LM head gets no gradient either,
    and DDP without find_unused_parameters stops at the next forward (seen with 2 processes)."""
    from cai.config.policy import PPOConfig
    from cai.runtime.settings import Settings
    from cai.stages.policy import accelerator

    def handler(warmup):
        acc = accelerator(
            Settings(device="cpu"), PPOConfig(critic=critic, critic_warmup_updates=warmup), "ppo"
        )
        return getattr(acc, "ddp_handler", None)

    assert handler(2) is not None and handler(2).find_unused_parameters
    assert handler(0) is None  # no warm-up: DDP's faster default


def test_the_lora_default_critic_is_a_value_head_and_a_full_fine_tune_keeps_a_separate_one(tiny_dir):
    """With `lora` PPO's critic defaults to a value head on the policy's adapters (one trunk per update; its
    learning measured against a separate critic in docs/benchmarks.md), without it to a separate value model;
    a recipe that names one gets it, and a default is not taken for a setting the recipe made."""
    from cai.stages.policy import build_models

    settings = Settings(device="cpu")
    lora = PPOConfig(lora=LoraConfig(r=4, alpha=8))
    assert lora.critic == "value_head" and "critic" not in lora.model_fields_set
    policy, ref, critic, _ = build_models(lora, settings, str(tiny_dir), "cpu")
    assert policy.v_head is not None and critic is None and ref is None
    policy, ref, critic, _ = build_models(PPOConfig(), settings, str(tiny_dir), "cpu")
    assert policy.v_head is None and critic is not None and ref is not None
    named = PPOConfig(lora=LoraConfig(r=4, alpha=8), critic="separate")
    policy, _, critic, _ = build_models(named, settings, str(tiny_dir), "cpu")
    assert policy.v_head is None and critic is not None
    assert PPOConfig(critic="value_head").critic == "value_head"
