"""SL-CAI supervised fine-tune: the helpful model learns the final revisions (and the helpful answers).

Each record of critique_revise/data.jsonl becomes a conversational prompt/completion pair:
prompt = the chat messages up to the last user turn, completion = one assistant turn with the final response.
TRL's `SFTTrainer` renders both with the chat template and puts the loss on the completion tokens only
(`completion_only_loss`), which works with any chat template, including ones without `{% generation %}` marks;
the completion includes the template's end-of-turn token, so the model learns to stop. The loss itself comes
from one packed forward per batch (`packed_loss`: no padding, the system prompt once, the LM head at the
completion's positions only), the same loss and gradients as TRL's, several times faster on a CPU.

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
from cai.runtime.forward import logit_entropy, selected_logprobs
from cai.runtime.models import load_model, load_tokenizer, peft_config
from cai.runtime.packing import keeps_logits, labelled_logits
from cai.runtime.rundir import read_json, read_jsonl, write_json
from cai.runtime.settings import Precision
from cai.runtime.training import (
    batch_rows,
    metrics_callback,
    resume_point,
    save_callback,
    save_trained,
    token_callback,
    train_from,
    training_args,
    with_training_layers,
)
from cai.stats import epoch_means

INPUTS = {"input_ids", "attention_mask", "labels"}  # what TRL's collator gives for padded text
REAL = "sft_real"  # the batch key packed_loss adds: which rows are real (not accelerate's repeats)
TOKENS_FILE = "cai_num_tokens.json"  # in each checkpoint: the tokens trained on so far (num_tokens)


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
    return with_training_layers(packed_loss(trainer))  # cai.runtime.forward.training_layers


def packed_loss(trainer):
    """`trainer` (TRL's SFTTrainer) with its loss taken from a packed forward (cai.runtime.packing.labelled_logits:
    no padding, the shared system prompt once, the LM head at the completion's positions only), and the same
    metrics (entropy, mean_token_accuracy, num_tokens). TRL's own loss, on a CPU, scores every padded position in
    vocabulary tiles with its entropy and their gradients: about half of a step's time on SmolLM2-135M
    (docs/benchmarks.md). Same loss and gradients (tests/test_sft.py). Anything else (another loss type, label
    smoothing, a custom loss, MoE auxiliary losses, padding-free or multimodal inputs, a model without
    `logits_to_keep`, a call for outputs) takes TRL's loss.

    A step's loss is the mean over its global batch's completion tokens however the batch is split into
    micro-batches and processes (as cai.pm.trainer does for pairs): the rows accelerate repeats to even out an
    epoch's last batches under DDP (cai.runtime.training.batch_rows) lose their labels as the step's batches are
    drawn, so they are out of the loss, its token count (num_items_in_batch) and the metrics; num_tokens counts
    the real rows only; entropy and mean_token_accuracy are pooled over every real token since the last log."""
    import torch

    own, own_batches = trainer.compute_loss, trainer.get_batch_samples
    args, acc = trainer.args, trainer.accelerator
    plain = (
        args.loss_type == "nll"
        and trainer.label_smoother is None
        and trainer.compute_loss_func is None
        and not trainer.aux_loss_enabled
    )
    pooled = {"train": [0.0, 0.0, 0.0], "eval": [0.0, 0.0, 0.0]}  # tokens, entropy sum, right guesses

    def get_batch_samples(epoch_iterator, num_batches, device):
        return own_batches(marked(trainer, epoch_iterator), num_batches, device)

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        real = inputs.pop(REAL, None)
        mode = "train" if trainer.model.training else "eval"
        before = trainer._total_train_tokens
        if not plain or return_outputs or set(inputs) != INPUTS or not keeps_logits(model):
            out = own(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        else:
            out = loss_and_metrics(model, inputs, num_items_in_batch, mode)
        if mode == "train" and "attention_mask" in inputs:  # every process's real rows' tokens
            mask = inputs["attention_mask"]
            if real is not None:
                mask = mask[real.to(mask.device)]
            tokens = int(acc.gather(mask.sum()[None]).sum())
            trainer._total_train_tokens = before + tokens // trainer._tp_size
            trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]
        return out

    def loss_and_metrics(model, inputs, num_items_in_batch, mode):
        logits, targets, _ = labelled_logits(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        )
        logp = selected_logprobs(logits, targets)
        n = targets.new_tensor(targets.numel())
        loss = -logp.sum() / torch.as_tensor(n if num_items_in_batch is None else num_items_in_batch).clamp(
            min=1
        )
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (acc.num_processes // trainer.get_tp_size())  # as TRL: DDP averages over processes
        with torch.no_grad():  # the metrics over every process's tokens, pooled since the last log
            entropy, top = logit_entropy(logits), logits.argmax(-1) == targets
            stats = torch.stack([n.float(), entropy.sum(), top.sum().float()])[None]
            m, sums = trainer._metrics[mode], pooled[mode]
            if "entropy" not in m:  # TRL's log cleared the metrics: a new logging interval
                sums[:] = [0.0, 0.0, 0.0]
            sums[:] = [a + float(b) for a, b in zip(sums, acc.gather(stats).sum(0))]
            valid, ent, right = sums
            m["entropy"] = [ent / valid if valid > 0 else 0.0]
            m["mean_token_accuracy"] = [right / valid if valid > 0 else 0.0]
            m["num_tokens"] = [trainer._total_train_tokens]
        return loss

    trainer.compute_loss = compute_loss
    trainer.get_batch_samples = get_batch_samples
    return trainer


def marked(trainer, epoch_iterator):
    """The batches of `epoch_iterator`, each marked with its real rows (REAL); the rows accelerate repeats to even
    out an epoch's last batches over the processes (cai.runtime.training.batch_rows) lose their labels."""
    for batch in epoch_iterator:  # drawn one at a time: the state is that of this batch
        real = batch_rows(trainer, len(batch["input_ids"]))
        if "labels" in batch and not bool(real.all()):
            batch["labels"] = batch["labels"].masked_fill(~real.to(batch["labels"].device)[:, None], -100)
        batch[REAL] = real
        yield batch


def count_tokens(trainer, resumed: str | None) -> None:
    """Keep `num_tokens` counting across a resume: each checkpoint stores the count (TOKENS_FILE), and a resumed
    run starts from its checkpoint's (TRL starts every trainer at 0)."""
    if resumed:
        saved = read_json(Path(resumed) / TOKENS_FILE) or {}
        trainer._total_train_tokens = int(saved.get("num_tokens", 0))
    trainer.add_callback(
        save_callback(
            lambda folder: write_json(folder / TOKENS_FILE, {"num_tokens": trainer._total_train_tokens})
        )
    )


def run(ctx) -> Path:
    c, out = ctx.config, ctx.out_dir
    cfg = c.sft
    data_path = ctx.input_dir("critique_revise") / "data.jsonl"
    examples = sft_examples(read_jsonl(data_path), cfg.include_helpful)
    if not examples:
        raise UserError(f"{data_path}: no usable records to fine-tune on (critique_revise kept none)")
    precision = Precision.of(c.settings)
    model = load_model(c.models.policy, precision.base(c.settings, cfg.lora))  # a LoRA base: compute dtype
    tok = load_tokenizer(c.models.policy, c.settings, padding_side="right")
    ckpt_dir, metrics = out / "checkpoints", ctx.metrics()
    last = resume_point(ckpt_dir, metrics.path, "sft", ctx.run_token)
    callbacks = [metrics_callback(metrics), token_callback(ctx.run_token)]
    trainer = build_trainer(cfg, c.settings, model, tok, examples, ckpt_dir, callbacks)
    count_tokens(trainer, last)
    result = train_from(trainer, last)
    merge = bool(cfg.lora) and cfg.merge_lora
    fp32 = c.settings.with_(dtype="float32", device="cpu")  # the base to merge a LoRA adapter into, in fp32
    save_trained(
        trainer,
        trainer.model,
        tok,
        out / "model",
        merge=merge,
        dtype=precision.save,
        fresh=lambda: load_model(c.models.policy, fp32),
    )
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
        train_seconds=round(float((result.metrics if result else {}).get("train_runtime", 0.0)), 1),
        precision=precision.record(),
    )
    return out
