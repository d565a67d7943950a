"""Stage `policy` (it was `ppo`, a name recipes, `--only` and `--from` still accept): optimise the SFT policy by
the algorithm `policy.algorithm` names, and write policy/.

- ppo (the default): PPO against the preference model (or a reward function) with a KL penalty to the SFT model
  (cai.rl.trainer; the `ppo` block). Critic (`ppo.critic`): 'separate' — a value model (the SFT trunk with a
  zero-initialised scalar head; with LoRA its own adapters), the default for a full fine-tune — or 'value_head'
  on the policy's trunk, the default with LoRA.
- rloo, grpo: critic-free, `policy.samples_per_prompt` samples per prompt, group baselines (cai.rl.group; the
  `ppo` block's rollout, optimiser and KL settings).
- dpo: soft-label DPO on RUN/feedback/pairs.jsonl (cai.rl.dpo; the `dpo` block). It needs no PM; when the run
  has one (and `ppo.reward` is 'pm'), its probes are scored by it like the others' updates.

Every algorithm: the policy is RUN/sft/model, fully fine-tuned or with LoRA (`ppo.lora` / `dpo.lora`); the
reference is a frozen copy of it with the policy's weights (fp32 masters, run under the same autocast: the KL
starts at exactly 0), or with LoRA the same weights with the adapters switched off; the reward (`ppo.reward`)
is 'pm' — RUN/preference_model/model, normalised with its stored mean/std — or an import path
'module:function' (cai.rl.rewards); prompts are RUN/critique_revise/prompts.jsonl.
With `policy.rounds` > 1 the on-policy algorithms run online rounds (cai.rl.online).

Outputs: policy/ (HF causal-LM folder with tokenizer, LoRA merged), metrics.jsonl (a row per update, or per
logging step and probe for DPO: every algorithm logs objective/score, objective/kl, objective/sqrt_kl, the time
of each phase and tokens_per_s; with rounds each row has its `round`), samples.jsonl, score_vs_kl.png,
checkpoints/ (the newest; a rerun resumes from it), eval.json (DPO: implicit-reward accuracy on held-out pairs),
rounds/ and rounds.json (online rounds).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from cai.config.policy import unread_settings
from cai.errors import UserError
from cai.eval.implicit import implicit_accuracy
from cai.plots import line_chart
from cai.pm.pairs import split_pairs
from cai.rl import online
from cai.rl.rewards import make_reward
from cai.runtime import distributed as dist
from cai.runtime.models import load_model, load_tokenizer, wrap_lora
from cai.runtime.rundir import read_json, read_jsonl, write_json
from cai.runtime.settings import Precision
from cai.runtime.training import metrics_callback, resume_point, save_trained, token_callback, train_from


def load_prompts(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "user":
            raise UserError(f"{path}:{i}: a prompt row with 'messages' ending in a user turn is expected")
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows


def build_models(cfg, settings, sft_dir: str, device: str, critic: bool = True):
    """(policy, reference or None, critic or None, tokenizer) as a ppo block asks (no critic for a critic-free
    learner): the policy and critic with fp32 master weights (a LoRA adapter's frozen base in the compute dtype:
    Precision.base), the frozen reference as `reference` loads it."""
    from cai.rl.modules import PolicyModel, ValueModel

    trainable = Precision.of(settings, device).base(settings, cfg.lora)
    tok = load_tokenizer(sft_dir, settings, padding_side="left")
    lm = load_model(sft_dir, trainable, device=device)
    ref = None
    if cfg.lora is not None:
        lm = wrap_lora(lm, cfg.lora)
    else:
        ref = reference(sft_dir, settings, device)
    policy = PolicyModel(lm, value_head=critic and cfg.critic == "value_head")
    value = None
    if critic and cfg.critic == "separate":
        seq = load_model(sft_dir, trainable, kind="seq_cls", device=device, role="PPO critic (value model)")
        seq.config.pad_token_id = tok.pad_token_id
        if cfg.lora is not None:
            prefix = seq.base_model_prefix
            setattr(seq, prefix, wrap_lora(getattr(seq, prefix), cfg.lora, task_type="FEATURE_EXTRACTION"))
        value = ValueModel(seq)
    return policy, ref, value, tok


def reference(sft_dir: str, settings, device: str):
    """The frozen reference of a fully fine-tuned policy: the SFT weights in the policy's weight dtype (fp32
    masters; the trainers run it under the policy's autocast), so that before the first step the policy is its
    reference to the bit and the KL starts at exactly 0 (a bf16 copy would differ by bf16 rounding). The cost:
    one fp32 copy of the model instead of a bf16 one."""
    return load_model(sft_dir, Precision.of(settings, device).trainable(settings), device=device)


def fresh_policy(cfg, settings, sft_dir: str):
    """A CPU copy of the policy's LM as build_models makes it, its base in fp32 (for gathering sharded weights
    into, and for merging LoRA adapters in fp32: cai.runtime.training.merged_lora)."""
    lm = load_model(sft_dir, settings.with_(dtype="float32"), device="cpu")
    return wrap_lora(lm, cfg.lora) if cfg.lora is not None else lm


def plot(metrics_path: Path, out: Path, algorithm: str) -> None:
    rows = [r for r in read_jsonl(metrics_path) if "objective/score" in r and "objective/sqrt_kl" in r]
    if not rows:
        return
    line_chart(
        out,
        {"objective/score": ([r["objective/sqrt_kl"] for r in rows], [r["objective/score"] for r in rows])},
        title=f"{algorithm.upper()}: score against √KL to the SFT policy",
        xlabel="objective/sqrt_kl (√nats)",
        ylabel="objective/score",
    )


def accelerator(settings, cfg, algorithm: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = []
    if algorithm == "ppo" and cfg.critic_warmup_updates:
        # warm-up updates leave the policy out of the loss (a separate critic's policy, or a value-head critic's
        # untied LM head): DDP must expect parameters without gradients
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(
        cpu=dist.accelerator_cpu(settings.torch_device()),
        mixed_precision=Precision.of(settings).mixed,
        kwargs_handlers=handlers,
    )


def on_policy_trainer(ctx, cfg, acc, prompts, pm_dir, metrics):
    """The PPO or RLOO/GRPO trainer of this stage (`cfg`: the ppo block, its updates over every round), with
    its reward; it resumes from the newest checkpoint."""
    import torch

    c, settings = ctx.config, ctx.config.settings
    algorithm, device = c.policy.algorithm, str(acc.device)
    torch.manual_seed(settings.seed)
    sft_dir = str(ctx.input_dir("sft") / "model")
    reward = make_reward(cfg.reward, pm_dir=pm_dir, settings=settings, device=device)
    policy, ref, critic, tok = build_models(cfg, settings, sft_dir, device, critic=algorithm == "ppo")
    common = dict(
        policy=policy,
        tokenizer=tok,
        reward=reward,
        prompts=prompts,
        out_dir=ctx.out_dir,
        ref_model=ref,
        accelerator=acc,
        seed=settings.seed,
        metrics=metrics,
        precision=Precision.of(settings),
        run_token=ctx.run_token,
    )
    if algorithm == "ppo":
        from cai.rl.trainer import PPOTrainer

        return PPOTrainer(cfg, critic=critic, **common)
    from cai.rl.group import GroupTrainer

    p = c.policy
    return GroupTrainer(
        cfg,
        algorithm=algorithm,
        samples_per_prompt=p.samples_per_prompt,
        loss_mean=p.loss_mean,
        scale_rewards=p.scale_rewards,
        **common,
    )


def unused_settings(ppo, policy) -> list[str]:
    """The keys the recipe set (not defaults) that its algorithm and number of rounds do not read
    (cai.config.policy.unread_settings; the stage sees them at their defaults). Arms of one recipe share these
    blocks, so they are named, not refused."""
    given = {"ppo": ppo.model_fields_set, "policy": policy.model_fields_set}
    return [k for k in unread_settings(policy, ppo) if k.partition(".")[2] in given[k.partition(".")[0]]]


def warn_unused(config) -> None:
    """Print, once, the settings `unused_settings` names for this recipe's policy stage."""
    p = config.policy
    unused = unused_settings(config.ppo, p)
    if unused and dist.is_main():
        rounds = f" with {p.rounds} round{'s' if p.rounds > 1 else ''}"
        print(
            f"[cai] policy: {p.algorithm}{rounds} does not read {', '.join(unused)}; ignoring them",
            flush=True,
        )


def run_on_policy(ctx, prompts: list[dict]) -> None:
    """PPO, RLOO or GRPO, in `policy.rounds` rounds of `ppo.updates` updates (online RLAIF between rounds)."""
    c, out = ctx.config, ctx.out_dir
    rounds, per_round = c.policy.rounds, c.ppo.updates
    if rounds > 1 and c.ppo.reward != "pm":
        raise UserError(
            "policy.rounds: online rounds train the PM further each round; they need ppo.reward: pm"
        )
    cfg = c.ppo.model_copy(update={"updates": per_round * rounds})  # one schedule over every round
    first_pm = ctx.input_dir("preference_model") / "model" if cfg.reward == "pm" else None
    sft_dir = str(ctx.input_dir("sft") / "model")
    base_log = ctx.metrics()
    for r in range(1, rounds + 1):
        if rounds > 1 and online.is_complete(out, r):
            continue
        pm_dir = online.pm_of_round(out, r, first_pm)
        if r > 1:
            pm_dir = online.refresh(ctx, r, online.pm_of_round(out, r - 1, first_pm), prompts)
        acc = accelerator(c.settings, cfg, c.policy.algorithm)
        metrics = dataclasses.replace(base_log, extra={"round": r}) if rounds > 1 else base_log
        trainer = on_policy_trainer(ctx, cfg, acc, prompts, pm_dir, metrics)
        trainer.train(until=r * per_round)
        last = r == rounds
        if not last and trainer.step % cfg.save_every:  # the checkpoint the next round continues from
            trainer.save(trainer.step)  # (train() wrote it already at a multiple of save_every)
        dest = out / "policy" if last else online.round_dir(out, r) / "policy"
        trainer.save_policy(dest, fresh_policy=lambda: fresh_policy(cfg, c.settings, sft_dir))
        if rounds > 1:
            online.finish_round(out, r, dest, base_log.path)
        del trainer
        acc.free_memory()
        dist.release_stage_state()


def run_dpo(ctx, prompts: list[dict]) -> dict:
    """Soft-label DPO on the feedback pairs (cai.rl.dpo), with probes; returns the held-out evaluation."""
    import torch

    from cai.rl import dpo

    c, out = ctx.config, ctx.out_dir
    cfg, settings = c.dpo, c.settings
    path = ctx.input_dir("feedback") / "pairs.jsonl"
    rows = [row for row in read_jsonl(path) if row.get("p_a") is not None]
    if len(rows) < 2:
        raise UserError(f"{path}: at least 2 labelled pairs are needed for DPO")
    train, held = split_pairs(rows, cfg.eval_fraction, settings.seed)
    sft_dir, device = str(ctx.input_dir("sft") / "model"), settings.torch_device()
    precision = Precision.of(settings, device)
    torch.manual_seed(settings.seed)
    tok = load_tokenizer(sft_dir, settings, padding_side="left")
    model = load_model(sft_dir, precision.base(settings, cfg.lora), device=device)
    ref = None if cfg.lora is not None else reference(sft_dir, settings, device)
    has_pm = "preference_model" in ctx.inputs
    reward = None
    if c.ppo.reward != "pm" or has_pm:
        pm_dir = ctx.input_dir("preference_model") / "model" if c.ppo.reward == "pm" else None
        reward = make_reward(c.ppo.reward, pm_dir=pm_dir, settings=settings, device=device)
    chosen = random.Random(f"{settings.seed}:probe").sample(prompts, min(cfg.probe_prompts, len(prompts)))
    probe = dpo.Probe(c.ppo, tok, chosen, reward, settings.seed, precision.autocast(device))
    metrics = ctx.metrics()
    last = resume_point(out / "checkpoints", metrics.path, "policy (dpo)", ctx.run_token)
    probing = dpo.probe_callback(probe, metrics, cfg.probe_every, ref_lm=ref)
    callbacks = [metrics_callback(metrics), token_callback(ctx.run_token), probing]
    args = (
        cfg,
        settings.seed,
        device,
        precision,
        model,
        ref,
        tok,
        train,
        held,
        out / "checkpoints",
        callbacks,
    )
    trainer = dpo.build_trainer(*args)
    trainer.resume_tokens(last)
    probing.trainer = trainer
    if last is None:  # the implicit reward before training (the SFT model against itself: every pair a tie)
        before = implicit_accuracy(trainer)
        if dist.is_main():
            write_json(out / "eval.json", {"held_out_before": before})
    before = (read_json(out / "eval.json") or {}).get("held_out_before") if last else before
    train_from(trainer, last)
    probing.finish(trainer)  # the last probe, where a kill after the last checkpoint left no step to train
    after = implicit_accuracy(trainer)
    fp32 = settings.with_(dtype="float32", device="cpu")  # the base to merge a LoRA adapter into, in fp32
    save_trained(
        trainer,
        trainer.model,
        tok,
        out / "policy",
        merge=cfg.lora is not None,
        dtype=precision.save,
        fresh=lambda: load_model(sft_dir, fp32),
    )
    return {"train_pairs": len(train), "held_out_before": before, "held_out": after, "beta": cfg.beta}


def run(ctx) -> Path:
    c, out = ctx.config, ctx.out_dir
    algorithm = c.policy.algorithm
    sft_dir = ctx.input_dir("sft") / "model"
    if not (sft_dir / "config.json").is_file():
        raise UserError(f"{sft_dir}: the SFT model is missing (run the sft stage first)")
    prompts = load_prompts(ctx.input_dir("critique_revise") / "prompts.jsonl")
    warn_unused(c)
    evaluation = run_dpo(ctx, prompts) if algorithm == "dpo" else None
    if algorithm != "dpo":
        run_on_policy(ctx, prompts)
    if dist.is_main():
        summarise(ctx, evaluation)
    dist.barrier()
    return out


def summarise(ctx, evaluation: dict | None) -> None:
    """score_vs_kl.png, eval.json (DPO), rounds.json (online) and the stage summary."""
    c, out = ctx.config, ctx.out_dir
    algorithm, settings = c.policy.algorithm, c.settings
    plot(out / "metrics.jsonl", out / "score_vs_kl.png", algorithm)
    rows = read_jsonl(out / "metrics.jsonl")
    scored = [r for r in rows if "objective/kl" in r]
    trained = [r for r in rows if "tokens_per_s" in r]  # a row per update (per logging step for DPO)
    summary: dict = {"algorithm": algorithm, "updates": len(trained)}
    if scored:
        first, last = scored[0], scored[-1]
        if "objective/score" in first and "objective/score" in last:
            summary.update(
                score_first=round(first["objective/score"], 4), score_last=round(last["objective/score"], 4)
            )
        summary["kl_last"] = round(last["objective/kl"], 4)
    times = [r.get("time/update", r.get("time/train", 0.0)) for r in trained]
    tokens = sum(r["tokens_per_s"] * t for r, t in zip(trained, times))
    if trained:
        summary["seconds_per_update"] = round(sum(times) / len(trained), 2)
    if tokens:
        summary["seconds_per_1k_policy_tokens"] = round(1000 * sum(times) / tokens, 3)
    if evaluation is not None:
        write_json(out / "eval.json", evaluation)
        if evaluation["held_out"].get("n"):
            summary["implicit_accuracy"] = round(evaluation["held_out"]["accuracy"], 3)
    if c.policy.rounds > 1:
        rounds = online.summary(out, c.policy.rounds)
        write_json(out / "rounds.json", rounds)
        summary["rounds"] = [
            {k: r.get(k) for k in ("round", "sampled_from", "policy_hash", "score_last", "sqrt_kl_last")}
            for r in rounds
        ]
    summary["precision"] = Precision.of(settings).record()
    ctx.summary.update(summary)
