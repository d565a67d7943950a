"""Pairs that share their conversation: `cai pm eval` and the preference_model stage, packed against padded.

    .venv/bin/python bench/pair_scoring.py [--eval-pairs 128] [--train-pairs 64] [--rounds 2]

An HH pair's two transcripts differ only in the last assistant turn. Packed (cai.runtime.packing), each pair's
conversation is computed once and nothing is padded; padded, each side runs in full in a padded batch (what cai
did before). Both run here, alternating within each round so that load on a shared machine hits both, on
SmolLM2-135M-Instruct with a seeded scalar head (or `--pm`, a trained PM folder):

- pm eval: `evaluate_pm` on `--eval-pairs` held-out HH pairs (harmless-base dev), batch 8 conversations;
- PM stage: the preference_model stage of recipes/quickstart.yaml (1 epoch, batch 8 pairs, max_length 384,
  held-out evaluation before and after, score normalisation) on `--train-pairs` HH pairs as its feedback.

Printed: seconds of each side per round, the speed-ups (median over rounds of the paired ratios) and the checks
that both sides agree (eval: the same accuracy, and every pair's raw scores within 1e-4 of the other side's, the
largest difference printed: else a one-line message and exit 1, before the speed-ups; stage: held-out accuracy
and score mean, printed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rounds import positive_int  # noqa: E402

SCORE_TOLERANCE = 1e-4  # the most a packed raw score may differ from the padded one
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


def make_pm(out: Path) -> Path:
    """SmolLM2 with a seeded sequence-classification head, saved once."""
    import torch

    from cai.runtime.models import load_model, load_tokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(1234)
    model = load_model("smollm2-135m-instruct", kind="seq_cls")
    tok = load_tokenizer("smollm2-135m-instruct")
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def set_packed(on: bool) -> None:
    import cai.pm.scoring as scoring

    scoring.PACKED = on


def time_eval(pm: Path, n: int) -> tuple[float, dict]:
    """Seconds of `evaluate_pm` and its result, with "scores": the PM's raw scores of every conversation, in the
    order it scored them."""
    from cai.eval.measure import evaluate_pm
    from cai.pm.scoring import RewardScorer

    scorer = RewardScorer(pm)
    scored, score = [], scorer.score

    def keep(*args, **kwargs):
        out = score(*args, **kwargs)
        scored.extend(out.tolist())
        return out

    scorer.score = keep
    t0 = time.perf_counter()
    result = evaluate_pm(scorer, "pairs", limit=n)
    return time.perf_counter() - t0, {**result, "scores": scored}


def eval_disagreement(packed: dict, padded: dict) -> tuple[float, str | None]:
    """The largest difference between the two sides' raw scores, and what disagrees (None: they agree): a score
    further than SCORE_TOLERANCE, another accuracy or another number of scores."""
    a, b = packed["scores"], padded["scores"]
    if len(a) != len(b) or not a:
        return float("nan"), f"{len(a)} scores packed, {len(b)} padded"
    diff = max(abs(x - y) for x, y in zip(a, b))
    if not diff <= SCORE_TOLERANCE:
        return diff, f"largest score difference {diff:.1e} > {SCORE_TOLERANCE:.0e}"
    if packed["accuracy"] != padded["accuracy"]:
        return diff, f"accuracy {packed['accuracy']:.4f} packed, {padded['accuracy']:.4f} padded"
    return diff, None


def feedback_rows(n: int, seed: int = 0) -> list[dict]:
    from cai.data.hh import human_pairs

    rng = random.Random(seed)
    rows = human_pairs(HH, 1.0, n, seed)
    for r in rows:  # the chosen reply on either side
        if rng.random() < 0.5:
            r["response_a"], r["response_b"], r["p_a"] = r["response_b"], r["response_a"], 0.0
    return rows


def time_stage(run: Path) -> tuple[float, dict]:
    from cai.config.layout import stage_view
    from cai.config.load import load_recipe
    from cai.runtime.rundir import StageContext
    from cai.stages import preference_model as stage

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"run_dir={run}"])
    out = run / f"preference_model-{time.time_ns()}"
    ctx = StageContext(
        config=stage_view(recipe, "preference_model"),
        stage="preference_model",
        out_dir=out,
        inputs={"feedback": run / "feedback"},
    )
    t0 = time.perf_counter()
    stage.run(ctx)
    return time.perf_counter() - t0, json.loads((out / "eval.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-pairs", type=positive_int, default=128)
    ap.add_argument("--train-pairs", type=positive_int, default=64)
    ap.add_argument("--rounds", type=positive_int, default=2)
    ap.add_argument("--pm", help="a trained PM folder for the eval part (default: SmolLM2 + a seeded head)")
    ap.add_argument("--skip-stage", action="store_true")
    args = ap.parse_args()
    from cai.runtime.rundir import append_jsonl

    cache = Path.home() / ".cache" / "cai" / "bench" / "pairs"
    pm = Path(args.pm) if args.pm else make_pm(cache / "pm")
    run = Path(tempfile.mkdtemp(prefix="cai-pairs-"))
    append_jsonl(run / "feedback" / "pairs.jsonl", feedback_rows(args.train_pairs))

    times = {"eval": {True: [], False: []}, "stage": {True: [], False: []}}
    checks = {"eval": {}, "stage": {}}
    for r in range(args.rounds):
        for packed in (True, False) if r % 2 == 0 else (False, True):
            set_packed(packed)
            secs, res = time_eval(pm, args.eval_pairs)
            times["eval"][packed].append(secs)
            checks["eval"][packed] = res
            print(f"[bench] round {r} pm eval {'packed' if packed else 'padded'}: {secs:.1f} s", flush=True)
            if args.skip_stage:
                continue
            secs, res = time_stage(run)
            times["stage"][packed].append(secs)
            checks["stage"][packed] = res
            print(f"[bench] round {r} PM stage {'packed' if packed else 'padded'}: {secs:.1f} s", flush=True)

    print("\n| part | padded s | packed s | speed-up |\n|---|---:|---:|---:|")
    speedups = {}
    for part, label in (("eval", f"pm eval, {args.eval_pairs} HH pairs"), ("stage", "PM stage (quickstart)")):
        if not times[part][True]:
            continue
        ratios = [a / b for a, b in zip(times[part][False], times[part][True])]
        speedups[part] = statistics.median(ratios)
        print(
            f"| {label} | {statistics.median(times[part][False]):.1f} | "
            f"{statistics.median(times[part][True]):.1f} | {speedups[part]:.2f} |"
        )
    ev = checks["eval"]
    diff, wrong = eval_disagreement(ev[True], ev[False])
    print(
        f"\npm eval: accuracy {ev[True]['accuracy']:.4f} packed, {ev[False]['accuracy']:.4f} padded; "
        f"mean margin {ev[True]['mean_margin']:.5f} / {ev[False]['mean_margin']:.5f}; largest raw score "
        f"difference {diff:.1e} over {len(ev[True]['scores'])} scores"
    )
    if checks["stage"]:
        st = checks["stage"]
        print(
            "PM stage agrees: held-out accuracy "
            f"{st[True]['held_out']['accuracy']:.4f} / {st[False]['held_out']['accuracy']:.4f}; score mean "
            f"{st[True]['score_norm']['mean']:.5f} / {st[False]['score_norm']['mean']:.5f}"
        )
    if wrong:
        sys.exit(f"[bench] pm eval: packed and padded disagree: {wrong}")
    print("pm eval agrees")
    for part, x in speedups.items():
        print(f"speedup {part} {x:.2f}")


if __name__ == "__main__":
    main()
