"""PPO trainer runs for tests/test_distributed.py: the same tiny PPO run built the same way in-process (no engine)
and under an engine: `accelerate launch --config_file recipes/accelerate/zero{2,3}.yaml tests/ppo_engine_run.py
OUT zero3 full lora` (DeepSpeed) or `python tests/ppo_engine_run.py OUT fsdp full lora` (FSDP2, see
fsdp_accelerator). Each variant named after the engine (`full`: a full fine-tune with a separate critic; `lora`: a
LoRA policy with a value head) makes a straight run, and a run stopped after 2 of 3 updates and resumed from its
checkpoint, in OUT/<variant>: each run's trainable weights go to <run>.safetensors, and the straight run's saved
policy to policy/. The variants share one process and one Accelerator, as the stages of one `cai run` do.

The settings exercise what the engine changes: 2 minibatches of 2 micro-batches each (the trainer marks the
accumulation boundary), a critic warm-up update (policy learning rate 0), a separate critic, and gradient
clipping that is active (every engine clips policy and critic jointly, as DeepSpeed does).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

PROMPTS = [{"messages": [{"role": "user", "content": f"Say something, please ({i})."}]} for i in range(8)]


def lowercase_fraction(prompts, responses, **kwargs):
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


def build(out_dir: Path, accelerator=None, lora: bool = False):
    """The separate-critic run, or with `lora` a LoRA policy with a value head (reference = adapters off)."""
    from cai.config.fields import LoraConfig
    from cai.config.policy import PPOConfig
    from cai.rl.modules import PolicyModel, ValueModel
    from cai.rl.rewards import FunctionReward
    from cai.rl.trainer import PPOTrainer
    from cai.runtime.models import load_model, load_tokenizer
    from cai.runtime.rundir import MetricsLog

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
        max_grad_norm=0.2,  # clipping active: the joint norm of policy and critic, under every engine
        save_every=1,
        lora=LoraConfig(r=8, alpha=16) if lora else None,
        critic="value_head" if lora else "separate",
    )
    torch.manual_seed(0)
    tok = load_tokenizer("tiny-random-llama")
    critic = None if lora else ValueModel(load_model("tiny-random-llama", kind="seq_cls"))
    return PPOTrainer(
        cfg,
        policy=PolicyModel(fresh_policy(lora), value_head=lora),
        tokenizer=tok,
        reward=FunctionReward(lowercase_fraction),
        prompts=PROMPTS,
        out_dir=out_dir,
        critic=critic,
        ref_model=None if lora else load_model("tiny-random-llama"),
        accelerator=accelerator,
        seed=0,
        metrics=MetricsLog(out_dir / "metrics.jsonl"),
        show_progress=False,
    )


def fresh_policy(lora: bool = False):
    """The policy's LM as built (also to gather sharded weights into, as cai.stages.ppo.fresh_policy does)."""
    from cai.config.fields import LoraConfig
    from cai.runtime.models import load_model, wrap_lora

    lm = load_model("tiny-random-llama")
    return wrap_lora(lm, LoraConfig(r=8, alpha=16)) if lora else lm


def weights(trainer) -> dict:
    """Every trainable tensor of policy and critic, whole (gathered when ZeRO-3 or FSDP shard them)."""
    from cai.rl.engine import full_state
    from cai.rl.modules import gathered

    if trainer.stepper.fsdp:
        return {n: t.clone().contiguous() for n, t in full_state(trainer.model)[0].items()}
    named = [("policy." + n, p) for n, p in trainer.policy.named_parameters() if p.requires_grad]
    if trainer.critic is not None:
        named += [("critic." + n, p) for n, p in trainer.critic.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named]):
        return {n: p.detach().cpu().clone().contiguous() for n, p in named}


def fsdp_accelerator():
    """An Accelerator in FSDP2 mode on this CPU machine. accelerate selects FSDP only on GPUs, so the state is
    switched after creation; the sharding is then torch's real fully_shard over a gloo group, as on GPUs with
    NCCL (the same code path in cai.rl; only the device differs)."""
    import os

    import torch.distributed as tdist
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        tdist.init_process_group("gloo", rank=0, world_size=1)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT"
    )

    class CPUFSDPAccelerator(Accelerator):
        def prepare(self, *args, **kwargs):
            out = super().prepare(*args, **kwargs)
            self.state.distributed_type = DistributedType.FSDP  # preparing re-derives it from the CPU device
            return out

    acc = CPUFSDPAccelerator(fsdp_plugin=plugin)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def nan_on_rank_1(out: Path) -> None:
    """Two DDP processes whose reward turns non-finite on rank 1 only, at the second update: both must stop
    with the same one-line error (neither left waiting in a collective), after a checkpoint of that state."""
    from accelerate import Accelerator

    from cai.errors import UserError
    from cai.rl.rewards import FunctionReward
    from cai.runtime import distributed as dist

    calls = []

    def reward(prompts, responses, **kwargs):
        calls.append(1)
        bad = dist.rank() == 1 and len(calls) == 2
        return [float("nan") if bad else 0.5 for _ in responses]

    from accelerate.utils import DistributedDataParallelKwargs

    # the critic warm-up update leaves the policy out of the loss (as the ppo stage sets up DDP for it)
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    trainer = build(out / "run", acc)
    trainer.reward = FunctionReward(reward)
    try:
        trainer.train()
        message = "no error"
    except UserError as exc:
        message = str(exc)
    (out / f"rank{dist.rank()}.txt").write_text(message)
    acc.wait_for_everyone()
    acc.end_training()


def main(out: Path, engine: str, variants: list[str]) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from cai.rl.engine import is_deepspeed, is_fsdp
    from cai.runtime import distributed as dist

    dist.skip_deepspeed_shm_kernel()  # as `cai run` does before its stages
    if engine == "fsdp":
        acc = fsdp_accelerator()
        assert is_fsdp(acc)
    else:
        acc = Accelerator()
        assert is_deepspeed(acc), f"launched without DeepSpeed ({acc.distributed_type})"
    for variant in variants:
        lora, sub = variant == "lora", out / variant
        straight = build(sub / "straight", acc, lora)
        straight.train()
        save_file(weights(straight), str(sub / "straight.safetensors"))
        straight.save_policy(sub / "policy", fresh_policy=partial(fresh_policy, lora))
        build(sub / "resumed", acc, lora).train(until=2)
        resumed = build(sub / "resumed", acc, lora)
        assert resumed.step == 2, resumed.step
        resumed.train()
        save_file(weights(resumed), str(sub / "resumed.safetensors"))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    if sys.argv[2] == "nan":
        nan_on_rank_1(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
    from cai.runtime import distributed as dist

    dist.end_process(0)  # as `cai` ends a process that has been in a process group
