"""Stage `preference_model`: train a scalar-head PM on the feedback pairs with TRL's RewardTrainer.

The loss is the CAI paper's soft-label cross-entropy on p_a (or Bradley–Terry on labels rounded at 0.5),
plus an optional reward-centring term: `PreferenceTrainer` only replaces RewardTrainer.compute_loss
(maths in cai.pm). Scores are read at each sequence's last real token (cai.pm.sequence_scores), the same
way PPO and evaluation read them. After training, the mean and std of the scores of a reference sample of
responses are stored in model/score_norm.json so PPO can normalise rewards.

Outputs (RUN/preference_model/): model/ (AutoModelForSequenceClassification, num_labels=1, tokenizer,
score_norm.json), metrics.jsonl, eval.json (held-out pair accuracy before/after), checkpoints/ (resume).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from cai import distributed as dist
from cai.errors import UserError
from cai.rundir import read_jsonl, write_json


def effective_config(recipe):
    """The recipe's preference_model block on top of its named spec (keys set in the recipe win); + the spec."""
    cfg = recipe.preference_model
    if not cfg.spec:
        return cfg, None
    from cai.reward_specs import load_pm_spec

    spec = load_pm_spec(cfg.spec)
    base = spec.overrides()
    explicit = {k: getattr(cfg, k) for k in cfg.model_fields_set if k != "spec"}
    merged = {
        **cfg.model_dump(),
        **base,
        **{k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in explicit.items()},
    }
    return type(cfg).model_validate(merged), spec


def split_pairs(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train/held-out split by prompt (all pairs of a prompt on one side), seeded."""
    prompts = sorted({r.get("prompt_id", r["id"]) for r in rows})
    random.Random(f"{seed}:pm-split").shuffle(prompts)
    n_eval = int(round(len(prompts) * eval_fraction))
    if eval_fraction > 0 and n_eval == 0 and len(prompts) > 1:
        n_eval = 1
    held = set(prompts[:n_eval])
    return [r for r in rows if r.get("prompt_id", r["id"]) not in held], [
        r for r in rows if r.get("prompt_id", r["id"]) in held
    ]


def tokenise_pairs(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    from cai.pm import conversation_ids

    out = []
    for r in rows:
        a = conversation_ids(
            tokenizer, r["messages"] + [{"role": "assistant", "content": r["response_a"]}], max_length
        )
        b = conversation_ids(
            tokenizer, r["messages"] + [{"role": "assistant", "content": r["response_b"]}], max_length
        )
        out.append({"chosen_ids": a, "rejected_ids": b, "p_a": float(r["p_a"])})
    return out


def make_trainer_class():
    """RewardTrainer with the soft-label / Bradley–Terry loss on p_a and last-real-token scores."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from cai.pm import pair_accuracy, preference_loss, sequence_scores

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call([{k: e[k] for k in ("chosen_ids", "rejected_ids")} for e in examples])
            out["p_a"] = torch.tensor([float(e["p_a"]) for e in examples], dtype=torch.float)
            return out

    class PreferenceTrainer(RewardTrainer):
        def __init__(self, *args, loss: str = "soft", center_coef: float = 0.0, **kwargs):
            self.pm_loss, self.pm_center = loss, center_coef
            super().__init__(*args, **kwargs)

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p_a"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
            r_a, r_b = torch.chunk(scores, 2)
            p_a = inputs["p_a"].to(r_a.device)
            loss = preference_loss(
                r_a, r_b, p_a, hard=self.pm_loss == "bradley_terry", center_coef=self.pm_center
            )
            with torch.no_grad():
                m = self._metrics[mode]
                # metrics over the global batch: every process's pairs (equal shapes: accelerate evens batches)
                r_a, r_b, p_a = self.accelerator.gather_for_metrics(
                    torch.stack([r_a.detach().float(), r_b.detach().float(), p_a.float()], 1)
                ).unbind(1)
                both = torch.cat([r_a, r_b])
                m["accuracy"].append(pair_accuracy(r_a, r_b, p_a))
                m["margin"].append(float(((r_a - r_b) * torch.sign(p_a - 0.5)).mean()))
                m["mean_reward"].append(float(both.mean()))
                if both.numel() > 1:
                    m["reward_std"].append(float(both.std()))
            return (loss, {"scores": scores}) if return_outputs else loss

    return PreferenceTrainer, SoftLabelCollator


def metrics_callback(log):
    from transformers import TrainerCallback

    class ToMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                clean = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and v == v}
                log.log({"epoch": state.epoch, **clean}, step=state.global_step)

    return ToMetrics()


def held_out_eval(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> dict:
    """Pair accuracy (against p_a > 0.5), mean margin and soft loss of a PM on pairs."""
    import torch

    from cai.pm import pair_accuracy, preference_loss, sequence_scores

    if not rows:
        return {"n": 0}
    toks = tokenise_pairs(tokenizer, rows, max_length)
    was = model.training
    model.eval()
    seqs = [t["chosen_ids"] for t in toks] + [t["rejected_ids"] for t in toks]
    scores = torch.zeros(len(seqs))
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s : s + batch_size]
            T = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, x in enumerate(chunk):
                ids[j, : len(x)] = torch.tensor(x)
                mask[j, : len(x)] = 1
            scores[s : s + len(chunk)] = sequence_scores(model, ids.to(device), mask.to(device)).float().cpu()
    model.train(was)
    n = len(toks)
    r_a, r_b = scores[:n], scores[n:]
    p_a = torch.tensor([t["p_a"] for t in toks])
    return {
        "n": n,
        "accuracy": pair_accuracy(r_a, r_b, p_a),
        "mean_margin": float(((r_a - r_b) * torch.sign(p_a - 0.5)).mean()),
        "soft_loss": float(preference_loss(r_a, r_b, p_a)),
        "scores": scores.tolist(),
    }


def run(ctx) -> Path:
    import torch
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import RewardConfig

    from cai.models import load_model, load_tokenizer, peft_config, resolve_device

    r = ctx.recipe
    cfg, spec = effective_config(r)
    if cfg.head != "classifier":
        raise UserError(
            "preference_model.head: only 'classifier' (AutoModelForSequenceClassification, num_labels=1) is "
            "implemented; a separate value head on a causal LM is not"
        )
    t0 = time.time()
    rows = [
        row for row in read_jsonl(ctx.input_dir("feedback") / "pairs.jsonl") if row.get("p_a") is not None
    ]
    if spec is not None and spec.human_data is not None:
        from cai.reward_specs import repo_path
        from cai.stages.feedback import human_pairs

        rows += human_pairs(repo_path(spec.human_data.path), spec.human_data.ratio, len(rows), r.seed)
    if len(rows) < 2:
        raise UserError(
            f"{ctx.input_dir('feedback') / 'pairs.jsonl'}: at least 2 labelled pairs are needed to train a PM"
        )
    train_rows, eval_rows = split_pairs(rows, cfg.eval_fraction, r.seed)

    ref = (spec.backbone if spec and spec.backbone else None) or r.models.reward_backbone or r.models.policy
    device = resolve_device(r.device)
    tok = load_tokenizer(ref, padding_side="right", trust_remote_code=r.trust_remote_code)
    torch.manual_seed(r.seed)  # the new score head's initialisation
    model = load_model(
        ref, kind="seq_cls", device=device, dtype=r.dtype, trust_remote_code=r.trust_remote_code
    )
    model.config.pad_token_id = tok.pad_token_id
    before = held_out_eval(model, tok, eval_rows, cfg.max_length, cfg.batch_size)

    ckpt_dir = ctx.out_dir / "checkpoints"
    args = RewardConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        bf16=device != "cpu" and str(model.dtype) == "torch.bfloat16",
        gradient_checkpointing=False,
        use_cpu=device == "cpu",
        report_to=[],
        seed=r.seed,
        max_length=None,  # sequences are left-truncated to cfg.max_length when tokenised
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not dist.is_main(),
    )
    Trainer, Collator = make_trainer_class()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(tokenise_pairs(tok, train_rows, cfg.max_length)),
        processing_class=tok,
        data_collator=Collator(pad_token_id=tok.pad_token_id),
        peft_config=peft_config(cfg.lora, task_type="SEQ_CLS") if cfg.lora else None,
        callbacks=[metrics_callback(ctx.metrics())],
        loss=cfg.loss,
        center_coef=cfg.center_coef,
    )
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last:
        print(f"[cai] preference_model: resuming from {last}", flush=True)
    trainer.train(resume_from_checkpoint=last)

    model = trainer.model
    if cfg.lora:
        model = model.merge_and_unload()
    after = held_out_eval(model, tok, eval_rows, cfg.max_length, cfg.batch_size)
    train_eval = held_out_eval(model, tok, train_rows[: cfg.norm_sample], cfg.max_length, cfg.batch_size)
    norm_scores = torch.tensor(train_eval["scores"][: cfg.norm_sample] or [0.0, 0.0])
    norm = {
        "mean": float(norm_scores.mean()),
        "std": float(norm_scores.std()) if norm_scores.numel() > 1 else 1.0,
        "n": int(norm_scores.numel()),
        "sample": "responses of training pairs",
    }
    out = ctx.out_dir / "model"
    sharded = not cfg.lora and (
        getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
    )
    if sharded:  # ZeRO-3 / FSDP shard the weights: the trainer gathers them, every rank taking part
        if dist.is_main():
            shutil.rmtree(out, ignore_errors=True)
        dist.barrier()
        trainer.save_model(str(out))
    if dist.is_main():
        if sharded:
            (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the folder holds safetensors only
        else:
            shutil.rmtree(out, ignore_errors=True)
            model.save_pretrained(str(out), safe_serialization=True)
        tok.padding_side = "left"
        tok.save_pretrained(str(out))
        write_json(out / "score_norm.json", norm)
        report = {
            "backbone": ref,
            "spec": cfg.spec,
            "loss": cfg.loss,
            "center_coef": cfg.center_coef,
            "lora": cfg.lora is not None,
            "train_pairs": len(train_rows),
            "held_out": {k: v for k, v in after.items() if k != "scores"},
            "held_out_before": {k: v for k, v in before.items() if k != "scores"},
            "train_sample": {k: v for k, v in train_eval.items() if k != "scores"},
            "score_norm": norm,
            "seconds": round(time.time() - t0, 1),
        }
        write_json(ctx.out_dir / "eval.json", report)
    dist.barrier()
    ctx.summary.update(
        train_pairs=len(train_rows),
        held_out_pairs=after.get("n", 0),
        held_out_accuracy=after.get("accuracy"),
        held_out_accuracy_before=before.get("accuracy"),
        score_mean=norm["mean"],
        score_std=norm["std"],
    )
    return ctx.out_dir
