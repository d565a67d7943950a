"""SL-CAI supervised fine-tune: the helpful model learns the final revisions (and the helpful answers).

Each record of critique_revise/data.jsonl becomes a conversational prompt/completion pair:
prompt = the chat messages up to the last user turn, completion = one assistant turn with the final response.
TRL's `SFTTrainer` renders both with the chat template and puts the loss on the completion tokens only
(`completion_only_loss`), which works with any chat template, including ones without `{% generation %}` marks;
the completion includes the template's end-of-turn token, so the model learns to stop.

Full fine-tune or LoRA (`sft.lora`); LoRA adapters are merged into the saved model unless `merge_lora` is off.
Checkpoints go to checkpoints/ (the latest two are kept) and a rerun resumes from the last one; they are
removed once model/ is written. Outputs: model/ (HF causal-LM folder with tokenizer), metrics.jsonl, loss.png.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cai import distributed as dist
from cai.errors import UserError
from cai.reporting import epoch_means
from cai.rundir import append_jsonl, read_jsonl

LOGGED = ("loss", "learning_rate", "grad_norm", "epoch", "mean_token_accuracy", "entropy", "num_tokens")


def sft_examples(records: list[dict], include_helpful: bool = True) -> list[dict]:
    """critique_revise records → conversational prompt/completion examples for SFTTrainer."""
    out = []
    for r in records:
        if r.get("kind") == "helpful" and not include_helpful:
            continue
        if not r.get("final", "").strip():
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in r["prompt"]]
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": r["final"]}]})
    return out


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep metrics rows up to `last_step` (a resumed run logs the later steps again)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    if path.exists():
        path.unlink()
    append_jsonl(path, rows)


def _callback(metrics_log):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """One metrics.jsonl row per logging step: loss, learning_rate, grad_norm, epoch (+ TRL's extras); the
        run's tracker, if any, gets the same values through the MetricsLog."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            metrics_log.log({k: float(logs[k]) for k in LOGGED if k in logs}, step=state.global_step)

    return MetricsCallback()


def run(ctx) -> Path:
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from cai.models import load_model, load_tokenizer, resolve_device
    from cai.plots import line_chart

    recipe, cfg, out = ctx.recipe, ctx.recipe.sft, ctx.out_dir
    data_path = ctx.input_dir("critique_revise") / "data.jsonl"
    examples = sft_examples(read_jsonl(data_path), cfg.include_helpful)
    if not examples:
        raise UserError(f"{data_path}: no usable records to fine-tune on (critique_revise kept none)")

    device = resolve_device(recipe.device)
    on_cpu = device == "cpu"
    # fp32 weights; on a GPU with bf16 support, bf16 autocast (mixed precision). On CPU bf16 is much slower.
    bf16 = not on_cpu and torch.cuda.is_bf16_supported()
    model = load_model(
        recipe.models.policy, device=device, dtype="float32", trust_remote_code=recipe.trust_remote_code
    )
    tok = load_tokenizer(
        recipe.models.policy, padding_side="right", trust_remote_code=recipe.trust_remote_code
    )

    ckpt_dir = out / "checkpoints"
    metrics_path = ctx.metrics().path
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if dist.is_main():
        if last:
            trim_metrics(metrics_path, int(Path(last).name.split("-")[-1]))
            print(f"[sft] resuming from {last}", flush=True)
        elif metrics_path.exists():
            metrics_path.unlink()

    trainer = build_trainer(
        recipe, model, tok, examples, ckpt_dir, bf16=bf16, on_cpu=on_cpu, callbacks=[_callback(ctx.metrics())]
    )
    result = trainer.train(resume_from_checkpoint=last)

    merge = bool(cfg.lora) and cfg.merge_lora
    if (
        getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
    ) and not merge:
        # ZeRO-3 / FSDP shard the weights: the trainer gathers them (every rank takes part); one-process ZeRO-2/3
        # runs are tested on CPU (tests/test_distributed.py), multi-process ones need GPUs.
        tmp = out / "model.tmp"
        trainer.save_model(str(tmp))
        if trainer.is_world_process_zero():
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the folder holds safetensors only
            tok.padding_side = "left"
            tok.save_pretrained(str(tmp))
            shutil.rmtree(out / "model", ignore_errors=True)
            tmp.rename(out / "model")
    elif trainer.is_world_process_zero():
        save_model(trainer.model, tok, out / "model", merge=merge)
    if trainer.is_world_process_zero():
        rows = read_jsonl(metrics_path)
        if rows:
            line_chart(
                out / "loss.png",
                {"train loss": ([r["step"] for r in rows], [r["loss"] for r in rows])},
                title="SL-CAI fine-tune",
                xlabel="step",
                ylabel="loss",
                smooth=5 if len(rows) > 20 else 1,
            )
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dist.barrier()
    rows = [r for r in read_jsonl(metrics_path) if "loss" in r]
    per_epoch = epoch_means(rows)
    ctx.summary.update(
        examples=len(examples),
        steps=int(trainer.state.global_step),
        lora=bool(cfg.lora),
        loss_first_epoch=round(per_epoch[0], 4) if per_epoch else None,  # mean over the epoch's steps
        loss_last_epoch=round(per_epoch[-1], 4) if per_epoch else None,
        loss_first=rows[0]["loss"] if rows else None,
        loss_last=rows[-1]["loss"] if rows else None,
        train_seconds=round(float(result.metrics.get("train_runtime", 0.0)), 1),
    )
    return out


def build_trainer(
    recipe,
    model,
    tok,
    examples: list[dict],
    ckpt_dir: Path,
    *,
    bf16: bool = False,
    on_cpu: bool = True,
    callbacks=None,
):
    """TRL SFTTrainer on conversational prompt/completion examples; loss on the completion tokens only."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from cai.models import peft_config

    cfg = recipe.sft
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_length,
        completion_only_loss=True,
        assistant_only_loss=False,
        packing=False,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=bf16,
        fp16=False,
        activation_checkpointing=False,  # (TRL defaults gradient_checkpointing on: ~12x slower on CPU, not needed)
        use_cpu=dist.accelerator_cpu("cpu" if on_cpu else "cuda"),
        report_to="none",  # the pipeline's tracker gets metrics.jsonl through ctx.metrics()
        dataloader_num_workers=0,
        disable_tqdm=not dist.is_main(),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(examples),
        processing_class=tok,
        peft_config=peft_config(cfg.lora) if cfg.lora else None,
        callbacks=callbacks,
    )
    return trainer


def save_model(model, tokenizer, path: Path, merge: bool) -> None:
    """Write an HF causal-LM folder (safetensors + tokenizer) atomically: a temp folder renamed into place.

    A LoRA model is merged into its base first when `merge` is set; otherwise the adapter is saved as is.
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.padding_side = "left"  # the loader's and the generation engine's convention
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
