"""Training a preference model on labelled pairs, the steps the preference_model stage takes and each online
round repeats (cai.rl.online): build the model (from its backbone, or from an earlier PM to train further), TRL's
RewardTrainer with cai's loss (cai.pm.trainer) resumed from its newest checkpoint, the held-out evaluation before
and after, the score normalisation PPO applies, and an atomic save."""

from __future__ import annotations

from pathlib import Path

from cai.pm.pairs import held_out_eval, tokenise_pairs
from cai.pm.scoring import scalar_head
from cai.runtime import distributed as dist
from cai.runtime.models import load_model, load_tokenizer, peft_config, wrap_lora
from cai.runtime.precision import Precision, fp32_head
from cai.runtime.rundir import write_json
from cai.runtime.training import (
    metrics_callback,
    resume_point,
    save_trained,
    token_callback,
    training_args,
)


def build_model(cfg, settings, init: str | None = None):
    """(PM to train, tokenizer): a sequence classifier with a new score head, or a causal LM with a value head
    (both initialised from the seed); LoRA on the LM of a value-head PM here, the classifier's through TRL. With
    `init` (a PM folder), its weights and head are the starting point instead of the backbone's."""
    import torch

    from cai.pm.value_head import ValueHeadPM

    src = init or cfg.backbone
    tok = load_tokenizer(src, settings, padding_side="right")
    trainable = Precision.of(settings).trainable(settings)  # fp32 master weights (cai.runtime.precision)
    if (
        cfg.head == "value_head"
    ):  # a causal LM + a seeded value head; LoRA on the LM, the head trained in full
        model = ValueHeadPM.from_pretrained(src, trainable, seed=settings.seed)
        if cfg.lora:
            model.lm = wrap_lora(model.lm, cfg.lora, task_type="CAUSAL_LM")
    else:
        torch.manual_seed(settings.seed)  # the new score head's initialisation
        model = load_model(src, trainable, kind="seq_cls", role="preference model backbone")
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


def score_norm(
    model, tok, cfg, rows: list[dict], sample: str = "responses of training pairs"
) -> tuple[dict, dict]:
    """(the normalisation PPO applies to rewards: mean and std of the scores of the first `norm_sample`
    responses of `rows`, the evaluation of those pairs)."""
    import torch

    train_eval = held_out_eval(model, tok, rows[: cfg.norm_sample], cfg.max_length, cfg.batch_size)
    scores = torch.tensor(train_eval["scores"][: cfg.norm_sample] or [0.0, 0.0])
    norm = {
        "mean": float(scores.mean()),
        "std": float(scores.std()) if scores.numel() > 1 else 1.0,
        "n": int(scores.numel()),
        "sample": sample,
    }
    return norm, train_eval


def fit_pm(
    cfg,
    settings,
    train_rows: list[dict],
    eval_rows: list[dict],
    out_dir: Path,
    metrics,
    run_token: str | None,
    *,
    init: str | None = None,
    norm_rows: list[dict] | None = None,
    what: str = "preference_model",
) -> dict:
    """Train a PM on `train_rows` (from `init`, a PM folder, when given), resuming from the newest checkpoint in
    out_dir/checkpoints; write out_dir/model with its score_norm.json (normalised on `norm_rows`, default the
    training pairs). Returns the held-out evaluation before and after, the training sample's and the norm."""
    model, tok = build_model(cfg, settings, init)
    before = held_out_eval(model, tok, eval_rows, cfg.max_length, cfg.batch_size)
    ckpt_dir = out_dir / "checkpoints"
    last = resume_point(ckpt_dir, metrics.path, what, run_token)
    callbacks = [metrics_callback(metrics), token_callback(run_token)]
    trainer = build_trainer(cfg, settings, model, tok, train_rows, ckpt_dir, callbacks)
    trainer.train(resume_from_checkpoint=last)

    model = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    after = held_out_eval(model, tok, eval_rows, cfg.max_length, cfg.batch_size)
    sample = "responses of training pairs" if norm_rows is None else "responses of the newest pairs"
    norm, train_eval = score_norm(model, tok, cfg, train_rows if norm_rows is None else norm_rows, sample)
    precision = Precision.of(settings)
    save_trained(trainer, model, tok, out_dir / "model", merge=bool(cfg.lora), dtype=precision.save)
    if dist.is_main():
        write_json(out_dir / "model" / "score_norm.json", norm)
    dist.barrier()
    return {
        "before": before,
        "after": after,
        "train_sample": train_eval,
        "norm": norm,
        "precision": precision,
    }
