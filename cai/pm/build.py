"""Building a preference model, the one way every PM is made (the preference_model and gold stages, each online
round of the policy stage, and the untrained baseline of an evaluation): a fresh model from a backbone with a
seeded head (or an earlier PM to train further), TRL's RewardTrainer with cai's loss around it, training with
resume, the reward normalisation PPO applies, and the origin record that lets an evaluation rebuild the untrained
model the PM started from.

`pm_origin.json` beside the weights holds the backbone reference, the head and the seed; with it,
`untrained_scorer` gives the backbone with the same freshly initialised head (what training added is the lift
over it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cai.errors import UserError
from cai.pm.pairs import held_out_eval, split_record, tokenise_pairs
from cai.pm.scoring import NORM_FILE, RewardScorer, scalar_head
from cai.runtime import distributed as dist
from cai.runtime.models import load_model, load_tokenizer, peft_config, resolve, wrap_lora
from cai.runtime.rundir import write_json
from cai.runtime.settings import Precision, cast_keeping_fp32_heads, fp32_head
from cai.runtime.training import (
    is_sharded,
    merged_lora,
    metrics_callback,
    resume_point,
    save_trained,
    token_callback,
    train_from,
    training_args,
    with_training_layers,
)
from cai.stats import mean_std
from cai.yamlio import load_json

ORIGIN_FILE = "pm_origin.json"
SPLIT_FILE = "pm_split.json"  # the prompt ids a PM trained on and held out (cai.pm.pairs.split_record)


def fresh_pm(
    backbone: str,
    head: str,
    settings,
    lora=None,
    role: str = "preference model backbone",
    init: str | None = None,
):
    """(PM to train, tokenizer): a sequence classifier with a new score head, or a causal LM with a value head
    (both initialised from the seed), with fp32 master weights (a LoRA adapter's frozen base in the compute
    dtype: Precision.base) and an fp32 head (cai.runtime.settings); LoRA
    on the LM of a value-head PM here, the classifier's through TRL. With `init` (a PM folder), its weights and
    head are the starting point instead of the backbone's."""
    import torch

    from cai.pm.value_head import ValueHeadPM

    backbone = init or backbone
    tok = load_tokenizer(backbone, settings, padding_side="right")
    trainable = Precision.of(settings).base(settings, lora)  # a LoRA base in the compute dtype
    if (
        head == "value_head"
    ):  # causal LM + value head (seeded); LoRA on the LM, the value head trained in full
        model = ValueHeadPM.from_pretrained(backbone, trainable, seed=settings.seed)
        if lora:
            model.lm = wrap_lora(model.lm, lora, task_type="CAUSAL_LM")
    else:
        torch.manual_seed(settings.seed)  # the new score head's initialisation
        model = load_model(backbone, trainable, kind="seq_cls", role=role)
        fp32_head(scalar_head(model))  # scores in fp32 under autocast
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def build_trainer(
    cfg,
    settings,
    model,
    tok,
    train_rows,
    ckpt_dir: Path,
    callbacks,
    *,
    loss: str,
    center_coef=0.0,
    lm_coef=0.0,
):
    """TRL's RewardTrainer with cai's loss (cai.pm.trainer) on the tokenised training pairs; `cfg` is a
    training block with `head`, `lora` and `max_length` (cai.config.recipe.TrainConfig)."""
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
            lm_coef == 0 and not model.config.get_text_config().tie_word_embeddings if value_head else None
        ),
    )
    trainer = PreferenceTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(
            tokenise_pairs(tok, train_rows, cfg.max_length, response_len=value_head)
        ),
        processing_class=tok,
        data_collator=SoftLabelCollator(pad_token_id=tok.pad_token_id),
        peft_config=peft_config(cfg.lora, task_type="SEQ_CLS") if cfg.lora and not value_head else None,
        callbacks=callbacks,
        loss=loss,
        center_coef=center_coef,
        lm_coef=lm_coef,
    )
    return with_training_layers(trainer)  # cai.runtime.forward.training_layers


def fit(
    cfg,
    settings,
    model,
    tok,
    train_rows,
    out_dir: Path,
    metrics,
    what: str,
    run_token=None,
    init=None,
    **loss,
):
    """Train `model` (fresh_pm's, from `init` when given) on the pairs, resuming from out_dir/checkpoints (only
    from a checkpoint of this run: `run_token`); (trained model, LoRA merged, in fp32 into an fp32 copy of the
    backbone when the base was held in bf16/fp16: merged_lora; trainer)."""
    ckpt_dir = out_dir / "checkpoints"
    last = resume_point(ckpt_dir, metrics.path, what, run_token)
    callbacks = [metrics_callback(metrics), token_callback(run_token)]
    trainer = build_trainer(cfg, settings, model, tok, train_rows, ckpt_dir, callbacks, **loss)
    train_from(trainer, last)
    fp32 = settings.with_(dtype="float32", device="cpu")
    role = "preference model backbone, an fp32 copy to merge LoRA into"

    def fresh():
        return fresh_pm(cfg.backbone, cfg.head, fp32, cfg.lora, role=role, init=init)[0]

    trained = merged_lora(trainer.model, fresh) if cfg.lora else trainer.model
    return trained, trainer


def drop_checkpoints(out_dir: Path) -> None:
    """Remove out_dir/checkpoints once the trained PM and its records are written: they served a resume only,
    and hold the weights and optimizer state twice over (gigabytes for a full fine-tune)."""
    if dist.is_main():
        shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)
    dist.barrier()


def responses_of(rows: list[dict]) -> list[dict]:
    """Both responses of every AI-written pair (human pairs left out), as reference responses for score_norm."""
    return [
        {"messages": r["messages"], "text": r[f"response_{s}"], "policy": None}
        for r in rows
        if r.get("source") != "human"
        for s in "ab"
    ]


def score_norm(model, tok, held: list[dict], record: dict, batch_size: int) -> dict:
    """Mean and std of the trained PM's scores of the reference responses, scored as PPO scores them: the score at
    the last token of the whole conversation, untruncated (cai.pm.scoring). Every process takes part (a sharded
    model's forward is collective)."""
    scorer, was = RewardScorer.wrap(model, tok, "trained PM"), model.training
    convs = [h["messages"] + [{"role": "assistant", "content": h["text"]}] for h in held]
    model.eval()  # no dropout, as PPO's reward
    scores = scorer.score(convs, batch_size=batch_size).tolist() if convs else []
    model.train(was)
    mean, std = mean_std(scores)
    return {"mean": mean, "std": std, **record}


def measure_saved(trainer, model, tok, out: Path, settings, save, measure):
    """`save()` the trained PM, and return `measure(scorer)` of it as PPO's reward will load it: the saved folder
    reloaded (the recipe's dtype, its fp32 head, no training autocast). Under DeepSpeed or FSDP, whose loads
    partition a model that then needs an engine to run, the trainer's own copy is measured, before the save."""
    if is_sharded(trainer):
        result = measure(RewardScorer.wrap(model.eval(), tok, "trained PM"))
        save()
        return result
    save()
    return measure(RewardScorer(out, settings))


def train_pm(
    cfg,
    settings,
    train_rows: list[dict],
    eval_rows: list[dict],
    out_dir: Path,
    metrics,
    what: str,
    run_token: str | None,
    norm_from: tuple[list[dict], dict],
    init: str | None = None,
) -> dict:
    """Train a PM (`cfg`: a preference_model block) on `train_rows`, from `init` (a PM folder) when given,
    resuming from out_dir/checkpoints; write out_dir/model with pm_origin.json and score_norm.json (the scores of
    the reference responses `norm_from` = (responses, record of where they came from)). Returns the held-out
    evaluation before and after, the training sample's, the norm and the precision. What comes after training
    is measured on the saved PM reloaded as PPO's reward loads it, so score_norm.json normalises the scores PPO
    sees; the trainer's in-memory copy ran under training's autocast, or in fp32 for a merged LoRA."""
    model, tok = fresh_pm(cfg.backbone, cfg.head, settings, cfg.lora, init=init)
    before = held_out_eval(model, tok, eval_rows, cfg.max_length, cfg.batch_size)
    loss = {"loss": cfg.loss, "center_coef": cfg.center_coef, "lm_coef": cfg.lm_coef}
    model, trainer = fit(
        cfg, settings, model, tok, train_rows, out_dir, metrics, what, run_token, init, **loss
    )
    out, precision = Path(out_dir) / "model", Precision.of(settings)

    def measure(pm):
        return (
            held_out_eval(pm.model, pm.tokenizer, eval_rows, cfg.max_length, cfg.batch_size),
            held_out_eval(
                pm.model, pm.tokenizer, train_rows[: cfg.norm_sample], cfg.max_length, cfg.batch_size
            ),
            score_norm(pm.model, pm.tokenizer, *norm_from, cfg.batch_size),
        )

    def save():
        save_trained(trainer, model, tok, out, merge=bool(cfg.lora), dtype=precision.save)

    after, train_eval, norm = measure_saved(trainer, model, tok, out, settings, save, measure)
    if dist.is_main():
        write_origin(out, cfg.backbone, cfg.head, settings.seed)
        write_json(out / NORM_FILE, norm)
        write_json(out / SPLIT_FILE, split_record(train_rows, eval_rows))
    dist.barrier()
    drop_checkpoints(out_dir)
    return {
        "before": before,
        "after": after,
        "train_sample": train_eval,
        "norm": norm,
        "precision": precision,
    }


def write_origin(model_dir: Path, backbone: str, head: str, seed: int) -> None:
    """Record what the PM in `model_dir` was trained from; a backbone folder is stored as an absolute path."""
    r = resolve(backbone)
    ref = str(Path(r.path).resolve()) if r.kind == "dir" and Path(backbone).exists() else backbone
    write_json(Path(model_dir) / ORIGIN_FILE, {"backbone": ref, "head": head, "seed": seed})


def read_origin(model_dir) -> dict | None:
    """The origin record of a PM folder (or of a preference_model stage folder), or None when it has none. A
    record that is there but unreadable, not JSON, or without a backbone reference is a one-line UserError
    naming the file (and the line, for bad JSON): silently dropping the untrained baseline would hide it."""
    d = Path(model_dir)
    for p in (d / ORIGIN_FILE, d / "model" / ORIGIN_FILE):
        if p.is_file():
            data = load_json(p, "PM origin record")
            if not isinstance(data, dict):
                raise UserError(f"{p}: a JSON object (backbone, head, seed) is expected")
            if not isinstance(data.get("backbone"), str):
                raise UserError(
                    f"{p}: key 'backbone': a model reference (text) is expected, not {data.get('backbone')!r}"
                )
            return data
    return None


def untrained_scorer(backbone: str, head: str, settings) -> RewardScorer:
    """The backbone with a freshly initialised head from `settings.seed`, as a RewardScorer (no normalisation),
    held as a trained PM is loaded for scoring: the trunk in the recipe's dtype, the scalar head in fp32."""
    import torch

    model, tok = fresh_pm(backbone, head, settings, role="untrained baseline")
    dtype = settings.torch_dtype(str(next(model.parameters()).device))
    if dtype != torch.float32:
        cast_keeping_fp32_heads(model, dtype)  # the head keeps its fp32 values as initialised
    return RewardScorer.wrap(model.eval(), tok, f"untrained {backbone}")
