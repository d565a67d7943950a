"""PPO checkpoints for an exact resume: trainable weights (safetensors), optimizer state and RNG states
(torch.save, read back with weights_only=True), and a JSON file with the step, schedulers and KL controller.

Layout: <dir>/step-000012/{policy.safetensors, critic.safetensors, optimizer.pt, rng-rank0.pt, state.json}.
Under FSDP: model.safetensors (trainable tensors by their names in the ActorCritic, gathered whole) and
optimizer.pt keyed by parameter name (torch.distributed.checkpoint's full state dicts).
Under DeepSpeed the weights and the (partitioned) optimizer state are the engine's own checkpoint instead, in
deepspeed/ (DeepSpeed writes and reads it with torch.save/torch.load; it holds only trainable parameters).
A checkpoint is written to a temporary folder and renamed when complete; only the newest is kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from cai.errors import UserError
from cai.rl import engine
from cai.rl.modules import load_trainable_state, trainable_state
from cai.runtime import distributed as dist
from cai.runtime.rundir import read_jsonl, rewrite_jsonl
from cai.runtime.training import check_token, check_world_size, merged_lora

PREFIX = "step-"


def _step_of(name: str) -> int | None:
    """N of a regular checkpoint's folder name step-N, else None (a temporary or a replaced folder)."""
    digits = name[len(PREFIX) :]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None. A save killed between finishing its temporary folder
    (state.json is written last) and renaming it is completed here first, so that checkpoint is not lost."""
    if not ckpt_dir.is_dir():
        return None
    for tmp in ckpt_dir.glob(f"{PREFIX}*.tmp"):
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        if (tmp / "state.json").is_file() and not final.exists() and dist.is_main():
            tmp.rename(final)
    dist.barrier()
    done = [
        p
        for p in ckpt_dir.iterdir()
        if p.is_dir() and _step_of(p.name) is not None and (p / "state.json").is_file()
    ]
    return max(done, key=lambda p: _step_of(p.name), default=None)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def save(
    ckpt_dir: Path,
    step: int,
    *,
    weights: dict[str, dict],
    optimizer_state: dict | None,
    state: dict,
    engine=None,
    rank: int = 0,
    is_main: bool = True,
    barrier=lambda: None,
    name: str | None = None,
) -> Path:
    """Write a checkpoint. Every rank writes its RNG state (and its part of a DeepSpeed `engine`'s checkpoint);
    the main process writes the rest and renames."""
    from safetensors.torch import save_file

    final = ckpt_dir / (name or f"{PREFIX}{step:06d}")
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if engine is not None:
        engine.save_checkpoint(
            str(tmp / "deepspeed"), tag="engine", save_latest=False, exclude_frozen_parameters=True
        )
    if is_main:
        for key, tensors in weights.items():
            save_file(tensors, str(tmp / f"{key}.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
    barrier()
    if is_main:
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        # a folder of the same name is replaced only once the new one is complete: at every moment one of
        # them is whole under a name `latest` reads (step-N, or step-N.tmp with its state.json)
        replaced = final.with_name(final.name + ".old")
        shutil.rmtree(replaced, ignore_errors=True)
        if final.exists():
            final.rename(replaced)
        tmp.rename(final)
        shutil.rmtree(replaced, ignore_errors=True)
        if name is None:  # keep only the newest regular checkpoint
            for old in ckpt_dir.iterdir():
                if old.is_dir() and old.name.startswith(PREFIX) and old != final:
                    shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, rank: int = 0) -> tuple[dict, dict | None, dict, dict | None]:
    """(weights by key, optimizer state or None (DeepSpeed), state.json, this rank's RNG state or None)."""
    from safetensors.torch import load_file

    weights = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    opt_file = path / "optimizer.pt"
    optimizer = torch.load(opt_file, weights_only=True, map_location="cpu") if opt_file.is_file() else None
    state = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return weights, optimizer, state, rng


def resume(trainer) -> None:
    """Load the newest checkpoint of a cai.rl.trainer.PPOTrainer (if any) into it: trainable weights,
    optimizers, schedulers, KL controller, RNG state and step; metrics rows logged after it are dropped."""

    path = latest(trainer.ckpt_dir)
    if path is None:  # a start, or a run killed before its first checkpoint: its rows are logged again
        _drop_rows_after(trainer)
        return
    saved = json.loads((path / "state.json").read_text())
    check_token(path, saved.get("run_token"), trainer.run_token)
    check_world_size(path, saved.get("world_size"), dist.world_size())
    weights, optim, state, rng = load(path, dist.rank())
    if trainer.stepper.deepspeed:
        if not (path / "deepspeed").is_dir():
            raise UserError(f"{path}: not a DeepSpeed checkpoint; resume with the engine that wrote it")
        trainer.model.load_checkpoint(
            str(path / "deepspeed"), tag="engine", load_module_strict=False, load_lr_scheduler_states=False
        )
    elif optim is None:
        raise UserError(f"{path}: a DeepSpeed checkpoint; resume under the same DeepSpeed config")
    elif trainer.stepper.fsdp:
        if "model" not in weights:
            raise UserError(f"{path}: not an FSDP checkpoint; resume with the engine that wrote it")
        engine.load_full_state(trainer.model, trainer.opt, weights["model"], optim)
    else:
        if "policy" not in weights:
            raise UserError(f"{path}: an FSDP checkpoint; resume under the same FSDP config")
        load_trainable_state(trainer.policy, weights["policy"])
        if trainer.critic is not None:
            load_trainable_state(trainer.critic, weights["critic"])
        trainer.opt.load_state_dict(optim)
    trainer.sched.load_state_dict(state["scheduler"])
    trainer.kl_ctl.load_state_dict(state["kl_controller"])
    if rng is not None:
        set_rng_state(rng)
    trainer.step = int(state["step"])
    _drop_rows_after(trainer)
    if trainer.acc.is_main_process:
        print(f"[ppo] resumed from {path} (update {trainer.step})", flush=True)


def _drop_rows_after(trainer) -> None:
    """Drop the metrics rows of updates after the trainer's step: those updates run, and are logged, again."""
    if trainer.acc.is_main_process and trainer.metrics is not None:
        rows = read_jsonl(trainer.metrics.path)
        kept = [r for r in rows if r.get("step", 0) <= trainer.step]
        if len(kept) < len(rows):
            rewrite_jsonl(trainer.metrics.path, kept)


def save_trainer(trainer, step: int, name: str | None = None) -> Path:
    """Checkpoint a cai.rl.trainer.PPOTrainer: trainable weights of policy and critic, the optimizer, the
    scheduler, the KL controller and every rank's RNG state."""

    ds = trainer.stepper.deepspeed
    weights, optimizer_state = {}, None
    if trainer.stepper.fsdp:  # whole tensors gathered from the shards (every rank takes part)
        weights["model"], optimizer_state = engine.full_state(trainer.model, trainer.opt)
    elif not ds:  # a DeepSpeed engine checkpoints its (possibly partitioned) weights itself
        weights["policy"] = trainable_state(trainer.policy)
        if trainer.critic is not None:
            weights["critic"] = trainable_state(trainer.critic)
        optimizer_state = trainer.opt.state_dict()
    state = {
        "kl_controller": trainer.kl_ctl.state_dict(),
        "scheduler": trainer.sched.state_dict(),
        "run_token": trainer.run_token,
        "world_size": dist.world_size(),
    }
    return save(
        trainer.ckpt_dir,
        step,
        weights=weights,
        optimizer_state=optimizer_state,
        engine=trainer.model if ds else None,
        state=state,
        rank=dist.rank(),
        is_main=trainer.acc.is_main_process,
        barrier=dist.barrier,
        name=name,
    )


def save_policy(trainer, path, fresh_policy=None) -> Path:
    """The trained policy of a PPOTrainer as a Hugging Face folder (LoRA merged into the weights) with its tokenizer.

    Under ZeRO-3 or FSDP the weights are sharded: every process takes part in gathering them, and the main
    process loads them into `fresh_policy()`, a CPU copy of the policy's LM built as it was (LoRA-wrapped
    alike, its base in fp32). A LoRA base held in bf16 or fp16 is not merged into: the adapters are merged in
    fp32 into `fresh_policy()` (cai.runtime.training.merged_lora)."""
    path = Path(path)
    lm, state = trainer.policy.lm, None
    if engine.zero_stage(trainer.acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(lm.parameters())):
            if trainer.acc.is_main_process:
                state = {k: v.detach().to("cpu", copy=True) for k, v in lm.state_dict().items()}
    elif trainer.stepper.fsdp:
        whole, _ = engine.full_state(trainer.model, trainable_only=False)
        state = {k[len("policy.lm.") :]: v for k, v in whole.items() if k.startswith("policy.lm.")}
    if state is not None and trainer.acc.is_main_process:
        if fresh_policy is None:
            raise ValueError("save_policy of sharded weights needs fresh_policy to load them into")
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # else from_pretrained would build a ZeRO-3-partitioned (empty) copy
        lm = fresh_policy()
        lm.load_state_dict(state)
    if trainer.acc.is_main_process:
        lm = merged_lora(lm, fresh_policy)  # in fp32 into fresh_policy() when the base is held in bf16/fp16
        lm.to(getattr(torch, trainer.precision.save))  # the precision policy's save dtype (fp32 by default)
        lm.save_pretrained(str(path), safe_serialization=True)
        trainer.tok.save_pretrained(str(path))
    dist.barrier()
    return path
