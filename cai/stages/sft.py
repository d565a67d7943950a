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

from cai.errors import UserError
from cai.plots import line_chart
from cai.runtime import distributed as dist
from cai.runtime.models import load_model, load_tokenizer, peft_config
from cai.runtime.rundir import read_jsonl
from cai.runtime.settings import Precision
from cai.runtime.training import (
    fuse_lora_training,
    metrics_callback,
    resume_point,
    save_trained,
    token_callback,
    training_args,
)
from cai.stats import epoch_means


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


def build_trainer(cfg, settings, model, tok, examples: list[dict], ckpt_dir: Path, callbacks=None):
    """TRL SFTTrainer on conversational prompt/completion examples; loss on the completion tokens only. fp32
    weights, autocast to the recipe's dtype (cai.runtime.settings; on a CPU bf16 is slow: fp32 by default)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    device = settings.torch_device()
    args = training_args(
        SFTConfig,
        cfg,
        ckpt_dir,
        settings.seed,
        device,
        Precision.of(settings, device),
        max_length=cfg.max_length,
        completion_only_loss=True,
        assistant_only_loss=False,
        packing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(examples),
        processing_class=tok,
        peft_config=peft_config(cfg.lora) if cfg.lora else None,
        callbacks=callbacks,
    )
    return fuse_lora_training(trainer)  # LoRA layers train in fewer passes over memory


def run(ctx) -> Path:
    c, out = ctx.config, ctx.out_dir
    cfg = c.sft
    data_path = ctx.input_dir("critique_revise") / "data.jsonl"
    examples = sft_examples(read_jsonl(data_path), cfg.include_helpful)
    if not examples:
        raise UserError(f"{data_path}: no usable records to fine-tune on (critique_revise kept none)")
    precision = Precision.of(c.settings)
    model = load_model(c.models.policy, precision.trainable(c.settings))
    tok = load_tokenizer(c.models.policy, c.settings, padding_side="right")
    ckpt_dir, metrics = out / "checkpoints", ctx.metrics()
    last = resume_point(ckpt_dir, metrics.path, "sft", ctx.run_token)
    callbacks = [metrics_callback(metrics), token_callback(ctx.run_token)]
    trainer = build_trainer(cfg, c.settings, model, tok, examples, ckpt_dir, callbacks)
    result = trainer.train(resume_from_checkpoint=last)
    merge = bool(cfg.lora) and cfg.merge_lora
    save_trained(trainer, trainer.model, tok, out / "model", merge=merge, dtype=precision.save)
    rows = [r for r in read_jsonl(metrics.path) if "loss" in r]
    if trainer.is_world_process_zero():
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
        precision=precision.record(),
    )
    return out
