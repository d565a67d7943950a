"""Stage `preference_model`: train a scalar-head PM on the feedback pairs with TRL's RewardTrainer.

The loss is the CAI paper's soft-label cross-entropy on p_a (or Bradley–Terry on labels rounded at 0.5),
plus an optional reward-centring term: `PreferenceTrainer` only replaces RewardTrainer.compute_loss
(maths in cai.pm). Scores are read at each sequence's last real token (cai.pm.sequence_scores), the same
way PPO and evaluation read them. After training, the mean and std of the scores of a reference sample of
responses are stored in model/score_norm.json so PPO can normalise rewards.

`preference_model.head` picks the backbone: 'classifier' (AutoModelForSequenceClassification, num_labels=1)
or 'value_head' (a causal LM that keeps its LM head, with a scalar head on its trunk: cai.pm_value_head), which
can add a language-modelling loss on the preferred responses (`lm_coef`). With LoRA, the classifier's score
head and the value head are trained in full.

Outputs (RUN/preference_model/): model/ (the PM folder with its tokenizer and score_norm.json), metrics.jsonl,
eval.json (held-out pair accuracy before/after; for a value-head PM also the LM loss on the preferred responses),
checkpoints/ (resume).
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
    from pydantic import ValidationError

    from cai.reward_specs import load_pm_spec

    spec = load_pm_spec(cfg.spec)
    base = spec.overrides()
    explicit = {k: getattr(cfg, k) for k in cfg.model_fields_set if k != "spec"}
    merged = {
        **cfg.model_dump(),
        **base,
        **{k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in explicit.items()},
    }
    # the spec is applied: validate the merged settings as a whole (lm_coef needs a value head)
    merged["spec"] = None
    try:
        return type(cfg).model_validate(merged).model_copy(update={"spec": cfg.spec}), spec
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise UserError(
            f"preference_model.{key}: {err['msg'].removeprefix('Value error, ')} (recipe block on top of spec "
            f"'{spec.name}')"
        ) from None


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


def response_token_count(tokenizer, messages: list[dict], full_ids: list[int]) -> int:
    """How many of a conversation's final tokens are the assistant response (its header included): the tokens
    after the longest common prefix with the prompt rendered with the generation prompt."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(p_ids), len(full_ids)) and p_ids[n] == full_ids[n]:
        n += 1
    return len(full_ids) - n


def tokenise_pairs(tokenizer, rows: list[dict], max_length: int, response_len: bool = False) -> list[dict]:
    """Token ids of each pair's two conversations (left-truncated to max_length) and p_a; with `response_len`,
    also how many final tokens of each are the response (for the value-head PM's LM loss)."""
    from cai.pm import conversation_ids

    out = []
    for r in rows:
        row = {"p_a": float(r["p_a"])}
        for side, key in (("a", "chosen"), ("b", "rejected")):
            conv = r["messages"] + [{"role": "assistant", "content": r[f"response_{side}"]}]
            full = conversation_ids(tokenizer, conv)
            ids = full[-max_length:]
            row[f"{key}_ids"] = ids
            if response_len:
                row[f"{key}_response_len"] = min(
                    response_token_count(tokenizer, r["messages"], full), len(ids)
                )
        out.append(row)
    return out


def held_out_eval(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> dict:
    """Pair accuracy (against p_a > 0.5), mean margin and soft loss of a PM on pairs; for a value-head PM also
    `lm_loss`, the preferred responses' mean next-token NLL averaged over the pairs that prefer one (as the
    training loss has it), and `lm_tokens`."""
    import torch

    from cai.pm import pair_accuracy, preference_loss, sequence_scores
    from cai.pm_value_head import ValueHeadPM, preferred_rows, response_lm_labels

    if not rows:
        return {"n": 0}
    vh = isinstance(model, ValueHeadPM)
    toks = tokenise_pairs(tokenizer, rows, max_length, response_len=vh)
    was = model.training
    model.eval()
    seqs = [t["chosen_ids"] for t in toks] + [t["rejected_ids"] for t in toks]
    p_a = torch.tensor([t["p_a"] for t in toks])
    if vh:
        resp = torch.tensor(
            [t["chosen_response_len"] for t in toks] + [t["rejected_response_len"] for t in toks]
        )
        keep = preferred_rows(p_a)
    scores = torch.zeros(len(seqs))
    nll, n_tok = torch.zeros(len(seqs)), 0
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
            kwargs = {}
            if vh:
                sl = slice(s, s + len(chunk))
                kwargs["lm_labels"] = response_lm_labels(ids, mask, resp[sl], keep[sl]).to(device)
            out_scores, out = sequence_scores(
                model, ids.to(device), mask.to(device), return_output=True, **kwargs
            )
            scores[s : s + len(chunk)] = out_scores.float().cpu()
            if vh:
                nll[s : s + len(chunk)] = out.lm_nll.float().cpu()
                n_tok += int(out.lm_tokens.sum())
    model.train(was)
    n = len(toks)
    r_a, r_b = scores[:n], scores[n:]
    result = {
        "n": n,
        "accuracy": pair_accuracy(r_a, r_b, p_a),
        "mean_margin": float(((r_a - r_b) * torch.sign(p_a - 0.5)).mean()),
        "soft_loss": float(preference_loss(r_a, r_b, p_a)),
        "scores": scores.tolist(),
    }
    if vh:
        n_pref = int(keep.sum())
        result.update(lm_loss=float(nll.sum()) / n_pref if n_pref else None, lm_tokens=n_tok)
    return result


def run(ctx) -> Path:
    import torch
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import RewardConfig

    from cai.models import load_model, load_tokenizer, peft_config, resolve_device, wrap_lora
    from cai.pm_value_head import ValueHeadPM

    r = ctx.recipe
    cfg, spec = effective_config(r)
    value_head = cfg.head == "value_head"
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
    common = dict(device=device, dtype=r.dtype, trust_remote_code=r.trust_remote_code)
    if value_head:  # causal LM + value head (seeded); LoRA on the LM, the value head trained in full
        model = ValueHeadPM.from_pretrained(ref, seed=r.seed, **common)
        if cfg.lora:
            model.lm = wrap_lora(model.lm, cfg.lora, task_type="CAUSAL_LM")
    else:
        torch.manual_seed(r.seed)  # the new score head's initialisation
        model = load_model(ref, kind="seq_cls", **common)
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
        use_cpu=dist.accelerator_cpu(device),
        report_to=[],
        seed=r.seed,
        max_length=None,  # sequences are left-truncated to cfg.max_length when tokenised
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not dist.is_main(),
        # a value-head PM leaves only an untied LM head unused, and only without the LM loss
        ddp_find_unused_parameters=(
            cfg.lm_coef == 0 and not model.config.get_text_config().tie_word_embeddings
            if value_head
            else None
        ),
    )
    from cai.pm_trainer import make_trainer_class, metrics_callback

    Trainer, Collator = make_trainer_class()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(
            tokenise_pairs(tok, train_rows, cfg.max_length, response_len=value_head)
        ),
        processing_class=tok,
        data_collator=Collator(pad_token_id=tok.pad_token_id),
        peft_config=peft_config(cfg.lora, task_type="SEQ_CLS") if cfg.lora and not value_head else None,
        callbacks=[metrics_callback(ctx.metrics())],
        loss=cfg.loss,
        center_coef=cfg.center_coef,
        lm_coef=cfg.lm_coef,
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
    )
    return ctx.out_dir
