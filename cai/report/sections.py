"""The report's sections after the stage table: feedback, preference model (with baselines), policy optimisation
(any algorithm), win rate (by the gold judge when there is one, on red-team and helpful prompts) and examples.

Each returns markdown blocks and records its numbers in `data` (written to report.json). Tables have one
column per arm (one column for a run without arms); a missing stage output gives a short note, not an error.
"""

from __future__ import annotations

from pathlib import Path

from cai.feedback.labeller import check_warning
from cai.hashing import hash_json
from cai.markdown import clean, table, with_ci
from cai.plots import curves_png, plot_kl_reward
from cai.report.compute import (
    generate,
    gold_win_rates,
    held_out_result,
    label_agreement,
    metric_series,
    pm_evaluations,
    scored_pairs,
    win_rates,
)
from cai.report.evalview import baseline_rows, baseline_warnings, check_baseline_rows
from cai.report.klfit import KL_NAMES, analyze_logs
from cai.report.winrates import gold_judge, mix_kinds, win_rate_md
from cai.runtime.rundir import read_json, read_jsonl, read_manifest
from cai.stats import SMALL_N, slope_ci, small_n, small_n_note

PPO_PANELS = [
    ("objective/score", "PM score (raw, not the reward)"),
    ("objective/kl_k3", "KL(π‖π_ref), k3 estimate (≥ 0)"),
    ("objective/kl", "KL(π‖π_ref), the reward's estimator"),
    ("objective/entropy", "entropy"),
    ("policy/clipfrac", "clip fraction"),
]


def _unique(dirs: dict) -> dict:
    """{label: dir} with each folder once (shared stages appear under the first arm that uses them)."""
    seen, out = set(), {}
    for k, d in dirs.items():
        if d is not None and str(d) not in seen:
            seen.add(str(d))
            out[k] = d
    return out


def feedback_section(rep) -> list[str]:
    arms, label, data = rep.arms, rep.label, rep.data
    dirs = {a: rep.index.stage_dir("feedback", a) for a in arms}
    if not any(d and (d / "stats.json").is_file() for d in dirs.values()):
        return []
    md = ["## AI feedback\n", "### Labeller check\n"]
    checks = {a: read_json(d / "check.json") if d else None for a, d in dirs.items()}
    data["labeller_check"] = {label(a): c for a, c in checks.items()}
    if not any(checks.values()):
        md.append(
            "No labeller check in this run: set `feedback.check_set` to measure the feedback model's agreement "
            "with human harmlessness labels before trusting its labels.\n"
        )
    else:
        cols = [label(a) for a in arms]
        rows = [
            ["agreement with human labels [95% CI]"]
            + [with_ci(c, "agreement") if c else "—" for c in checks.values()],
            ["mean gap between the two orders"]
            + [c.get("mean_order_gap") if c else None for c in checks.values()],
            ["pairs checked"] + [c.get("n") if c else None for c in checks.values()],
            ["above chance"] + [c.get("above_chance") if c else None for c in checks.values()],
        ]
        rows += check_baseline_rows(list(checks.values()))
        md.append(table(["", *cols], rows))
        for a, c in checks.items():
            w = c and (c.get("warning") or check_warning(c))
            if w:
                md.append(f"> **Warning{f' ({label(a)})' if len(arms) > 1 else ''}:** {w}.\n")
    stats = {a: (read_json(d / "stats.json") or {}) if d else {} for a, d in dirs.items()}
    keys = [
        ("pairs", "AI-labelled pairs"),
        ("mean_p_a", "mean p(A)"),
        ("mean_confidence", "mean |p − 0.5|"),
        ("share_a_preferred", "share preferring A"),
        ("mean_order_gap", "mean order gap"),
        ("human_pairs", "human pairs mixed in"),
    ]
    md.append("### Labels\n")
    md.append(
        table(["", *[label(a) for a in arms]], [[name] + [stats[a].get(k) for a in arms] for k, name in keys])
    )
    data["feedback"] = {label(a): {k: stats[a].get(k) for k, _ in keys} for a in arms}
    if len(arms) > 1:
        files = {label(a): dirs[a] / "pairs.jsonl" for a in arms if dirs[a]}
        agr = label_agreement(files)
        data["label_agreement"] = agr
        names = agr["arms"]
        rows = []
        for x in names:
            row = [x]
            for y in names:
                if x == y:
                    row.append("—")
                    continue
                r = agr["pairs"].get(f"{x}|{y}") or agr["pairs"].get(f"{y}|{x}")
                row.append(
                    f"{r['agreement']:.2f} (r = {r['correlation']:.2f}, n = {r['n']})"
                    if r and r["agreement"] is not None and r["correlation"] is not None
                    else (f"{r['agreement']:.2f} (n = {r['n']})" if r and r["agreement"] is not None else "—")
                )
            rows.append(row)
        md.append("### Agreement between the arms' AI labels\n")
        md.append(
            "Share of the shared response pairs (the same prompt and the same two responses, in either order) on "
            "which two arms' labels prefer the same response, and the correlation of their p(A).\n"
        )
        md.append(table(["", *names], rows))
    return md


def pm_section(rep) -> list[str]:
    arms, label, out, data, config = rep.arms, rep.label, rep.out, rep.data, rep.config
    dirs = _unique({label(a): rep.index.stage_dir("preference_model", a) for a in arms})
    dirs = {k: d for k, d in dirs.items() if (d / "model" / "config.json").is_file()}
    if not dirs:
        return []
    md = ["## Preference model\n"]
    train = {k: (read_manifest(d) or {}).get("summary", {}) for k, d in dirs.items()}
    ev = {k: read_json(d / "eval.json") or {} for k, d in dirs.items()}
    md.append(
        table(
            ["", *dirs],
            [
                ["training pairs"] + [t.get("train_pairs") for t in train.values()],
                ["held-out pair accuracy (AI labels) [95% CI]"]
                + [_held_out(t, block=ev[k].get("held_out")) for k, t in train.items()],
                ["… the untrained PM on the same pairs (baseline)"]
                + [
                    _held_out(t, "held_out_accuracy_before", ev[k].get("held_out_before"))
                    for k, t in train.items()
                ],
            ],
        )
    )
    md += _small_sample_note(train, ev)
    if not config.report.suites:
        return md
    evals = pm_evaluations(config, {k: d / "model" for k, d in dirs.items()}, out)
    data["pm_eval"] = evals
    suites = config.report.suites
    md.append(
        f"### Evaluation suites (up to {config.report.eval_limit} items each, the same items for every PM)\n"
    )
    md.append(
        "Accuracy [95% Wilson interval] (n): the share of items where the PM scores the harmless answer higher; "
        f"n below {SMALL_N} is marked small. "
        "Beside it, what no skill gets on the same items: the untrained model (the PM's backbone with a fresh "
        "head, same seed), preferring the longer or the shorter reply, and on option suites always the answer "
        "text most often right; the lift is the PM's accuracy minus the best of them (paired bootstrap CI). "
        "r: the correlation of the PM's scores with response length.\n"
    )
    rows = []
    for s in suites:
        res = {k: evals[k].get(s) or {} for k in dirs}
        rows.append([f"**{s}**"] + [with_ci(r) for r in res.values()])
        tags = sorted({t for r in res.values() for t in (r.get("per_tag") or {})})
        if len(tags) > 1:
            rows += [
                [f"{s} / {t}"] + [with_ci((r.get("per_tag") or {}).get(t)) for r in res.values()]
                for t in tags
            ]
        rows.append([f"{s}: chance level"] + [r.get("chance") for r in res.values()])
        rows += baseline_rows(s, list(res.values()))
        rows.append([f"{s}: mean margin"] + [r.get("mean_margin") for r in res.values()])
        rows.append([f"{s}: calibration error (ECE)"] + [r.get("ece") for r in res.values()])
    md.append(table(["suite", *dirs], rows))
    md += baseline_warnings({k: evals[k] for k in dirs}, len(dirs) > 1)
    md.append(
        "Reliability diagrams (one point per item: the PM's confidence in the answer it prefers against how often "
        "that answer is the right one):\n"
    )
    for k in dirs:
        for s in suites:
            png = ((evals[k].get(s) or {}).get("files") or {}).get("png")
            if png and Path(png).is_file():
                md.append(f"![calibration {k} {s}]({Path(png).relative_to(out).as_posix()})")
    md.append("")
    return md


def _small_sample_note(train: dict, ev: dict) -> list[str]:
    """The note under the PM table for accuracies over few items. Pairs of one prompt count for less than
    independent pairs: where they share prompts, the prompts decide."""
    pairs = {k: scored_pairs(t) for k, t in train.items()}
    units = {
        k: pairs[k]
        if pairs[k] is None
        else min(pairs[k], (ev[k].get("held_out") or {}).get("clusters") or pairs[k])
        for k in train
    }
    small = [k for k in train if small_n(units[k])]
    if not small:
        return []
    k = min(small, key=units.get)
    what = "held-out pairs" if units[k] == pairs[k] else f"held-out prompts ({pairs[k]} pairs)"
    return [f"> **Small sample:** held-out accuracy of {', '.join(small)}: {small_n_note(units[k], what)}.\n"]


def _held_out(t: dict, key: str = "held_out_accuracy", block: dict | None = None) -> str:
    """The PM's held-out accuracy (or, with key 'held_out_accuracy_before', the untrained PM's on the same pairs)
    and n from the stage summary, with the interval clustered by prompt of its eval.json `block`
    (held_out_result)."""
    return with_ci(held_out_result(t.get(key), scored_pairs(t), block))


def ppo_section(rep) -> list[str]:
    """Training curves of every policy-stage log (PPO, RLOO, GRPO, DPO's probes) and the fit of score against
    sqrt(KL)."""
    arms, label, out, data = rep.arms, rep.label, rep.out, rep.data
    logs = {
        label(a): rep.index.stage_dir("policy", a) / "metrics.jsonl"
        for a in arms
        if rep.index.stage_dir("policy", a)
    }
    logs = {k: p for k, p in _unique(logs).items() if p.is_file()}
    if not logs:
        return []
    algorithms = sorted({_algorithm(p.parent) for p in logs.values()})
    md = [f"## Policy optimisation ({', '.join(a.upper() for a in algorithms)})\n"]
    curves = {k: metric_series(p, [key for key, _ in PPO_PANELS]) for k, p in logs.items()}
    if curves_png(out / "ppo_curves.png", PPO_PANELS, curves):
        md.append("![PPO curves](ppo_curves.png)\n")
    series = analyze_logs(list(logs.items()))
    data["kl_fit"] = {
        s["label"]: {**s["fit"], "b_ci95": slope_ci(s["fit"]), "round": s.get("round")}
        for s in series
        if s.get("fit")
    }
    md.append("### Reward against sqrt(KL)\n")
    md.append(
        "Fit of the PM score = a + b·sqrt(KL) over the updates (DPO: its probes; Bai et al. 2022 found it roughly "
        "linear). "
        f"KL per sequence: {_kl_used(series, logs)}.\n"
    )
    for s in series:
        if s.get("note"):
            md.append(f"> **Note ({s['label']}):** {s['note']}.\n")
    fitted = [s for s in series if s.get("fit")]
    if fitted:
        fits = [s["fit"] for s in fitted]
        md.append(
            table(
                ["", *[s["label"] for s in fitted]],
                [
                    ["a"] + [f["a"] for f in fits],
                    ["b [95% CI]"] + [_slope(f) for f in fits],
                    ["R²"] + [f["r2"] for f in fits],
                    ["points (PPO/RLOO/GRPO: updates; DPO: probes)"] + [s["n"] for s in fitted],
                    ["max KL"] + [f["kl_max"] for f in fits],
                    ["score first → last"]
                    + [f"{f['reward_first']:.3f} → {f['reward_last']:.3f}" for f in fits],
                ],
            )
        )
        plot_kl_reward(out / "kl_reward.png", series)
        md.append("![reward vs sqrt(KL)](kl_reward.png)\n")
    for s in series:
        if s.get("warning"):
            md.append(f"> **Warning ({s['label']}):** {s['warning']}.\n")
    return md


def _slope(fit: dict) -> str:
    """b with its 95% interval (t with n − 2 degrees of freedom); b alone below 3 points."""
    ci = slope_ci(fit)
    return f"{fit['b']:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else f"{fit['b']:.3g}"


def _algorithm(stage_dir: Path) -> str:
    """The algorithm a policy stage ran (its manifest's config; 'ppo' for a run made before there was a choice)."""
    cfg = (read_manifest(stage_dir) or {}).get("config") or {}
    return str((cfg.get("policy") or {}).get("algorithm", "ppo"))


def _kl_used(series: list[dict], logs: dict) -> str:
    """Which KL column the fit used, and which estimator the reward's penalty used (from the PPO manifest)."""
    fitted = sorted({f"`{s['kl_key']}`, the {KL_NAMES[s['kl_key']]}" for s in series})
    est = {
        str(((read_manifest(p.parent) or {}).get("config") or {}).get("ppo", {}).get("kl_estimator"))
        for p in logs.values()
    }
    return f"{'; '.join(fitted)}; the reward's KL penalty used the {', '.join(sorted(est))} estimator (`objective/kl`)"


def generations_section(rep) -> list[str]:
    """Win rate against the initial model on held-out prompts (common judge), and example responses."""
    arms, label, data, config, g = rep.arms, rep.label, rep.data, rep.config, rep.gen_dir
    cr = rep.index.stage_dir("critique_revise", arms[0])
    if not cr:
        return []
    held = mix_kinds(held_out_by_every_arm(rep))[: config.report.win_rate_prompts]
    examples = [r for r in read_jsonl(cr / "data.jsonl") if r.get("kind") == "red_team"][
        : config.report.examples
    ]
    # each arm's model folders; a shared folder (one SFT for all arms) is generated and judged once
    model_dir = {(kind, a): _model_dir(rep.index, kind, a) for kind in ("sl-cai", "final") for a in arms}
    cand_name = {}
    for (kind, a), d in model_dir.items():
        if d is not None:
            cand_name.setdefault(str(d), f"{kind}:{label(a)}")
    held_req = [{"id": f"held:{p['id']}", "messages": p["messages"]} for p in held]
    ex_req = [{"id": f"ex:{r['id']}", "messages": r["prompt"]} for r in examples]
    gen_key = hash_json(
        {"generation": config.generation.model_dump(mode="json"), "seed": config.settings.seed}
    )
    responses: dict[str, dict[str, str]] = {}
    for d, name in cand_name.items():  # cached per model output: a rerun stage gets a new output id
        reqs = held_req + (ex_req if name.startswith("final:") else [])
        out_id = (read_manifest(Path(d).parent) or {}).get("output")
        # the requests' text too: prompts may keep their ids and change their text
        ck = hash_json({"g": gen_key, "out": out_id, "dir": d, "requests": reqs})
        responses[name] = generate(
            config, d, reqs, g / f"{name.replace(':', '-')}-{ck}.jsonl", f"report: {name}"
        )
    md: list[str] = []
    final_by_arm = {
        label(a): responses[cand_name[str(d)]]
        for (kind, a), d in model_dir.items()
        if kind == "final" and d is not None
    }
    judged = [
        {**r, "kind": p.get("kind") or "red_team"} for r, p in zip(held_req, held)
    ]  # the judge's question
    if held and responses:
        initial = generate(
            config,
            config.models.policy,
            held_req,
            g / f"initial-{hash_json([gen_key, config.models.policy, held_req])}.jsonl",
            "report: initial model",
        )
        gold = gold_judge(rep)
        if gold is not None:
            wr = gold_win_rates(config, gold, judged, initial, responses)
        else:
            wr = win_rates(config, judged, initial, responses)
        data["win_rate"] = wr
        md += win_rate_md(rep, wr, len(held), {k: cand_name.get(str(d)) for k, d in model_dir.items() if d})
    rep.generated = {"held": judged, "responses": responses, "names": cand_name, "dirs": model_dir}
    md.append(_examples(examples, final_by_arm))
    return md


def held_out_by_every_arm(rep) -> list[dict]:
    """The first arm's held-out prompts that every arm held out: arms whose prompt settings differ (a swept
    limit or held-out share) may have trained on some of the first arm's held-out prompts."""
    first, *others = [rep.index.stage_dir("critique_revise", a) for a in rep.arms]
    ids = [{r["id"] for r in read_jsonl(d / "held_out.jsonl")} for d in others if d and d != first]
    return [r for r in read_jsonl(first / "held_out.jsonl") if all(r["id"] in s for s in ids)]


def _model_dir(index, kind: str, arm) -> Path | None:
    stage, sub = {"sl-cai": ("sft", "model"), "final": ("policy", "policy")}[kind]
    d = index.stage_dir(stage, arm)
    return d / sub if d is not None and (d / sub / "config.json").is_file() else None


def _examples(examples: list[dict], final_by_arm: dict[str, dict[str, str]]) -> str:
    if not examples:
        return ""
    parts = [
        "## Examples\n",
        "Red-team prompts from the SL-CAI data: the initial model's answer, its revision after "
        "critique, and the final policy's answer.\n",
    ]
    cols = list(final_by_arm)
    for n, r in enumerate(examples, 1):
        prompt = r["prompt"][-1]["content"] if r.get("prompt") else ""
        category = f" ({r['category']})" if r.get("category") else ""
        parts.append(f"### Example {n}{category}\n")
        parts.append("> " + clean(prompt, 400).replace("\n", "\n> ") + "\n")
        header = ["initial", "revised (SL-CAI)"] + [
            f"final: {c}" if len(cols) > 1 else "final policy" for c in cols
        ]
        row = [clean(r.get("initial", "")), clean(r.get("final", ""))] + [
            clean(final_by_arm[c].get(f"ex:{r['id']}", "")) for c in cols
        ]
        parts.append(table(header, [row]))
    return "\n".join(parts)
