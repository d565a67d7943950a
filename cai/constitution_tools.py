"""`cai constitution test | lint | effect`: check a constitution like code before a training run uses it.

- test: run the feedback model on every probe under each of its principles (cai.labels.Labeller, the feedback
  stage's own prompt building and order-averaging) and report per-principle accuracy, mean p(better) and
  order gap; exit 1 when a `--require`d principle is not applied.
- lint: warnings about near-duplicate principles, generic revision requests, feedback instructions that do
  not ask for a choice, prompts over the context length and principles that are practically never sampled.
- effect: re-label a sample of a run's pairs under OLD and NEW and report flips, attributed to the edit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cai.errors import UserError

# ---------------------------------------------------------------- shared: the labeller the feedback stage uses


def make_labeller(
    model_ref: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    seed: int = 0,
    both_orders: bool = True,
    few_shot: str | None = None,
    num_few_shot: int = 0,
    trust_remote_code: bool = False,
):
    """A cai.labels.Labeller on a loaded feedback model (few-shot examples from a paper-format file)."""
    from cai.labels import Labeller, load_feedback_few_shot
    from cai.models import load_model, load_tokenizer, resolve_device

    dev = resolve_device(device)
    tok = load_tokenizer(model_ref, trust_remote_code=trust_remote_code)
    model = load_model(model_ref, device=dev, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    examples = load_feedback_few_shot(few_shot)[:num_few_shot] if few_shot and num_few_shot > 0 else None
    return Labeller(model, tok, both_orders=both_orders, few_shot=examples, batch_size=batch_size, seed=seed)


def _few_shot_file(arg: str | None, constitution) -> str | None:
    return arg or constitution.few_shot.feedback


def _labeller(a, constitution):
    """The labeller the `test` and `effect` subcommands' options ask for."""
    return make_labeller(
        a.model,
        device=a.device,
        batch_size=a.batch_size,
        seed=a.seed,
        both_orders=not a.one_order,
        few_shot=_few_shot_file(a.few_shot, constitution),
        num_few_shot=a.num_few_shot,
    )


# ---------------------------------------------------------------- test


def run_test(
    constitution, probes, labeller, seed: int = 0, max_probes: int | None = None
) -> tuple[list[dict], dict]:
    """Label every (probe, principle) job (at most `max_probes` per principle); per-job rows and the summary."""
    from cai.labels import PairToLabel
    from cai.probes import probe_jobs, summarise

    jobs = probe_jobs(probes, constitution, seed, max_probes)
    by_id = constitution.by_id()
    pairs, prins = [], []
    for j in jobs:
        a, b = (j.probe.better, j.probe.worse) if j.better_is_a else (j.probe.worse, j.probe.better)
        pairs.append(PairToLabel(id=j.id, messages=j.probe.messages(), response_a=a, response_b=b))
        prins.append([by_id[j.principle_id]])
    results = labeller.label(pairs, prins, desc="probes") if pairs else []
    rows = []
    for j, r in zip(jobs, results):
        p_better = r.p_a if j.better_is_a else 1.0 - r.p_a
        rows.append(
            {
                "job": j.id,
                "probe": j.probe.id,
                "principle": j.principle_id,
                "better_is_a": j.better_is_a,
                "p_better": p_better,
                "p_a": r.p_a,
                "p_a_orders": r.p_a_orders,
                "order_gap": r.order_gap,
            }
        )
    return rows, summarise(rows, [p.id for p in constitution.principles])


def _cmd_test(a) -> int:
    from cai.constitution import load_constitution
    from cai.probes import format_table, load_probes, probes_path_for, required_failures
    from cai.rundir import write_json

    c = load_constitution(a.constitution)
    pfile = Path(a.probes) if a.probes else probes_path_for(a.constitution, c)
    if pfile is None:
        raise UserError(
            f"{a.constitution}: no probe file beside it (probes/{Path(a.constitution).stem}.yaml); give --probes FILE"
        )
    probes = load_probes(pfile, c)
    unknown = [pid for pid in a.require or [] if pid not in c.by_id()]
    if unknown:
        raise UserError(f"--require: unknown principle(s) {', '.join(unknown)} in constitution '{c.name}'")
    lab = _labeller(a, c)
    rows, summary = run_test(c, probes, lab, seed=a.seed, max_probes=a.max_probes)
    table = format_table(summary)
    print(
        f"constitution {c.name} ({a.constitution}); probes {pfile}; feedback model {a.model}; "
        f"{'both orders averaged' if not a.one_order else 'one order only'}"
    )
    print(table)
    if summary["not_applied"]:
        print(f"not applied (accuracy <= 0.5): {', '.join(summary['not_applied'])}")
    if summary["untested"]:
        print(f"no probes: {', '.join(summary['untested'])}")
    out = Path(a.out or Path("runs") / "constitution-test" / Path(a.constitution).stem)
    failed = required_failures(summary, a.require or [])
    result = {
        "constitution": c.name,
        "file": str(a.constitution),
        "probes": str(pfile),
        "model": a.model,
        "both_orders": not a.one_order,
        "seed": a.seed,
        "max_probes": a.max_probes,
        **summary,
        "required": a.require or [],
        "required_failed": failed,
        "jobs": rows,
    }
    write_json(out / "test.json", result)
    (out / "test.md").write_text(
        f"# Probes: {c.name} with {a.model}\n\n{format_table(summary, markdown=True)}\n", encoding="utf-8"
    )
    print(f"wrote {out / 'test.json'} and {out / 'test.md'}")
    if failed:
        print(f"FAIL: required principle(s) not applied: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- lint


def _cmd_lint(a) -> int:
    from cai.constitution_lint import lint

    warns = lint(a.file, threshold=a.threshold, model=a.model, probes_file=a.probes, few_shot=a.few_shot)
    for w in warns:
        print(w.format(a.file))
    print(f"{a.file}: {len(warns)} warning(s)")
    return 1 if warns and a.strict else 0


# ---------------------------------------------------------------- effect


def run_effect(
    old,
    new,
    pairs: list[dict],
    labeller,
    seed: int = 0,
    num_principles: int = 1,
    top: int = 5,
    all_pairs: bool = False,
):
    """Label `pairs` under OLD and NEW (coupled principle draws); per-pair rows and the summary.

    A pair whose drawn principles have the same feedback texts in OLD and NEW gets the same prompt, hence the
    same label, under both: it cannot flip and its Δp is 0, so it is only labelled with `all_pairs` (needed
    for PM agreement, or to see the labels themselves). Its p_old/p_new are None otherwise."""
    from cai.constitution import diff
    from cai.constitution_effect import flipped, plan, summarise
    from cai.labels import PairToLabel

    steps = plan(pairs, old, new, seed, num_principles)

    def label(sel, side, desc):
        if not sel:
            return {}
        ps = [
            PairToLabel(
                s["pair"]["id"], s["pair"]["messages"], s["pair"]["response_a"], s["pair"]["response_b"]
            )
            for s in sel
        ]
        return {r.id: r for r in labeller.label(ps, [s[side] for s in sel], desc=desc)}

    redo = [s for s in steps if not s["same_prompt"]]
    old_res = label(steps if all_pairs else redo, "old", "label OLD")
    new_res = label(redo, "new", "label NEW")
    rows = []
    for s in steps:
        pair = s["pair"]
        ro = old_res.get(pair["id"])
        rn = new_res.get(pair["id"], ro)
        rows.append(
            {
                "id": pair["id"],
                "p_old": ro.p_a if ro else None,
                "p_new": rn.p_a if rn else None,
                "flipped": bool(ro and flipped(ro.p_a, rn.p_a)),
                "old_principles": [p.id for p in s["old"]],
                "new_principles": [p.id for p in s["new"]],
                "touched": s["touched"],
                "same_prompt": s["same_prompt"],
                "order_gap_old": ro.order_gap if ro else None,
                "order_gap_new": rn.order_gap if rn else None,
                "p_a_run": pair.get("p_a_run"),
                "messages": pair["messages"],
                "response_a": pair["response_a"],
                "response_b": pair["response_b"],
            }
        )
    return rows, summarise(rows, diff(old, new), top=top)


def pm_scores(
    pm_dir: str, rows: list[dict], batch_size: int = 8, device: str = "auto"
) -> list[tuple[float, float]]:
    """(r_a, r_b) of each pair from a trained preference model, through cai.pm.RewardScorer."""
    from cai.models import resolve_device
    from cai.pm import RewardScorer

    scorer = RewardScorer(pm_dir, device=resolve_device(device))

    def conv(r, key):
        return [*r["messages"], {"role": "assistant", "content": r[key]}]

    ra = scorer.score([conv(r, "response_a") for r in rows], batch_size=batch_size).tolist()
    rb = scorer.score([conv(r, "response_b") for r in rows], batch_size=batch_size).tolist()
    return list(zip(ra, rb))


def _cmd_effect(a) -> int:
    from cai.constitution import format_diff, load_constitution
    from cai.constitution_effect import histogram, pm_agreement, read_pairs, report_markdown, sample_pairs
    from cai.rundir import write_json

    old, new = load_constitution(a.old), load_constitution(a.new)
    every = read_pairs(a.pairs)
    pairs = sample_pairs(every, a.limit, a.seed)
    lab = _labeller(a, old)
    rows, summary = run_effect(
        old,
        new,
        pairs,
        lab,
        seed=a.seed,
        num_principles=a.num_principles,
        top=a.top,
        all_pairs=a.all_pairs or bool(a.pm),
    )
    if a.pm:
        summary["pm"] = pm_agreement(rows, pm_scores(a.pm, rows, a.batch_size, a.device), a.pm)
    out = Path(a.out or Path("runs") / "constitution-effect" / f"{Path(a.old).stem}-vs-{Path(a.new).stem}")
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "old": str(a.old),
        "new": str(a.new),
        "pairs_file": str(a.pairs),
        "pairs_total": len(every),
        "model": a.model,
        "seed": a.seed,
        "both_orders": not a.one_order,
        "num_principles": a.num_principles,
    }
    histogram(rows, out / "delta_p.png", f"{Path(a.old).stem} → {Path(a.new).stem}")
    (out / "effect.md").write_text(
        report_markdown(summary, rows, meta, format_diff(old, new)), encoding="utf-8"
    )
    write_json(out / "effect.json", {**meta, **summary})
    with open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(
                json.dumps({k: v for k, v in r.items() if k not in ("messages", "response_a", "response_b")})
                + "\n"
            )
    _print_effect(summary)
    print(f"wrote {out / 'effect.md'}, {out / 'effect.json'}, {out / 'delta_p.png'}, {out / 'labels.jsonl'}")
    return 0


def _print_effect(s: dict) -> None:
    lo, hi = s["ci95"]
    print(
        f"pairs {s['pairs']}  relabelled {s['relabelled']}  flips {s['flips']}  "
        f"flip rate {s['flip_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f})  mean |dp| {s['mean_abs_dp']:.4f}"
    )
    for pid, r in s["per_principle"].items():
        rate = "-" if r["flip_rate"] is None else f"{r['flip_rate']:.3f}"
        print(f"  {pid:24s} {r['change']:28s} drew {r['pairs']:4d}  flips {r['flips']:4d}  rate {rate}")
    if s["unattributed_flips"]:
        print(f"  flips not attributable to an edited principle: {len(s['unattributed_flips'])}")
    if "pm" in s:
        pm = s["pm"]
        print(
            f"PM agreement: old labels {pm['agree_old']:.3f}, new labels {pm['agree_new']:.3f}. {pm['verdict']}"
        )


# ---------------------------------------------------------------- CLI


def _labeller_args(p, model_required: bool = True) -> None:
    p.add_argument(
        "--model", required=model_required, help="feedback model: alias, HF folder, .gguf or hub id"
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per scoring forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--seed", type=int, default=0, help="seed for option placement, pair sample and principle draws"
    )
    p.add_argument(
        "--one-order", action="store_true", help="score only one option order (no position-bias control)"
    )
    p.add_argument("--few-shot", help="few-shot feedback file (paper JSON); default: the constitution's own")
    p.add_argument(
        "--num-few-shot", type=int, default=0, help="few-shot examples to prepend (default 0, as the recipe)"
    )


def register(cs) -> None:
    """Add test, lint and effect to the `cai constitution` subcommands."""
    t = cs.add_parser(
        "test", help="run the feedback model on the probes; per-principle accuracy, p(better), order gap"
    )
    t.add_argument("constitution", help="constitution YAML")
    _labeller_args(t)
    t.add_argument("--probes", help="probe file (default: probes/<name>.yaml beside the constitution)")
    t.add_argument(
        "--require",
        action="append",
        metavar="ID",
        help="exit 1 unless this principle is applied (repeatable)",
    )
    t.add_argument(
        "--max-probes", type=int, metavar="N", help="at most N probes per principle (a quick smoke check)"
    )
    t.add_argument("--out", help="folder for test.json and test.md (default runs/constitution-test/<name>)")
    t.set_defaults(func=_cmd_test)

    lt = cs.add_parser(
        "lint", help="warn about duplicate, generic, choice-less, too long or never-sampled principles"
    )
    lt.add_argument("file", help="constitution YAML")
    lt.add_argument("--strict", action="store_true", help="exit 1 when there is any warning")
    lt.add_argument("--model", help="model whose context length the rendered prompts must fit")
    lt.add_argument(
        "--threshold", type=float, default=0.5, help="near-duplicate token-overlap threshold (default 0.5)"
    )
    lt.add_argument("--probes", help="probe file (default: probes/<name>.yaml beside the constitution)")
    lt.add_argument(
        "--few-shot", action="append", metavar="FILE", help="also render with this few-shot feedback file"
    )
    lt.set_defaults(func=_cmd_lint)

    e = cs.add_parser(
        "effect", help="re-label a run's pairs under OLD and NEW: flip rate, attribution, |dp|, report"
    )
    e.add_argument("old", help="constitution before the edit")
    e.add_argument("new", help="constitution after the edit")
    e.add_argument(
        "--pairs",
        required=True,
        help="RUN/feedback/pairs.jsonl (or any JSONL with prompt/response_a/response_b)",
    )
    _labeller_args(e)
    e.add_argument("--limit", type=int, help="label a seeded sample of at most N pairs")
    e.add_argument(
        "--num-principles", type=int, default=1, help="principles drawn per pair (probabilities averaged)"
    )
    e.add_argument(
        "--pm", metavar="DIR", help="trained preference model: how often it agrees with OLD vs NEW labels"
    )
    e.add_argument(
        "--all-pairs", action="store_true", help="also label pairs the edit cannot change (implied by --pm)"
    )
    e.add_argument("--top", type=int, default=5, help="flipped pairs shown in the report")
    e.add_argument("--out", help="report folder (default runs/constitution-effect/<old>-vs-<new>)")
    e.set_defaults(func=_cmd_effect)
