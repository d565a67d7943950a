"""Stage `gold` (optional, `gold.enabled`): the gold judge of Gao et al. 2022, a preference model trained on
human preference pairs (HH format), independent of the AI labeller whose labels train the proxy PM.

It is built and trained through the same library code as the preference_model stage (cai.pm.build), on a
seeded sample of `gold.train_pairs` pairs of `gold.data`, and evaluated on `gold.eval_pairs` other pairs of the
same file that it never trained on, beside its baselines (the untrained model it started from, prefer longer,
prefer shorter: cai.eval.baselines). The report scores every policy update's sampled responses with it (proxy and
gold against sqrt(KL), the over-optimisation picture) and uses it as the win-rate judge.

It reads no other stage, so it runs first and arms share it. Outputs (RUN/gold/): model/ (a PM folder with
pm_origin.json and score_norm.json: the mean and std of its scores of the held-out responses, both sides),
eval.json, metrics.jsonl, checkpoints/ (resume; removed once the PM is written).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from cai.data.hh import hh_pair_rows
from cai.errors import UserError
from cai.eval.measure import pm_result, score_items
from cai.eval.suites import Item
from cai.hashing import sha256_file
from cai.pm.build import drop_checkpoints, fit, fresh_pm, measure_saved, write_origin
from cai.pm.scoring import NORM_FILE, RewardScorer
from cai.runtime import distributed as dist
from cai.runtime.rundir import write_json
from cai.runtime.settings import Precision
from cai.runtime.training import save_trained
from cai.stats import mean_std


def split_human_pairs(path: str, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict], int]:
    """(training rows, held-out rows, rows skipped) from an HH file: a seeded shuffle, the held-out pairs first
    (at most half the file), then up to n_train training pairs; the two never share a row."""
    rows, skipped = hh_pair_rows(path)
    random.Random(f"{seed}:gold-split").shuffle(rows)
    k = min(n_eval, len(rows) // 2)
    held, train = rows[:k], rows[k : k + n_train]
    if len(train) < 2 or not held:
        raise UserError(f"gold.data: {path}: {len(rows)} usable pairs; at least 4 are needed")
    return train, held, skipped


def _items(rows: list[dict]) -> list[Item]:
    out = []
    for r in rows:
        turns = sum(m["role"] == "user" for m in r["messages"])
        tag = "single-turn" if turns == 1 else "multi-turn"
        out.append(Item(r["id"], tag, r["messages"], [r["response_a"], r["response_b"]]))
    return out


def run(ctx) -> Path:
    cfg, settings = ctx.config.gold, ctx.config.settings
    t0 = time.time()
    train, held, skipped = split_human_pairs(cfg.data, cfg.train_pairs, cfg.eval_pairs, settings.seed)
    items = _items(held)
    model, tok = fresh_pm(cfg.backbone, cfg.head, settings, cfg.lora)
    untrained = score_items(
        RewardScorer.wrap(model, tok, "untrained"), items, cfg.batch_size, cfg.max_length, "gold: untrained"
    )
    model, trainer = fit(
        cfg, settings, model, tok, train, ctx.out_dir, ctx.metrics(), "gold", ctx.run_token, loss=cfg.loss
    )
    out = ctx.out_dir / "model"
    raw = measure_saved(  # scored as the report's gold judge loads it (the recipe's dtype, its fp32 head)
        trainer,
        model,
        tok,
        out,
        settings,
        lambda: save_trained(
            trainer, model, tok, out, merge=bool(cfg.lora), dtype=Precision.of(settings).save
        ),
        lambda judge: score_items(judge, items, cfg.batch_size, cfg.max_length, "gold: eval"),
    )
    result = pm_result(items, raw, untrained, "hh_pairs", settings.seed)
    scores = [float(x) for x in raw]
    mean, std = mean_std(scores)
    # by name and content, not by path: the output id must not depend on where the checkout lives
    data = {"file": Path(cfg.data).name, "sha256": sha256_file(cfg.data)}
    if dist.is_main():
        write_origin(out, cfg.backbone, cfg.head, settings.seed)
        write_json(
            out / NORM_FILE,
            {
                "mean": mean,
                "std": std,
                "n": len(scores),
                "sample": "both responses of the held-out human pairs (never trained on)",
                "from": data,
                "scored_as": f"left-truncated to {cfg.max_length} tokens, as in training",
            },
        )
        report = {
            "data": data,
            "backbone": cfg.backbone,
            "head": cfg.head,
            "loss": cfg.loss,
            "lora": cfg.lora is not None,
            "train_pairs": len(train),
            "eval_pairs": len(held),
            "skipped_rows": skipped,
            "epochs": cfg.epochs,
            "max_steps": cfg.max_steps,
            "learning_rate": cfg.learning_rate,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "seed": settings.seed,
            "held_out": result,
            "seconds": round(time.time() - t0, 1),
        }
        write_json(ctx.out_dir / "eval.json", report)
    dist.barrier()
    drop_checkpoints(ctx.out_dir)
    lift = result.get("lift") or {}
    ctx.summary.update(
        train_pairs=len(train),
        eval_pairs=len(held),
        accuracy=result["accuracy"],
        accuracy_ci95=result["ci95"],
        best_baseline=result.get("best_baseline"),
        lift=lift.get("value"),
        lift_ci95=lift.get("ci95"),
    )
    return ctx.out_dir
