"""The one harness around Hugging Face trainers, shared by the SFT and preference-model stages and DPO: training
arguments from a recipe's training block, a metrics.jsonl row per logging step, resume from the newest
checkpoint (metrics logged after it dropped), and an atomic save of the trained model, gathered from the shards
under ZeRO-3 or FSDP."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cai.errors import UserError
from cai.runtime import distributed as dist
from cai.runtime.forward import training_layers
from cai.runtime.rundir import NOT_SEALED, read_jsonl, rewrite_jsonl
from cai.runtime.settings import cast_keeping_fp32_heads, lora_base_may_be_half


def checkpointing_key(args_cls) -> str:
    """The name of the gradient-checkpointing flag: transformers 5.2x calls it `activation_checkpointing`, the 5.19
    that vLLM 0.32 needs `gradient_checkpointing` (pyproject.toml pins 5.19.0; both are accepted)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def training_args(args_cls, cfg, out_dir: Path, seed: int, device: str, precision, **extra):
    """`args_cls` (TRL's SFTConfig or RewardConfig) filled from a cai.config.recipe.TrainConfig block:
    schedule, batch, checkpoints every `save_steps` (the newest two kept), mixed precision as the precision
    policy says (fp32 weights, autocast to the compute dtype), no hub, no gradient checkpointing (TRL defaults
    it on; ~12x slower on a CPU), the CPU flag accelerate needs; `extra` adds or overrides. The recipe's precision
    wins over the launcher's: with bf16 and fp16 both False, TrainingArguments would take `accelerate launch`'s
    mixed_precision (ACCELERATE_MIXED_PRECISION) and train an fp32 recipe under bf16 autocast; DeepSpeed's "auto"
    bf16/fp16 entries are filled from the same value."""
    common = dict(
        output_dir=str(out_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        bf16=precision.mixed == "bf16",
        fp16=precision.mixed == "fp16",
        **{checkpointing_key(args_cls): False},
        use_cpu=dist.accelerator_cpu(device),
        report_to="none",  # the pipeline's tracker gets metrics.jsonl through the stage's MetricsLog
        dataloader_num_workers=0,
        disable_tqdm=not dist.is_main(),
    )
    launcher = os.environ.get(MIXED_ENV)
    os.environ[MIXED_ENV] = precision.mixed  # what TrainingArguments (and its DeepSpeed plugin) read
    try:
        return args_cls(**{**common, **extra})
    finally:
        if launcher is None:
            os.environ.pop(MIXED_ENV, None)
        else:
            os.environ[MIXED_ENV] = launcher


MIXED_ENV = "ACCELERATE_MIXED_PRECISION"


def with_training_layers(trainer):
    """`trainer` (a transformers Trainer) with its loss forwards run under `training_layers`
    (cai.runtime.forward): a LoRA model's adapted linears and the RMSNorms train as one autograd node each, and
    on AMD's CPUs the fp32 products run on oneDNN. Returns the trainer."""
    compute_loss = trainer.compute_loss

    def with_layers(model, *args, **kwargs):
        with training_layers(model):
            return compute_loss(model, *args, **kwargs)

    trainer.compute_loss = with_layers
    return trainer


def metrics_callback(log):
    """A TrainerCallback writing one row per logging step into a cai MetricsLog: the epoch and every finite
    number the trainer logs (loss, learning_rate, grad_norm, and each trainer's own extras)."""
    from transformers import TrainerCallback

    class ToMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero and "train_runtime" not in logs:  # not the end summary
                clean = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and v == v}
                log.log({"epoch": state.epoch, **clean}, step=state.global_step)

    return ToMetrics()


TOKEN_FILE = "cai_run_token"
WORLD_FILE = "cai_world_size"  # the number of processes that wrote the checkpoint
STATE_FILE = "trainer_state.json"  # the trainer writes it last: a checkpoint folder without it is incomplete


def save_callback(write):
    """A TrainerCallback that calls `write(folder)` on the main process for every checkpoint folder the trainer is
    about to save, before the trainer writes anything of it: a kill while a checkpoint is saved leaves a folder
    without trainer_state.json (incomplete, skipped on resume), never a complete checkpoint without the file."""
    from transformers import TrainerCallback

    def on_save(args, state, control):
        if control.should_save and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            write(folder)

    class BeforeSave(TrainerCallback):
        # the trainer's own flow callback runs first and decides `should_save`; the save follows these hooks
        def on_step_end(self, args, state, control, **kwargs):
            on_save(args, state, control)

        def on_epoch_end(self, args, state, control, **kwargs):
            on_save(args, state, control)

    return BeforeSave()


def token_callback(run_token: str | None):
    """A save_callback writing the run token and the number of processes into every checkpoint (resume_point
    checks both)."""

    def write(folder: Path) -> None:
        if run_token:
            (folder / TOKEN_FILE).write_text(run_token + "\n")
        (folder / WORLD_FILE).write_text(f"{dist.world_size()}\n")

    return save_callback(write)


def check_world_size(path: Path, saved: int | None, now: int) -> None:
    """Resume only with the number of processes that wrote the checkpoint: each process samples its own share of
    the data and holds its own RNG state, so another count would continue as a different run."""
    if saved is not None and saved != now:
        raise UserError(
            f"{path}: written by a run of {saved} process(es), resumed with {now}; resume with "
            f"`accelerate launch --num_processes {saved}`, or start a new run directory"
        )


def real_rows(n: int, end_of_data: bool, remainder: int, rank: int):
    """Which of a micro-batch's `n` rows are real. Under DDP accelerate evens the epoch's last round of batches
    over the processes with rows repeated from the epoch's start; gathered in rank order, the round's first
    `remainder` (the dataset size modulo the global micro-batch) are the real ones. One process: all are real."""
    import torch

    keep = torch.ones(n, dtype=torch.bool)
    if end_of_data and remainder > 0:
        keep = torch.arange(n) + rank * n < remainder
    return keep


def batch_rows(trainer, rows: int):
    """real_rows of a batch a Trainer's epoch iterator just gave (`rows` of them). The remainder is accelerate's,
    or, where it says -1, the train set's size modulo the global micro-batch: in an epoch resumed from a
    checkpoint accelerate's loader skips batches with a sampler that has no batch size, cannot tell the
    remainder, and every repeated row of the epoch's last round counted as real under DDP."""
    acc = trainer.accelerator
    state = acc.gradient_state
    remainder = state.remainder
    if remainder < 0 and state.end_of_dataloader and not trainer.args.dataloader_drop_last:
        remainder = len(trainer.train_dataset) % (trainer.args.train_batch_size * acc.num_processes)
    return real_rows(rows, state.end_of_dataloader, remainder, acc.process_index)


def step_batches(trainer, epoch_iterator, num_batches: int, device, key: str, rows_of: str):
    """One optimizer step's micro-batches (a Trainer's get_batch_samples), each marked under `key` with its real
    rows (batch_rows; a batch has len(batch[rows_of]) of them), and the number of real rows over all of them and
    every process: a loss summed over real rows and divided by it is the global batch's mean however the batch
    is split into micro-batches and processes."""
    import torch

    batches = []
    for _ in range(num_batches):
        try:
            batch = next(epoch_iterator)
        except StopIteration:
            break
        batch[key] = batch_rows(trainer, len(batch[rows_of]))
        batches.append(batch)
    local = sum(int(b[key].sum()) for b in batches)
    return batches, trainer.accelerator.gather(torch.tensor([local], device=device)).sum()


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoint-N folders, newest first."""
    found = ckpt_dir.glob("checkpoint-*") if ckpt_dir.is_dir() else []
    steps = [(p.name.removeprefix("checkpoint-"), p) for p in found if p.is_dir()]
    return sorted(((int(n), p) for n, p in steps if n.isdigit()), reverse=True)


def check_token(path: Path, found: str | None, expected: str | None) -> None:
    """Resume only from a checkpoint this run wrote: the run token it carries (`found`) must be the run's seal
    (`expected`, cai.runtime.rundir.run_token). A checkpoint holds pickled optimizer state (under DeepSpeed,
    pickles read with weights_only=False), so one from elsewhere is refused before anything of it is loaded."""
    if expected is not None and found != expected:
        raise UserError(
            f"{path}: not written by this run: {NOT_SEALED}; delete {path.parent} to restart the stage, "
            "or start a new run directory"
        )


def resume_point(ckpt_dir: Path, metrics_path: Path, what: str, run_token: str | None = None) -> str | None:
    """The newest complete checkpoint in `ckpt_dir` to resume from, or None; the metrics rows logged after it are
    dropped (the resumed run logs those steps again), and a fresh start clears the metrics file. Newer folders
    that a kill left incomplete (no trainer_state.json) are removed. A checkpoint without this run's token
    (token_callback) is refused: checkpoints hold pickles, so only the run that wrote one loads it; so is one
    written by another number of processes (check_world_size)."""
    folders = _checkpoints(ckpt_dir)
    step, last = next(((n, p) for n, p in folders if (p / STATE_FILE).is_file()), (0, None))
    if last is not None:
        token = last / TOKEN_FILE
        check_token(last, token.read_text().strip() if token.is_file() else None, run_token)
    if last is not None and (last / WORLD_FILE).is_file():
        check_world_size(last, int((last / WORLD_FILE).read_text()), dist.world_size())
    if dist.is_main():
        for _, p in folders:
            if p == last:
                break
            print(
                f"[cai] {what}: removing {p}, a checkpoint left incomplete by an interrupted save", flush=True
            )
            shutil.rmtree(p, ignore_errors=True)
        if last:
            rewrite_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= step])
            print(f"[cai] {what}: resuming from {last}", flush=True)
        else:
            metrics_path.unlink(missing_ok=True)
    dist.barrier()
    return str(last) if last else None


def train_from(trainer, last: str | None):
    """`trainer.train(resume_from_checkpoint=last)`, except when `last` already holds every step (a kill after the
    last step, before the stage finished): transformers would skip the trained batches and run one step more
    than max_steps when they do not end an epoch. Then the checkpoint's weights and state are loaded as they are
    and None is returned. Sharded trainers (DeepSpeed, FSDP) load weights only inside train(): they train."""
    state_file = Path(last) / STATE_FILE if last else None
    if state_file is not None and state_file.is_file() and not is_sharded(trainer):
        state = json.loads(state_file.read_text())
        # this run's step budget: its max_steps, else (an epoch budget) the one the checkpoint's run computed
        target = trainer.args.max_steps if trainer.args.max_steps > 0 else state.get("max_steps")
        if target and state.get("global_step", 0) >= target:
            from transformers import TrainerState

            trainer._load_from_checkpoint(last)
            trainer.state = TrainerState.load_from_json(str(state_file))
            return None
    return trainer.train(resume_from_checkpoint=last)


def is_sharded(trainer) -> bool:
    """Whether the trainer's weights live in DeepSpeed or FSDP shards (gathered by the trainer to save)."""
    return bool(getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))


def half_base(model) -> bool:
    """Whether `model`'s frozen weights (a LoRA adapter's base, `Precision.base`) are held in a half dtype."""
    import torch

    frozen = (p for p in model.parameters() if not p.requires_grad and p.is_floating_point())
    return lora_base_may_be_half() and any(p.dtype != torch.float32 for p in frozen)


def merged_lora(model, fresh=None):
    """`model` with its LoRA adapters merged into its weights (`merge_and_unload`; a model without them is
    returned as it is). When the frozen base is held in a half dtype (`half_base`) and `fresh` is given, the merge
    is not made into the rounded base: `fresh()` builds the model again in fp32 from the base's own files (on the
    CPU, LoRA-wrapped as `model` was, or wrapped here with `model`'s own peft config), takes `model`'s trained
    parameters (those with requires_grad: adapters, heads), and is merged in fp32. The weights are then exactly
    those the fp32 base of an fp32-held run gives, before any save cast."""
    import copy

    import torch

    if not hasattr(model, "merge_and_unload"):
        return model
    if fresh is None or not half_base(model):
        return model.merge_and_unload()
    trained = {n: p.detach().to("cpu", torch.float32) for n, p in model.named_parameters() if p.requires_grad}
    with torch.random.fork_rng(devices=[]):  # a fresh head's initialisation leaves the run's RNG as it was
        full = fresh()
    if not hasattr(full, "merge_and_unload") and hasattr(model, "peft_config"):
        from peft import get_peft_model

        full = get_peft_model(full, copy.deepcopy(model.peft_config[model.active_adapter]))
    params = dict(full.named_parameters())
    missing = sorted(set(trained) - set(params))
    if missing:
        raise RuntimeError(f"fp32 LoRA merge: the fp32 copy lacks the trained parameters {missing[:3]}")
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)
    return full.merge_and_unload()


def save_trained(
    trainer, model, tokenizer, path: Path, merge: bool, dtype: str = "float32", fresh=None
) -> None:
    """Write the trained model as a folder of safetensors with its tokenizer (left padding), atomically (a
    temporary folder renamed into place), its weights in `dtype` (the precision policy's save dtype). With
    `merge`, LoRA adapters are merged into the weights (in fp32 into `fresh()` when the base is held in a half
    dtype: merged_lora) and this process's copy is saved; otherwise sharded weights are gathered by the
    trainer, every process taking part (so every process calls this)."""
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if is_sharded(trainer) and not merge:
        trainer.save_model(str(tmp))
        if dist.is_main():
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the folder holds safetensors only
    elif dist.is_main():
        if merge:
            model = merged_lora(model, fresh)
        cast_keeping_fp32_heads(
            model, getattr(torch, dtype)
        )  # a PM's scalar head stays fp32 in any save dtype
        model.save_pretrained(str(tmp), safe_serialization=True)
    if dist.is_main():
        tokenizer.padding_side = "left"  # the loader's and the generation engine's convention
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    dist.barrier()
