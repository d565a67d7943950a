"""PPO trainer runs for tests/test_distributed.py: the same tiny PPO run built the same way in-process (no engine)
and, through `python tests/ppo_engine_run.py OUT` under `accelerate launch --config_file
recipes/accelerate/zero{2,3}.yaml`, under DeepSpeed: a straight run, and a run stopped after 2 of 3 updates and
resumed from its DeepSpeed checkpoint. Each run's trainable weights go to OUT/<run>.safetensors.

The settings exercise what the engine changes: 2 minibatches of 2 micro-batches each (the trainer marks the
accumulation boundary), a critic warm-up update (policy learning rate 0), and a separate critic. Gradient
clipping is effectively off (DeepSpeed clips policy and critic jointly, the plain trainer per group).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

PROMPTS = [{"messages": [{"role": "user", "content": f"Say something, please ({i})."}]} for i in range(8)]


def lowercase_fraction(prompts, responses, **kwargs):
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


def build(out_dir: Path, accelerator=None):
    from cai.config import PPOConfig
    from cai.models import load_model, load_tokenizer
    from cai.rl.modules import PolicyModel, ValueModel
    from cai.rl.rewards import FunctionReward
    from cai.rl.trainer import PPOTrainer
    from cai.rundir import MetricsLog

    cfg = PPOConfig(
        updates=3,
        rollout_batch_size=8,
        response_length=8,
        ppo_epochs=2,
        num_minibatches=2,
        grad_accum=2,
        learning_rate=5e-3,
        temperature=1.0,
        critic_warmup_updates=1,
        max_grad_norm=1e9,
        save_every=1,
    )
    torch.manual_seed(0)
    tok = load_tokenizer("tiny-random-llama")
    critic = ValueModel(load_model("tiny-random-llama", kind="seq_cls"))
    return PPOTrainer(
        cfg,
        policy=PolicyModel(load_model("tiny-random-llama")),
        tokenizer=tok,
        reward=FunctionReward(lowercase_fraction),
        prompts=PROMPTS,
        out_dir=out_dir,
        critic=critic,
        ref_model=load_model("tiny-random-llama"),
        accelerator=accelerator,
        seed=0,
        metrics=MetricsLog(out_dir / "metrics.jsonl"),
        show_progress=False,
    )


def weights(trainer) -> dict:
    """Every trainable tensor of policy and critic, whole (gathered when ZeRO-3 partitions them)."""
    from cai.rl.modules import gathered

    named = [("policy." + n, p) for n, p in trainer.policy.named_parameters() if p.requires_grad]
    named += [("critic." + n, p) for n, p in trainer.critic.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named]):
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}


def main(out: Path) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from cai.rl.engine import is_deepspeed

    acc = Accelerator()
    assert is_deepspeed(acc), f"launched without DeepSpeed ({acc.distributed_type})"
    straight = build(out / "straight", acc)
    straight.train()
    save_file(weights(straight), str(out / "straight.safetensors"))
    build(out / "resumed", acc).train(until=2)
    resumed = build(out / "resumed", acc)
    assert resumed.step == 2, resumed.step
    resumed.train()
    save_file(weights(resumed), str(out / "resumed.safetensors"))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
