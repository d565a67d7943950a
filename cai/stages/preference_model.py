"""Stage `preference_model`: train a scalar-head PM on the feedback pairs with TRL's RewardTrainer.

The loss is the CAI paper's soft-label cross-entropy on p_a (or Bradley–Terry on labels rounded at 0.5),
plus an optional reward-centring term: `PreferenceTrainer` only replaces RewardTrainer.compute_loss
(maths in cai.pm.loss). Scores are read at each sequence's last real token (cai.pm.scoring), the same
way PPO and evaluation read them. After training, the mean and std of the scores of a reference sample of
responses are stored in model/score_norm.json so PPO can normalise rewards.

`preference_model.head` picks the backbone: 'classifier' (AutoModelForSequenceClassification, num_labels=1)
or 'value_head' (a causal LM that keeps its LM head, with a scalar head on its trunk: cai.pm.value_head), which
can add a language-modelling loss on the preferred responses (`lm_coef`). With LoRA, the classifier's score
head and the value head are trained in full.

Outputs (RUN/preference_model/): model/ (the PM folder with its tokenizer and score_norm.json), metrics.jsonl,
eval.json (held-out pair accuracy before/after; for a value-head PM also the LM loss on the preferred responses),
checkpoints/ (resume). `preference_model.spec` names a spec whose keys this block's own keys override
(cai.config.pm_spec); the stage reads the merged block.
"""

from __future__ import annotations

import time
from pathlib import Path

from cai.data.hh import human_pairs
from cai.errors import UserError
from cai.pm.pairs import held_out_eval, split_pairs, tokenise_pairs
from cai.pm.scoring import scalar_head
from cai.runtime import distributed as dist
from cai.runtime.models import load_model, load_tokenizer, peft_config, wrap_lora
from cai.runtime.precision import Precision, fp32_head
from cai.runtime.rundir import read_jsonl, write_json
from cai.runtime.training import (
    metrics_callback,
    resume_point,
    save_trained,
    token_callback,
    training_args,
)


def load_pairs(ctx, cfg, seed: int) -> list[dict]:
    """The labelled feedback pairs, plus the human pairs of `preference_model.human_data` when set."""
    path = ctx.input_dir("feedback") / "pairs.jsonl"
    rows = [row for row in read_jsonl(path) if row.get("p_a") is not None]
    if cfg.human_data is not None:
        rows += human_pairs(cfg.human_data.path, cfg.human_data.ratio, len(rows), seed)
    if len(rows) < 2:
        raise UserError(f"{path}: at least 2 labelled pairs are needed to train a PM")
    return rows


def build_model(cfg, settings):
    """(PM to train, tokenizer): a sequence classifier with a new score head, or a causal LM with a value head
    (both initialised from the seed); LoRA on the LM of a value-head PM here, the classifier's through TRL."""
    import torch

    from cai.pm.value_head import ValueHeadPM

    tok = load_tokenizer(cfg.backbone, settings, padding_side="right")
    trainable = Precision.of(settings).trainable(settings)  # fp32 master weights (cai.runtime.precision)
    if (
        cfg.head == "value_head"
    ):  # a causal LM + a seeded value head; LoRA on the LM, the head trained in full
        model = ValueHeadPM.from_pretrained(cfg.backbone, trainable, seed=settings.seed)
        if cfg.lora:
            model.lm = wrap_lora(model.lm, cfg.lora, task_type="CAUSAL_LM")
    else:
        torch.manual_seed(settings.seed)  # the new score head's initialisation
        model = load_model(cfg.backbone, trainable, kind="seq_cls", role="preference model backbone")
        fp32_head(scalar_head(model))  # scores in fp32 under autocast
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def build_trainer(cfg, settings, model, tok, train_rows: list[dict], ckpt_dir: Path, callbacks):
    """TRL's RewardTrainer with cai's loss (cai.pm.trainer) on the tokenised training pairs."""
    from datasets import Dataset
    from trl import RewardConfig

    from cai.pm.trainer import PreferenceTrainer, SoftLabelCollator

    value_head = cfg.head == "value_head"
    device = settings.torch_device()
    args = training_args(
        RewardConfig,
        cfg,
        ckpt_dir,
        settings.seed,
        device,
        Precision.of(settings, device),
        max_length=None,  # sequences are left-truncated to cfg.max_length when tokenised
        remove_unused_columns=False,
        # a value-head PM leaves only an untied LM head unused, and only without the LM loss
        ddp_find_unused_parameters=(
            cfg.lm_coef == 0 and not model.config.get_text_config().tie_word_embeddings
            if value_head
            else None
        ),
    )
    return PreferenceTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(
            tokenise_pairs(tok, train_rows, cfg.max_length, response_len=value_head)
        ),
        processing_class=tok,
        data_collator=SoftLabelCollator(pad_token_id=tok.pad_token_id),
        peft_config=peft_config(cfg.lora, task_type="SEQ_CLS") if cfg.lora and not value_head else None,
        callbacks=callbacks,
        loss=cfg.loss,
        center_coef=cfg.center_coef,
        lm_coef=cfg.lm_coef,
    )


def score_norm(model, tok, cfg, train_rows: list[dict]) -> tuple[dict, dict]:
    """(the normalisation PPO applies to rewards: mean and std of the scores of the first `norm_sample`
    responses of training pairs, the evaluation of those pairs)."""
    import torch

    train_eval = held_out_eval(model, tok, train_rows[: cfg.norm_sample], cfg.max_length, cfg.batch_size)
    scores = torch.tensor(train_eval["scores"][: cfg.norm_sample] or [0.0, 0.0])
    norm = {
        "mean": float(scores.mean()),
        "std": float(scores.std()) if scores.numel() > 1 else 1.0,
        "n": int(scores.numel()),
        "sample": "responses of training pairs",
    }
    return norm, train_eval


def run(ctx) -> Path:
    cfg, settings = ctx.config.preference_model, ctx.config.settings
    t0 = time.time()
    rows = load_pairs(ctx, cfg, settings.seed)
    train_rows, eval_rows = split_pairs(rows, cfg.eval_fraction, settings.seed)
    model, tok = build_model(cfg, settings)
    before = held_out_eval(model, tok, eval_rows, cfg.max_length, cfg.batch_size)
    ckpt_dir, metrics = ctx.out_dir / "checkpoints", ctx.metrics()
    last = resume_point(ckpt_dir, metrics.path, "preference_model", ctx.run_token)
    callbacks = [metrics_callback(metrics), token_callback(ctx.run_token)]
    trainer = build_trainer(cfg, settings, model, tok, train_rows, ckpt_dir, callbacks)
    trainer.train(resume_from_checkpoint=last)

    model = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    after = held_out_eval(model, tok, eval_rows, cfg.max_length, cfg.batch_size)
    norm, train_eval = score_norm(model, tok, cfg, train_rows)
    out = ctx.out_dir / "model"
    precision = Precision.of(settings)
    save_trained(trainer, model, tok, out, merge=bool(cfg.lora), dtype=precision.save)
    if dist.is_main():
        write_json(out / "score_norm.json", norm)
        report = {
            "backbone": cfg.backbone,
            "spec": cfg.spec,
            "head": cfg.head,
            "loss": cfg.loss,
            "center_coef": cfg.center_coef,
            "lm_coef": cfg.lm_coef,
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
        precision=precision.record(),
    )
    return ctx.out_dir
