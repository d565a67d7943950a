"""Stage `preference_model`: train a scalar-head PM on the feedback pairs with TRL's RewardTrainer.

The loss is the CAI paper's soft-label cross-entropy on p_a (or Bradley–Terry on labels rounded at 0.5),
plus an optional reward-centring term: `PreferenceTrainer` only replaces RewardTrainer.compute_loss
(maths in cai.pm.loss). Scores are read at each sequence's last real token (cai.pm.scoring), the same
way PPO and evaluation read them. After training, the mean and std of the trained PM's scores of held-out
reference responses (the sampling policy's responses the PM did not train on, both sides of the held-out pairs,
scored exactly as PPO scores them) are stored in model/score_norm.json, with their number and source, so PPO
can normalise rewards.

`preference_model.head` picks the backbone: 'classifier' (AutoModelForSequenceClassification, num_labels=1)
or 'value_head' (a causal LM that keeps its LM head, with a scalar head on its trunk: cai.pm.value_head), which
can add a language-modelling loss on the preferred responses (`lm_coef`). With LoRA, the classifier's score
head and the value head are trained in full. The training steps live in cai.pm.build (each online round of the
policy stage trains the PM further with them).

Outputs (RUN/preference_model/): model/ (the PM folder with its tokenizer, score_norm.json and pm_origin.json:
the backbone, head and seed the untrained baseline of an evaluation is rebuilt from), metrics.jsonl,
eval.json (held-out pair accuracy before/after; for a value-head PM also the LM loss on the preferred responses),
checkpoints/ (resume; removed once the PM is written). `preference_model.spec` names a spec whose keys this
block's own keys override (cai.config.pm_spec); the stage reads the merged block.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from cai.data.hh import human_pairs
from cai.errors import UserError
from cai.pm.build import responses_of, train_pm
from cai.pm.pairs import split_pairs
from cai.runtime import distributed as dist
from cai.runtime.rundir import read_jsonl, write_json


def load_pairs(ctx, cfg, seed: int) -> list[dict]:
    """The labelled feedback pairs, plus the human pairs of `preference_model.human_data` when set."""
    path = ctx.input_dir("feedback") / "pairs.jsonl"
    rows = [row for row in read_jsonl(path) if row.get("p_a") is not None]
    if cfg.human_data is not None:  # its ratio is to the AI-labelled pairs (not feedback.human_mix's)
        n_ai = sum(row.get("source") != "human" for row in rows)
        rows += human_pairs(cfg.human_data.path, cfg.human_data.ratio, n_ai, seed, taken=rows)
    if len(rows) < 2:
        raise UserError(f"{path}: at least 2 labelled pairs are needed to train a PM")
    return rows


def reference_responses(ctx, train_rows: list[dict], eval_rows: list[dict], cap: int, seed: int):
    """The responses that set the reward normalisation: the sampling policy's responses the PM did not train
    on (both sides of the held-out pairs, and responses in feedback/responses.jsonl that are in no training
    pair), a seeded sample of at most `cap`; (rows of messages and text, a record of where they came from)."""
    trained = {(r.get("prompt_id"), r[f"response_{s}"].strip()) for r in train_rows for s in "ab"}
    path = ctx.input_dir("feedback") / "responses.jsonl"
    messages = {r.get("prompt_id"): r["messages"] for r in train_rows + eval_rows}
    pool: dict[tuple, dict] = {}
    for r in read_jsonl(path):  # rows name their prompt; its messages are those of its pairs
        meta = r.get("meta") or {}
        key = (meta.get("prompt_id"), str(r.get("text", "")).strip())
        if key[0] in messages:
            pool.setdefault(
                key, {"messages": messages[key[0]], "text": r["text"], "policy": meta.get("policy")}
            )
    for r in eval_rows:
        if r.get("source") != "human":
            for side in "ab":
                key = (r.get("prompt_id"), r[f"response_{side}"].strip())
                pool.setdefault(
                    key, {"messages": r["messages"], "text": r[f"response_{side}"], "policy": None}
                )
    held = [v for k, v in sorted(pool.items(), key=lambda kv: str(kv[0])) if k not in trained and k[1]]
    source = "responses the PM did not train on (held-out prompts, unpaired responses)"
    if not held:  # no held-out prompts (eval_fraction 0): the training responses, said so
        held = responses_of(train_rows)
        source = "training responses (no held-out responses: preference_model.eval_fraction is 0)"
    random.Random(f"{seed}:norm-sample").shuffle(held)
    held = held[:cap]
    record = {
        "n": len(held),
        "sample": source,
        # the file within its stage folder: the PM's output id must not depend on how the run folder is spelled
        "from": f"feedback/{path.name if path.is_file() else 'pairs.jsonl'}",
        "policy": sorted({str(h["policy"]) for h in held if h["policy"]}) or None,
        "prompts": len({json.dumps(h["messages"]) for h in held}),
        "scored_as": "as PPO scores them: the score at the last token of the untruncated conversation",
    }
    return held, record


def run(ctx) -> Path:
    cfg, settings = ctx.config.preference_model, ctx.config.settings
    t0 = time.time()
    rows = load_pairs(ctx, cfg, settings.seed)
    train_rows, eval_rows = split_pairs(rows, cfg.eval_fraction, settings.seed)
    held, record = reference_responses(ctx, train_rows, eval_rows, cfg.norm_sample, settings.seed)
    fit = train_pm(
        cfg,
        settings,
        train_rows,
        eval_rows,
        ctx.out_dir,
        ctx.metrics(),
        "preference_model",
        ctx.run_token,
        (held, record),
    )
    before, after, norm = fit["before"], fit["after"], fit["norm"]
    if dist.is_main():
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
            "train_sample": {k: v for k, v in fit["train_sample"].items() if k != "scores"},
            "score_norm": norm,
            "seconds": round(time.time() - t0, 1),
        }
        write_json(ctx.out_dir / "eval.json", report)
    dist.barrier()
    ctx.summary.update(
        train_pairs=len(train_rows),
        held_out_pairs=after.get("n", 0),
        held_out_scored=after.get("n_scored", 0),  # held-out pairs whose label picks a side: the accuracy's n
        held_out_accuracy=after.get("accuracy"),
        held_out_accuracy_before=before.get("accuracy"),
        score_mean=norm["mean"],
        score_std=norm["std"],
        precision=fit["precision"].record(),
    )
    return ctx.out_dir
