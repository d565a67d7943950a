"""PPO end to end on the tiny random model (CPU): the reward rises, the KL controller steers, LoRA's reference
is the base model, a resumed run equals a straight one, and the stage writes policy/."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cai.config.fields import LoraConfig
from cai.config.policy import PPOConfig
from cai.errors import UserError
from cai.rl.modules import PolicyModel, ValueModel
from cai.rl.rewards import FunctionReward, make_reward
from cai.rl.trainer import PPOTrainer
from cai.runtime.models import load_model, load_tokenizer, wrap_lora
from cai.runtime.rundir import MetricsLog, read_jsonl

PROMPTS = [{"messages": [{"role": "user", "content": f"Write something, please ({i})."}]} for i in range(16)]


def lowercase_fraction(prompts, responses, **kwargs):
    """Synthetic reward: the share of the response's characters that are ASCII lower-case letters."""
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: one thread is faster, and the result does not depend on the machine's core count
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_trainer(tmp_path, *, lora=False, value_head=False, reward=None, **overrides):
    settings = dict(
        updates=8,
        rollout_batch_size=16,
        response_length=10,
        ppo_epochs=4,
        num_minibatches=2,
        learning_rate=5e-3,
        kl_coef=0.02,
        temperature=1.0,
        save_every=100,
    )
    settings.update(overrides)
    cfg = PPOConfig(
        lora=LoraConfig(r=8, alpha=16) if lora else None,
        critic="value_head" if value_head else "separate",
        **settings,
    )
    torch.manual_seed(0)
    tok = load_tokenizer("tiny-random-llama")
    lm = load_model("tiny-random-llama")
    ref = None
    if lora:
        lm = wrap_lora(lm, cfg.lora)
    else:
        ref = load_model("tiny-random-llama")
    critic = None
    if not value_head:
        seq = load_model("tiny-random-llama", kind="seq_cls")
        if lora:  # as the policy stage builds a LoRA run's critic
            seq.model = wrap_lora(seq.model, cfg.lora, task_type="FEATURE_EXTRACTION")
        critic = ValueModel(seq)
    return PPOTrainer(
        cfg,
        policy=PolicyModel(lm, value_head=value_head),
        tokenizer=tok,
        reward=reward or FunctionReward(lowercase_fraction),
        prompts=PROMPTS,
        out_dir=tmp_path,
        critic=critic,
        ref_model=ref,
        seed=0,
        metrics=MetricsLog(tmp_path / "metrics.jsonl"),
        show_progress=False,
    )


def test_reward_rises_and_kl_stays_finite(tmp_path, monkeypatch, sampled_reward):
    # the reward function comes from an import path, as in a recipe
    (tmp_path / "my_reward.py").write_text(
        textwrap.dedent("""
        def lowercase(prompts, responses, **kwargs):
            return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = make_trainer(tmp_path / "run", reward=make_reward("my_reward:lowercase"))
    start = load_model("tiny-random-llama")  # the policy's starting weights (and the reference's)
    before = sampled_reward(start, trainer.tok, trainer.prompt_ids, lowercase_fraction)
    hist = trainer.train()
    after = sampled_reward(trainer.policy.lm, trainer.tok, trainer.prompt_ids, lowercase_fraction)
    assert after > before + 0.1, (before, after, [h["objective/score"] for h in hist])
    assert all(math.isfinite(h["objective/kl"]) for h in hist)
    assert hist[-1]["objective/kl"] > 0  # the policy moved away from the reference
    for h in hist:  # no reward shaping here: the KL-regularised objective is the score − β·KL
        want = h["objective/score"] - h["objective/kl_coef"] * h["objective/kl"]
        assert h["objective/reward"] == pytest.approx(want, abs=1e-5)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 8
    for key in (
        "objective/score",
        "objective/kl",
        "objective/sqrt_kl",
        "objective/kl_coef",
        "objective/entropy",
        "policy/approx_kl",
        "policy/clipfrac",
        "loss/policy",
        "loss/value",
        "val/explained_variance",
        "response/length",
        "response/eos_fraction",
        "time/generate",
        "time/score",
        "time/train",
        "tokens_per_s",
    ):
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key


@pytest.mark.parametrize("batched", [True, False])
def test_packed_forward_equals_padded(monkeypatch, batched):
    """The padding-free (packed) forward gives the padded batch's log-probs, values and gradients, with the
    sequences' attention in one batched call per layer or one call per sequence."""
    from cai.runtime import packing

    monkeypatch.setattr(packing, "BATCHED_ATTENTION", batched)
    policy = PolicyModel(load_model("tiny-random-llama"), value_head=True)
    torch.nn.init.normal_(policy.v_head.weight)
    from cai.runtime.packing import common_prefix as shared_prefix

    ids = torch.randint(0, 250, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    mask[0, -2:] = 0  # response padding after EOS
    mask[2, -4:] = 0
    common = torch.arange(40, 50)  # the rows' real tokens start alike (a system prompt)
    ids[0, 3:13], ids[1, 1:11], ids[2, 0:10] = common, common, common
    assert shared_prefix([ids[i][mask[i].bool()] for i in range(3)]) == 10
    results = []
    for packed in (True, False):
        policy.varlen = packed
        policy.zero_grad()
        out = policy(ids, mask, 5, 0.7, values=True, entropy=True)
        (out["logprobs"].sum() + out["values"].sum()).backward()
        results.append((out, [p.grad.clone() for p in policy.parameters()]))
    (a, ga), (b, gb) = results
    for key in ("logprobs", "values", "entropy"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
        assert (a[key][mask[:, -5:] == 0] == 0).all()  # padding positions are 0
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


def test_a_tied_embedding_takes_its_gradient_sparse_into_the_heads_dense_one(monkeypatch):
    """With the LM head in the backward, the tied embedding's gradient is taken sparse (no vocabulary-sized zero
    fill) and summed into the head's: the same dense gradient as the embedding module's own backward gives. A
    backward without the head (values only) keeps the module's dense path, so no sparse gradient reaches the
    optimizer."""
    import torch.nn.functional as F

    policy = PolicyModel(load_model("tiny-random-llama"), value_head=True)
    emb = policy.lm.get_input_embeddings()
    assert policy.lm.get_output_embeddings().weight is emb.weight  # the tiny model ties them, as SmolLM2 does
    torch.nn.init.normal_(policy.v_head.weight)
    ids = torch.randint(3, 250, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    sparse_calls = []
    original = F.embedding

    def spy(*args, **kwargs):
        sparse_calls.append(kwargs.get("sparse", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "embedding", spy)
    grads = []
    for tied in (True, False):
        policy.zero_grad(set_to_none=True)
        monkeypatch.setattr(policy, "varlen", True)
        out = policy(ids, mask, 6, 0.7, logprobs=tied, values=True)
        loss = out["values"].sum() + (out["logprobs"].sum() if tied else 0)
        loss.backward()
        assert not emb.weight.grad.is_sparse
        grads.append(emb.weight.grad.clone())
    assert sparse_calls[0] is True and not any(sparse_calls[1:])
    from cai.runtime import distributed as dist

    with (
        monkeypatch.context() as m
    ):  # ZeRO-3 gathers the weight only when the module is called: the module's path
        m.setattr(dist, "engine", lambda: "deepspeed-zero3")
        policy(ids, mask, 6, 0.7)["logprobs"].sum().backward()
    assert not any(sparse_calls[1:])
    policy.zero_grad(set_to_none=True)
    policy.varlen = False  # the padded forward: the embedding module's own dense gradient
    out = policy(ids, mask, 6, 0.7, values=True)
    (out["values"].sum() + out["logprobs"].sum()).backward()
    torch.testing.assert_close(grads[0], emb.weight.grad, rtol=1e-3, atol=1e-4)
    assert (grads[0] - grads[1]).abs().max() > 1e-3  # the head's share is in the first


@pytest.mark.parametrize("batched", [True, False])
def test_rows_that_sample_one_prompt_share_it_in_the_packed_forward(monkeypatch, batched):
    """RLOO's and GRPO's rows sample each prompt several times: the packed forward computes the system prompt
    once for the batch and each prompt once for its rows (a tree: counted), with the padded batch's log-probs,
    values and gradients."""
    from cai.runtime import packing

    monkeypatch.setattr(packing, "BATCHED_ATTENTION", batched)
    sizes = []
    original = packing.Packing.__init__

    def spy(self, start, length, above, device):
        original(self, start, length, above, device)
        sizes.append(sum(length))

    monkeypatch.setattr(packing.Packing, "__init__", spy)
    policy = PolicyModel(load_model("tiny-random-llama"), value_head=True)
    torch.nn.init.normal_(policy.v_head.weight)
    g = torch.Generator().manual_seed(1)
    system = torch.randint(5, 250, (10,), generator=g)
    prompts = [torch.cat([system, torch.randint(5, 250, (n,), generator=g)]) for n in (20, 14)]
    rows = [prompts[0], prompts[0], prompts[1], prompts[0], prompts[1]]  # two prompts, sampled 3 and 2 times
    R = 6
    ids = torch.zeros(5, 30 + R, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, 30 - len(p) : 30] = p
        ids[i, 30:] = torch.randint(5, 250, (R,), generator=g)
        mask[i, 30 - len(p) :] = 1
    mask[1, -2:] = 0  # a response that ended early
    results = []
    for packed in (True, False):
        policy.varlen = packed
        policy.zero_grad()
        out = policy(ids, mask, R, 0.7, values=True, entropy=True)
        (out["logprobs"].sum() + out["values"].sum()).backward()
        results.append((out, [p.grad.clone() for p in policy.parameters()]))
    # each prompt once, every response token once but each row's last, whose state nothing reads
    assert sizes == [10 + 20 + 14 + int(mask[:, 30:].sum()) - len(rows)]
    (a, ga), (b, gb) = results
    for key in ("logprobs", "values", "entropy"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


def test_packed_attention_runs_a_call_per_segment_on_the_cpu_and_batches_by_depth_when_asked(monkeypatch):
    """The CPU's default: one attention call per segment, outputs put back in packed order; batched (as on an
    accelerator): one padded batch per depth of the tree. Both give the same hidden states."""
    from cai.runtime import packing

    g = torch.Generator().manual_seed(4)
    system = torch.randint(5, 250, (9,), generator=g)
    rows = [torch.cat([system, torch.randint(5, 250, (n,), generator=g)]) for n in (6, 11, 4)]
    groups = [rows[:2], rows[2:]]
    model = load_model("tiny-random-llama")
    states = {}
    for batched in (None, True):
        monkeypatch.setattr(packing, "BATCHED_ATTENTION", batched)
        packed = packing.pack(groups, "cpu")
        kinds = [type(x).__name__ for x in packed.packing.groups]
        if batched is None:
            assert kinds == ["tuple"] * len(kinds) and len(kinds) == 4  # the root, then three sequences
        else:
            assert kinds == ["tuple", "_Batch"]  # the root alone, then the three sequences under it
        with packing.varlen_attention(model):
            states[batched] = packing.packed_states(model, packed)
    torch.testing.assert_close(states[None], states[True], rtol=1e-5, atol=1e-6)


def test_the_shared_prefix_path_runs_and_is_exact_in_a_rollout(tmp_path, monkeypatch):
    """Prompts that share a system prompt: the rollout's forwards pack the shared prefix once (checked), and the
    training forward reproduces the sampling distribution exactly (fp32: approx-KL ~0 before the first step), with
    the sequences' attention batched as on an accelerator."""
    from cai.runtime import packing

    monkeypatch.setattr(packing, "BATCHED_ATTENTION", True)
    seen = []
    original = packing.Packing.__init__

    def spy(self, start, length, above, device):
        original(self, start, length, above, device)
        prefix = max(sum(n for _, n in a) for a in above)
        batched = any(isinstance(g, packing._Batch) and g.shape[0] == len(start) - 1 for g in self.groups)
        # prefix, sequences, the sequences in one call per layer
        seen.append((prefix, len(start) - 1, batched))

    monkeypatch.setattr(packing.Packing, "__init__", spy)
    system = {"role": "system", "content": "You are a careful assistant who answers briefly and politely."}
    prompts = [{"messages": [system, *p["messages"]]} for p in PROMPTS[:8]]
    trainer = make_trainer(tmp_path, updates=1, rollout_batch_size=8, ppo_epochs=1, num_minibatches=1)
    trainer.prompt_ids = [trainer._encode(p["messages"]) for p in prompts]
    trainer.prompt_msgs = [p["messages"] for p in prompts]
    (row,) = trainer.train()
    assert any(prefix >= 20 and n == 8 and batched for prefix, n, batched in seen), seen[:4]
    assert row["policy/first_step_approx_kl"] < 1e-9


def test_adaptive_controller_steers_kl_toward_target(tmp_path):
    target = 0.5
    trainer = make_trainer(
        tmp_path, updates=6, adaptive_kl=True, target_kl=target, kl_horizon=16, kl_coef=0.5
    )
    hist = trainer.train()
    kls = [h["objective/kl"] for h in hist]
    betas = [h["objective/kl_coef"] for h in hist]
    assert abs(kls[-1] - target) < abs(kls[0] - target), kls
    # below the target the coefficient shrinks (error clipped at -0.2: x(1 - 0.2*16/16) per update)
    for kl, b0, b1 in zip(kls, betas, betas[1:]):
        if kl < 0.8 * target:
            assert b1 == pytest.approx(b0 * 0.8, rel=1e-6)


def test_lora_reference_is_the_base_model(tmp_path):
    trainer = make_trainer(tmp_path, lora=True, value_head=True, updates=2)
    trainer.train()
    base = PolicyModel(load_model("tiny-random-llama")).eval()
    ids = torch.tensor([[258, 258, 65, 66, 67, 68, 69, 70], [71, 72, 73, 74, 75, 76, 77, 78]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    policy = trainer.policy
    with torch.no_grad():
        want = base(ids, mask, 4)["logprobs"]
        with policy.reference() as ref:
            got = ref(ids, mask, 4)["logprobs"]
        moved = policy(ids, mask, 4)["logprobs"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (moved - want).abs().max() > 1e-3


@pytest.mark.parametrize("minibatches", [1, 2])
def test_lora_update_with_fused_linears_equals_peft_forward(tmp_path, monkeypatch, minibatches):
    import contextlib

    from peft.tuners.lora import Linear as LoraLinear

    from cai.rl import loop
    from cai.rl import trainer as trainer_module
    from cai.runtime import forward

    fused = []
    apply = forward._FusedLora.apply
    monkeypatch.setattr(forward._FusedLora, "apply", lambda *a: fused.append(1) or apply(*a))
    settings = dict(lora=True, updates=1, ppo_epochs=2, num_minibatches=minibatches)
    on = make_trainer(tmp_path / "fused", **settings)
    on.train()
    # every training forward of the policy and the critic ran its adapted linears through cai's fused node,
    # also the critic's epoch-0 forward that the rollout keeps when there is one minibatch
    layers = sum(isinstance(m, LoraLinear) for part in (on.policy, on.critic) for m in part.modules())
    assert layers and len(fused) == 2 * minibatches * layers
    nothing = lambda model: contextlib.nullcontext()  # noqa: E731
    monkeypatch.setattr(loop, "training_layers", nothing)
    monkeypatch.setattr(trainer_module, "training_layers", nothing)
    off = make_trainer(tmp_path / "peft", **settings)
    off.train()
    a, b = _params(on), _params(off)
    moved = [n for n in a if "lora_B" in n and float(a[n].abs().max()) > 0]
    assert moved  # the update trained the adapters (B starts at zero)
    for name in a:  # the same update up to float rounding
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_update_with_onednn_products_equals_f_linear(tmp_path, monkeypatch):
    """On AMD's CPUs the rollout's forwards and the training forwards compute their products on oneDNN
    (cai.runtime.forward.product_linears): the same update as with F.linear, up to float rounding."""
    from cai.runtime import forward

    calls = []
    product = forward._onednn_product
    monkeypatch.setattr(forward, "_onednn_product", lambda *a: calls.append(1) or product(*a))
    settings = dict(updates=1, ppo_epochs=2)
    monkeypatch.setitem(forward.ONEDNN, "linears", True)
    on = make_trainer(tmp_path / "onednn", **settings)
    on.train()
    assert calls  # the products ran on oneDNN
    monkeypatch.setitem(forward.ONEDNN, "linears", False)
    off = make_trainer(tmp_path / "f_linear", **settings)
    n = len(calls)
    off.train()
    assert len(calls) == n
    a, b = _params(on), _params(off)
    for name in a:  # the same update up to float rounding
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    start = _params(make_trainer(tmp_path / "start", **settings))
    assert any(float((a[k] - start[k]).abs().max()) > 1e-4 for k in a)  # the update changed the weights


def _params(trainer):
    out = {"p." + n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    if trainer.critic is not None:
        out.update({"c." + n: p.detach().clone() for n, p in trainer.critic.named_parameters()})
    return out


def test_resume_equals_straight_run(tmp_path):
    settings = dict(updates=3, ppo_epochs=2, adaptive_kl=True, save_every=1, critic_warmup_updates=1)
    straight = make_trainer(tmp_path / "a", **settings)
    straight.train()
    first = make_trainer(tmp_path / "b", **settings)
    first.train(until=2)  # stop after 2 updates (a checkpoint is written after each)
    resumed = make_trainer(tmp_path / "b", **settings)
    assert resumed.step == 2
    resumed.train()
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for name in a:  # same seed on CPU: equal up to float rounding (tolerance 1e-6)
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    rows_a, rows_b = (
        read_jsonl(tmp_path / "a" / "metrics.jsonl"),
        read_jsonl(tmp_path / "b" / "metrics.jsonl"),
    )
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    assert (
        rows_b[0]["policy/approx_kl"] == 0 and rows_b[0]["loss/policy"] == 0
    )  # critic warm-up: no policy step
    assert rows_b[1]["policy/approx_kl"] > 0
    assert rows_b[-1]["objective/kl_coef"] == pytest.approx(rows_a[-1]["objective/kl_coef"], rel=1e-9)
    assert rows_b[-1]["objective/score"] == pytest.approx(rows_a[-1]["objective/score"], abs=1e-9)


def test_a_kill_before_the_first_checkpoint_logs_each_update_once(tmp_path):
    """With save_every 2 a kill after update 1 leaves its metrics row and no checkpoint: the rerun starts at
    update 0 and must not keep the killed run's row beside its own."""
    settings = dict(updates=2, ppo_epochs=1, save_every=2)
    make_trainer(tmp_path, **settings).train(until=1)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    rerun = make_trainer(tmp_path, **settings)
    assert rerun.step == 0
    rerun.train()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_kill_while_a_checkpoint_replaces_one_of_its_step_keeps_it(tmp_path, monkeypatch):
    """An online round's end saves the step train() saved already. A kill between removing the old folder and
    renaming the new one left only step-N.tmp (complete), which `latest` read as int('N.tmp') and crashed on."""
    from cai.rl import checkpoint as ck

    d = tmp_path / "checkpoints"
    kw = dict(weights={"policy": {"x": torch.zeros(2)}}, optimizer_state={}, state={"run_token": "t"})
    ck.save(d, 8, **kw)
    renames = []
    real = Path.rename

    def killed_at_the_second_rename(self, target):
        renames.append(target)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ck.save(d, 8, **kw)
    monkeypatch.setattr(Path, "rename", real)
    assert not (d / "step-000008").exists() and (d / "step-000008.tmp" / "state.json").is_file()
    assert ck.latest(d) == d / "step-000008"  # the complete temporary folder is taken, under its own name
    assert json.loads((d / "step-000008" / "state.json").read_text())["step"] == 8
    (d / "step-000003.tmp").mkdir()  # an incomplete save is never read
    assert ck.latest(d) == d / "step-000008"


def test_a_checkpoint_resumes_only_with_the_number_of_processes_that_wrote_it(tmp_path, monkeypatch):
    """Each process samples its own share of the prompts with its own RNG state: resumed under another process
    count, the run went on as a different run without a word."""
    from cai.runtime import distributed as dist

    make_trainer(tmp_path, updates=1, ppo_epochs=1, save_every=1).train()
    assert (
        json.loads((tmp_path / "checkpoints" / "step-000001" / "state.json").read_text())["world_size"] == 1
    )
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(UserError, match=r"written by a run of 1 process\(es\), resumed with 2"):
        make_trainer(tmp_path, updates=1, ppo_epochs=1, save_every=1)
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    assert make_trainer(tmp_path, updates=1, ppo_epochs=1, save_every=1).step == 1


def test_critic_warmup_with_a_value_head_clips_the_head_alone(tmp_path, monkeypatch):
    """During warm-up the value loss reaches the frozen trunk through a value head: those gradients are dropped,
    so the clip's norm (and `grad/norm`) is the head's, and the policy does not move."""
    import cai.rl.engine as engine

    clipped = []

    def recording(params, max_norm, clip=engine.clip_gradients):
        clipped.append({id(p) for p in params})
        return clip(params, max_norm)

    monkeypatch.setattr(engine, "clip_gradients", recording)
    trainer = make_trainer(tmp_path, value_head=True, updates=2, ppo_epochs=1, critic_warmup_updates=1)
    head = {id(p) for p in trainer.policy.v_head.parameters()}
    lm_before = {n: p.detach().clone() for n, p in trainer.policy.lm.named_parameters()}
    trainer.train(until=1)
    assert clipped and all(ids == head for ids in clipped)
    for n, p in trainer.policy.lm.named_parameters():
        assert torch.equal(p, lm_before[n]), n
    trainer.train()  # after warm-up the trunk trains and counts again
    assert len(clipped[-1]) > len(head)


@pytest.mark.parametrize(
    ("settings", "saved"),
    [
        ({}, 1),  # the separate critic's forward (the policy's old log-probs come from the sampling logits)
        ({"logprobs_from_generation": False}, 2),  # and the policy's, its old log-probs from a forward
        ({"lora": True, "value_head": True}, 1),  # the policy's trunk: log-probs and the value head's values
        ({"lora": True, "value_head": True, "critic_warmup_updates": 1}, 1),  # the values alone in warm-up
    ],
)
def test_reusing_the_rollout_graphs_is_exact(tmp_path, settings, saved, monkeypatch):
    """With one minibatch, epoch 0 takes the forwards that the rollout ran anyway with their graphs: the same
    parameters as recomputing them, and `saved` model forwards fewer per update."""
    calls = []
    for cls in (PolicyModel, ValueModel):

        def counted(self, *args, forward=cls.forward, **kwargs):
            calls[-1] += 1
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    runs = []
    for reuse in (True, False):
        calls.append(0)
        trainer = make_trainer(tmp_path / str(reuse), updates=2, ppo_epochs=2, num_minibatches=1, **settings)
        trainer.reuse_graphs = reuse
        trainer.train()
        runs.append(_params(trainer))
    assert calls[0] == calls[1] - 2 * saved  # two updates
    # the kept log-probs are indexed by the shuffled rows, so the loss sums in another order (1.4e-6 seen)
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=1e-5, msg=name)
    start = _params(make_trainer(tmp_path / "start", **settings))
    assert max(float((runs[0][k] - start[k]).abs().max()) for k in start) > 1e-3  # the updates moved weights


@pytest.mark.parametrize("lora", [False, True])
def test_policy_and_critic_backward_one_after_the_other_is_exact(tmp_path, lora):
    """On one process a separate critic takes its own forward and backward after the policy's: the same
    parameters as one backward of the summed loss, with critic warm-up, minibatches and accumulation."""
    runs, calls = [], []
    for split in (True, False):
        settings = dict(updates=2, ppo_epochs=2, num_minibatches=2, grad_accum=2, critic_warmup_updates=1)
        trainer = make_trainer(tmp_path / str(split), lora=lora, **settings)
        trainer.split_backward = split
        n = []

        def counted(loss, last, backward=trainer.stepper.backward, n=n):
            n.append(1)
            backward(loss, last)

        trainer.stepper.backward = counted
        trainer.train()
        runs.append(_params(trainer))
        calls.append(len(n))
    # per update 2 epochs x 2 minibatches x 2 micro-batches; update 1 warms the critic up (one backward each
    # either way), update 2 takes two where split
    assert calls == [8 + 16, 8 + 8]
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=1e-6, msg=name)


def test_stop_string_truncates_and_counts_as_finished(tmp_path):
    from cai.rl.rollout import cut_at_stop
    from cai.runtime.generate import Generated

    trainer = make_trainer(tmp_path, updates=1, stop_string="lo w")
    tok = trainer.tok
    rows = [
        tok("hello world", add_special_tokens=False)["input_ids"],
        tok("abc", add_special_tokens=False)["input_ids"],
    ]
    R = max(len(r) for r in rows)
    resp = torch.tensor([r + [tok.pad_token_id] * (R - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in rows])
    gen = Generated(None, None, resp, mask, torch.tensor([False, False]))
    texts, cut, finished = cut_at_stop(trainer.tok, gen, "lo w")
    assert texts == ["hel", "abc"]
    assert (
        cut[0].tolist() == [1] * len("hello w") + [0] * 4
    )  # tokens up to the one completing the stop string
    assert finished.tolist() == [True, False]


def test_non_finite_reward_stops_with_a_checkpoint(tmp_path):
    bad = FunctionReward(lambda prompts, responses, **kw: [float("nan")] * len(responses))
    trainer = make_trainer(tmp_path, reward=bad, updates=1)
    with pytest.raises(UserError, match="non-finite reward"):
        trainer.train()
    assert (tmp_path / "checkpoints" / "diverged-step-000000" / "policy.safetensors").is_file()


def test_stage_writes_metrics_and_policy(tmp_path, tiny_recipe, tiny_dir, monkeypatch):
    """`cai run --only ppo` on a run folder with an SFT model and prompts, and an import-path reward."""
    from cai.pipeline import run

    (tmp_path / "rewards_mod.py").write_text(
        "def short(prompts, responses, **kw):\n    return [-len(r) / 10 for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tiny_recipe(
        "stages=[critique_revise, sft, ppo]",
        "ppo.reward=rewards_mod:short",
        "ppo.updates=2",
        "ppo.rollout_batch_size=4",
        "ppo.response_length=8",
    )
    rdir = tmp_path / "run"
    model = load_model(str(tiny_dir))
    model.save_pretrained(str(rdir / "sft" / "model"))
    load_tokenizer(str(tiny_dir)).save_pretrained(str(rdir / "sft" / "model"))
    (rdir / "critique_revise").mkdir(parents=True)
    (rdir / "critique_revise" / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", **p}) + "\n" for i, p in enumerate(PROMPTS[:6]))
    )
    for stage in ("critique_revise", "sft"):
        (rdir / stage / "manifest.json").write_text(
            json.dumps({"status": "complete", "fingerprint": stage, "output": stage})
        )
    run(recipe, only=["ppo"])  # the stage's former name still selects it
    out = rdir / "policy"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # samples.jsonl: every sampled response with the raw score it got, by update (as metrics.jsonl counts them)
    samples = read_jsonl(out / "samples.jsonl")
    assert [(s["update"], s["i"]) for s in samples] == [(u, i) for u in (1, 2) for i in range(4)]
    assert all(s["score"] == pytest.approx(-len(s["response"]) / 10) for s in samples)
    assert {s["prompt_id"] for s in samples} <= {f"p{i}" for i in range(6)}
    for r in rows:
        mine = [s["score"] for s in samples if s["update"] == r["step"]]
        assert sum(mine) / len(mine) == pytest.approx(r["objective/score"], abs=1e-5)
    assert (out / "policy" / "config.json").is_file() and (out / "score_vs_kl.png").is_file()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    again = load_model(str(out / "policy"))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
    # a bad prompts file names its line
    (rdir / "critique_revise" / "prompts.jsonl").write_text('{"id": "x", "messages": []}\n')
    with pytest.raises(UserError, match="prompts.jsonl:1"):
        run(recipe, only=["ppo"], force=True)


KEPT_MEMORY_SCRIPT = """
import resource, sys, torch
from cai.runtime.settings import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
faults = []
for _ in range(8):  # a training step's pattern: large tensors of several sizes, held together, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(n * 2**18) for n in (40, 160, 256, 12, 256, 100)]  # 3 to 64 MiB each
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[-4:])[1])  # the last four repetitions' lower median
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keeping_freed_memory_reuses_it_instead_of_faulting_in_fresh_pages():
    """keep_freed_memory (which the on-policy trainers set on a CPU) lasts for the process, so each way runs in
    its own: with glibc's defaults every repetition faults in all its pages anew; kept, none once the heap has
    settled (the first 1-3 repetitions kept may still fault in part, and a later one 3k pages now and then,
    hence the median of the last four of eight)."""
    import subprocess

    last = {}
    for way in ("default", "kept"):
        run = subprocess.run(
            [sys.executable, "-c", KEPT_MEMORY_SCRIPT, way], capture_output=True, text=True, check=True
        )
        last[way] = int(run.stdout)
    assert last["default"] >= 400  # 824 MiB: 211k faults in 4 KiB pages here, 412 in 2 MiB huge pages
    assert last["kept"] < last["default"] / 100


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
