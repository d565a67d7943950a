"""RL-CAI: PPO of the SFT policy against the preference model (or a reward function), with a KL penalty
to the SFT model. The loop lives in cai.rl.trainer; this stage loads the models and writes ppo/.

- policy: RUN/sft/model, fully fine-tuned or with LoRA (`ppo.lora`);
- reference: a frozen copy of RUN/sft/model, or with LoRA the same weights with the adapters disabled;
- critic (`ppo.critic`): 'separate' — a value model (the SFT trunk with a zero-initialised scalar head; with
  LoRA it gets its own adapters), or 'value_head' — a scalar head on the policy's trunk;
- reward (`ppo.reward`): 'pm' — RUN/preference_model/model, normalised with its stored mean/std — or an
  import path 'module:function' (signature in cai.rl.rewards);
- prompts: RUN/critique_revise/prompts.jsonl.

Outputs: metrics.jsonl (one row per update), score_vs_kl.png, checkpoints/ (the newest; a rerun resumes from
it), policy/ (HF causal-LM folder with tokenizer, LoRA merged).
"""

from __future__ import annotations

from pathlib import Path

from cai.errors import UserError
from cai.plots import line_chart
from cai.rl.rewards import make_reward
from cai.runtime import distributed as dist
from cai.runtime.models import load_model, load_tokenizer, wrap_lora
from cai.runtime.precision import Precision
from cai.runtime.rundir import read_jsonl


def load_prompts(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "user":
            raise UserError(f"{path}:{i}: a prompt row with 'messages' ending in a user turn is expected")
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows


def build_models(cfg, settings, sft_dir: str, device: str):
    """(policy, reference or None, critic or None, tokenizer) as a ppo block asks: the policy and critic with fp32
    master weights, the frozen reference in the recipe's dtype (cai.runtime.precision)."""
    from cai.rl.modules import PolicyModel, ValueModel

    trainable = Precision.of(settings, device).trainable(settings)
    tok = load_tokenizer(sft_dir, settings, padding_side="left")
    lm = load_model(sft_dir, trainable, device=device)
    ref = None
    if cfg.lora is not None:
        lm = wrap_lora(lm, cfg.lora)
    else:
        ref = load_model(sft_dir, settings, device=device)
    policy = PolicyModel(lm, value_head=cfg.critic == "value_head")
    critic = None
    if cfg.critic == "separate":
        seq = load_model(sft_dir, trainable, kind="seq_cls", device=device, role="PPO critic (value model)")
        seq.config.pad_token_id = tok.pad_token_id
        if cfg.lora is not None:
            prefix = seq.base_model_prefix
            setattr(seq, prefix, wrap_lora(getattr(seq, prefix), cfg.lora, task_type="FEATURE_EXTRACTION"))
        critic = ValueModel(seq)
    return policy, ref, critic, tok


def fresh_policy(cfg, settings, sft_dir: str):
    """A CPU copy of the policy's LM as build_models makes it (for gathering sharded weights into)."""
    lm = load_model(sft_dir, settings.with_(dtype="float32"), device="cpu")
    return wrap_lora(lm, cfg.lora) if cfg.lora is not None else lm


def plot(metrics_path: Path, out: Path) -> None:
    rows = read_jsonl(metrics_path)
    if not rows:
        return
    line_chart(
        out,
        {"objective/score": ([r["objective/sqrt_kl"] for r in rows], [r["objective/score"] for r in rows])},
        title="PPO: score against √KL to the SFT policy",
        xlabel="objective/sqrt_kl (√nats)",
        ylabel="objective/score",
    )


def run(ctx) -> Path:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from cai.rl.trainer import PPOTrainer

    cfg, settings, out = ctx.config.ppo, ctx.config.settings, ctx.out_dir
    handlers = []
    if cfg.critic_warmup_updates and cfg.critic == "separate":
        # warm-up updates leave the policy out of the loss: DDP must expect parameters without gradients
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    precision = Precision.of(settings)
    acc = Accelerator(
        cpu=dist.accelerator_cpu(settings.torch_device()),
        mixed_precision=precision.mixed,
        kwargs_handlers=handlers,
    )
    device = str(acc.device)
    torch.manual_seed(settings.seed)

    sft_dir = ctx.input_dir("sft") / "model"
    if not (sft_dir / "config.json").is_file():
        raise UserError(f"{sft_dir}: the SFT model is missing (run the sft stage first)")
    prompts = load_prompts(ctx.input_dir("critique_revise") / "prompts.jsonl")
    pm_dir = ctx.input_dir("preference_model") / "model" if cfg.reward == "pm" else None
    reward = make_reward(cfg.reward, pm_dir=pm_dir, settings=settings, device=device)
    policy, ref, critic, tok = build_models(cfg, settings, str(sft_dir), device)
    trainer = PPOTrainer(
        cfg,
        policy=policy,
        tokenizer=tok,
        reward=reward,
        prompts=prompts,
        out_dir=out,
        critic=critic,
        ref_model=ref,
        accelerator=acc,
        seed=settings.seed,
        metrics=ctx.metrics(),
        precision=precision,
        run_token=ctx.run_token,
    )
    history = trainer.train()
    trainer.save_policy(out / "policy", fresh_policy=lambda: fresh_policy(cfg, settings, str(sft_dir)))
    if acc.is_main_process:
        plot(out / "metrics.jsonl", out / "score_vs_kl.png")
        rows = read_jsonl(out / "metrics.jsonl") or history
        first, last = rows[0], rows[-1]
        ctx.summary.update(
            {
                "updates": len(rows),
                "score_first": round(first["objective/score"], 4),
                "score_last": round(last["objective/score"], 4),
                "kl_last": round(last["objective/kl"], 4),
                "seconds_per_update": round(sum(r["time/update"] for r in rows) / len(rows), 2),
                "precision": precision.record(),
            }
        )
    dist.barrier()
    return out
