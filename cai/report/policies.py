"""The report's policy comparison: every arm's final policy side by side, whatever optimised it (PPO, RLOO,
GRPO, DPO, online rounds), on the same held-out prompts — the score of one common PM (and the paired gain over
the SFT model), sqrt(KL) of the final policy to its SFT model measured on those prompts (cai.report.kl), the
win rate against the SFT model from the common judge (the gold PM when the run has one), the policy stage's time
and peak memory — and, for online runs, score, KL, labels and PM agreement round by round."""

from __future__ import annotations

from pathlib import Path

from cai.markdown import num, table, with_ci
from cai.pm.scoring import NORM_FILE
from cai.report import seeds
from cai.report.compute import gold_win_rates, held_out_result, scored_pairs, win_rates
from cai.report.kl import HOW_MEASURED, as_sqrt, kl_to_sft, table_row
from cai.report.winrates import gold_judge, judge_notes
from cai.rl.rewards import PreferenceModelReward
from cai.runtime.rundir import read_json, read_manifest
from cai.stats import bootstrap_ci, small_n, small_n_note


def _policy_dirs(rep) -> dict:
    return {a: d for a in rep.arms if (d := rep.index.stage_dir("policy", a)) is not None and d.is_dir()}


def _config(stage_dir: Path) -> dict:
    return (read_manifest(stage_dir) or {}).get("config") or {}


def algorithm_label(stage_dir: Path) -> str:
    """'RLOO', 'PPO, 2 rounds', ... from a policy stage's manifest."""
    p = _config(stage_dir).get("policy") or {}
    name = str(p.get("algorithm", "ppo")).upper()
    rounds = int(p.get("rounds", 1))
    return name + (f", {rounds} rounds" if rounds > 1 else "")


def pm_scores(
    pm_dir: Path, settings, prompts: list[dict], responses: dict[str, str], batch_size: int
) -> dict:
    """Mean normalised score of one PM over responses to the prompts, with a bootstrap 95% CI and n, and each
    prompt's score under `by_id` (for paired differences; not written to report.json)."""
    rows = [p for p in prompts if p["id"] in responses]
    if not rows:
        return {"n": 0}
    reward = PreferenceModelReward(pm_dir, settings, batch_size=batch_size)
    _, score = reward([p["messages"] for p in rows], [responses[p["id"]] for p in rows])
    values = [float(x) for x in score]
    return {
        "mean": sum(values) / len(values),
        "ci95": list(bootstrap_ci(values)),
        "n": len(values),
        "by_id": {p["id"]: v for p, v in zip(rows, values)},
    }


def paired_gain(final: dict | None, sft: dict | None) -> dict | None:
    """Final policy minus its SFT model, prompt by prompt on the prompts both were scored on: the mean difference
    with a paired bootstrap 95% CI (as cai.eval.baselines' lift), n; None without both."""
    diffs = list(prompt_gains(final, sft).values())
    if not diffs:
        return None
    return {"mean": sum(diffs) / len(diffs), "ci95": list(bootstrap_ci(diffs)), "n": len(diffs)}


def prompt_gains(final: dict | None, sft: dict | None) -> dict:
    """{prompt id: final − SFT score} on the prompts both pm_scores results scored."""
    a, b = (final or {}).get("by_id") or {}, (sft or {}).get("by_id") or {}
    return {k: a[k] - b[k] for k in a if k in b}


def _public(res: dict | None) -> dict | None:
    return {k: v for k, v in res.items() if k != "by_id"} if res else res


def _common_pm(rep) -> Path | None:
    """The PM every policy is scored by: the first arm's preference model (the run's, when arms share it)."""
    d = rep.index.stage_dir("preference_model", rep.arms[0])
    return d / "model" if d is not None and (d / "model" / "config.json").is_file() else None


def _memory(m: dict) -> str:
    """'812 MiB RSS, 2048 MiB CUDA' from a manifest's peak_memory; '—' when it has none (an old run, a failed stage)."""
    peak = m.get("peak_memory") or {}
    if peak.get("rss_mib") is None:
        return "—"
    parts = [f"{peak['rss_mib']:.0f} MiB RSS" + (" (process)" if peak.get("rss_since") == "process" else "")]
    if (peak.get("processes") or 1) > 1:  # the largest process's, and all of them together
        parts[0] += f" (largest of {peak['processes']} processes; {peak['rss_mib_total']:.0f} MiB together)"
    if peak.get("cuda_mib") is not None:
        parts.append(f"{peak['cuda_mib']:.0f} MiB CUDA")
    return ", ".join(parts)


def _wins_vs_sft(config, dirs: dict, held: list[dict], answers, models: dict, gold: Path | None) -> dict:
    """Each arm's win rate against its own SFT model, by the gold PM when there is one, else the common judge."""
    against: dict[str, dict] = {}  # arms by the SFT model they are judged against (one judge load for each)
    for a in dirs:
        final, sft = answers("final", a), answers("sl-cai", a)
        if final and sft:
            against.setdefault(str(models[("sl-cai", a)]), {"sft": sft, "arms": {}})["arms"][a] = final
    wins = {}
    for group in against.values():
        # a run without arms has one arm, None
        names = {a: "final policy" if a is None else str(a) for a in group["arms"]}
        cands = {names[a]: final for a, final in group["arms"].items()}
        if gold is not None:
            res = gold_win_rates(config, gold, held, group["sft"], cands)
        else:
            res = win_rates(config, held, group["sft"], cands)
        wins.update({a: res["results"].get(names[a]) for a in group["arms"]})
    return wins


def _stage_rows(dirs: dict) -> list[list]:
    """Time, seconds per 1,000 policy tokens and peak memory of each arm's policy stage ('—' where unrecorded)."""
    manifests = [read_manifest(d) or {} for d in dirs.values()]
    return [
        ["policy stage time"]
        + [
            f"{m.get('seconds_total', m['seconds']):.1f} s" if m.get("seconds") is not None else "—"
            for m in manifests
        ],
        ["seconds per 1,000 policy tokens"]
        + [num((m.get("summary") or {}).get("seconds_per_1k_policy_tokens")) for m in manifests],
        ["peak memory of the policy stage"] + [_memory(m) for m in manifests],
    ]


def comparison_section(rep) -> list[str]:
    """One column per arm: the final policy against the SFT model on the held-out prompts the report generated
    for (sections.generations_section)."""
    dirs, gen = _policy_dirs(rep), rep.generated
    if not dirs or not gen.get("held"):
        return []
    config, label = rep.config, rep.label
    held, responses, names, models = gen["held"], gen["responses"], gen["names"], gen["dirs"]
    # the gold PM judges when the run has one, as in the main win-rate table
    pm_dir, gold = _common_pm(rep), gold_judge(rep)
    judge = str(gold) if gold is not None else config.models.judge

    def answers(kind: str, a) -> dict[str, str] | None:
        d = models.get((kind, a))
        return responses.get(names.get(str(d))) if d is not None else None

    scores, data = {}, {}
    by_sft: dict[str, dict] = {}  # the PM score of each distinct SFT model (arms may train their own)
    for a in dirs:
        sft = answers("sl-cai", a)
        if pm_dir and sft and str(models[("sl-cai", a)]) not in by_sft:
            by_sft[str(models[("sl-cai", a)])] = pm_scores(
                pm_dir, config.settings, held, sft, config.report.batch_size
            )
    baseline = {a: by_sft.get(str(models.get(("sl-cai", a)))) for a in dirs}  # each arm's own SFT model
    for a in [a for a in dirs if pm_dir and answers("final", a)]:
        scores[a] = pm_scores(pm_dir, config.settings, held, answers("final", a), config.report.batch_size)
    wins = _wins_vs_sft(config, dirs, held, answers, models, gold)
    gain = {a: paired_gain(scores.get(a), baseline[a]) for a in dirs}
    rows = [["algorithm"] + [algorithm_label(d) for d in dirs.values()]]
    if pm_dir:
        rows.append(
            ["PM score of held-out responses [95% CI] (n)"] + [with_ci(scores.get(a), "mean") for a in dirs]
        )
        rows.append(["… its SFT model's (baseline)"] + [with_ci(baseline[a], "mean") for a in dirs])
        rows.append(
            ["final − SFT, paired over prompts [95% CI] (n)"] + [with_ci(gain[a], "mean") for a in dirs]
        )
    kl = kl_to_sft(rep, list(dirs), dirs, _config)
    rows.append(table_row(kl))
    how, notes, caveat = judge_notes(rep, judge, gold is not None, "the SFT model")
    mark = " †" if caveat else ""
    rows.append(
        ["win rate against the SFT model [95% CI] (n)"]
        + [with_ci(wins.get(a), "win_rate") + (mark if wins.get(a) else "") for a in dirs]
    )
    rows += _stage_rows(dirs)
    for a in dirs:
        data[label(a)] = {
            "pm_score": _public(scores.get(a)),
            "sft_pm_score": _public(baseline[a]),
            "pm_score_gain_vs_sft": gain[a],
            "win_rate_vs_sft": wins.get(a),
            "sqrt_kl": (as_sqrt(kl[a]) or {}).get("mean"),
            "kl": kl[a],
        }
    over = _over_seeds(rep, dirs, scores, baseline, kl, wins)
    rep.data["policies"] = {
        "pm": str(pm_dir) if pm_dir else None,
        "judge": judge,
        "judge_caveat": caveat,
        "arms": data,
        **({"over_seeds": over} if over else {}),
    }
    md = ["## Policies side by side\n"]
    md.append(
        f"The final policy of each arm on the same {len(held)} held-out prompts. PM score: the normalised score "
        f"of one common preference model (`{pm_dir}`; 0 is the mean of its reference responses, 1 their standard "
        "deviation: its `score_norm.json` says which responses) for every arm, beside the arm's SFT model's, and "
        "their difference prompt by prompt (paired bootstrap CI); "
        f"win rate of each final policy's response against the SFT model's, {how}; a tie counts half, "
        f"0.5 = no difference. {HOW_MEASURED}\n"
    )
    md += notes
    md.append(table(["", *[label(a) for a in dirs]], rows))
    if caveat:
        md.append(f"> **Caveat (†):** {caveat}.\n")
    if small_n(len(held)):
        md.append(f"> **Small sample:** {small_n_note(len(held), 'held-out prompts')}.\n")
    return md + _norm_note(pm_dir) + seeds.section(over)


def _over_seeds(rep, dirs: dict, scores: dict, baseline: dict, kl: dict, wins: dict) -> list[dict]:
    """The arms that differ only in policy.seed, read together (cai.report.seeds)."""
    inputs = {a: [str(rep.index.stage_dir(s, a)) for s in ("sft", "preference_model")] for a in dirs}
    groups = seeds.seed_groups({a: _config(d) for a, d in dirs.items()}, inputs)
    gains = {a: prompt_gains(scores.get(a), baseline[a]) for a in dirs}
    sqrt_kl = {a: (as_sqrt(kl[a]) or {}).get("mean") for a in dirs}
    return seeds.over_seeds(groups, gains, sqrt_kl, {a: (wins.get(a) or {}).get("win_rate") for a in dirs})


def _norm_note(pm_dir: Path | None) -> list[str]:
    """A note when the common PM's unit (the spread of its reference responses, score_norm.json) rests on few."""
    norm = (read_json(pm_dir / NORM_FILE) if pm_dir else None) or {}
    n, prompts = norm.get("n"), norm.get("prompts")
    if not small_n(n):
        return []
    to = f" to {prompts} prompt{'s' if prompts != 1 else ''}" if prompts else ""
    return [
        f"> **Small normaliser:** the PM scores above are in units of the standard deviation of {n} reference "
        f"responses{to} (`{NORM_FILE}`); with so few the unit itself is uncertain: compare the arms with one "
        "another and with the SFT model, not with runs normalised elsewhere.\n"
    ]


def rounds_section(rep) -> list[str]:
    """Online rounds of every arm that ran them: score and KL of each round, its fresh labels, and how well the
    PM the policy had optimised agreed with the labeller on them."""
    md = []
    for a, d in _policy_dirs(rep).items():
        rounds = read_json(d / "rounds.json")
        if not isinstance(rounds, list) or len(rounds) < 2:
            continue
        fb, pm = rep.index.stage_dir("feedback", a), rep.index.stage_dir("preference_model", a)
        fb_stats = read_json(fb / "stats.json") if fb else None
        pm_sum = (read_manifest(pm) or {}).get("summary", {}) if pm else {}
        pm_held = (read_json(pm / "eval.json") or {}).get("held_out") if pm else None
        rows = [_round_row(r, fb_stats, pm_sum, pm_held) for r in rounds]
        md.append(f"## Online rounds{f' ({rep.label(a)})' if len(rep.arms) > 1 else ''}\n")
        md.append(
            "Each round after the first samples pairs from the policy the previous round ended with (its folder's "
            "hash is in the round record), the feedback model labels them, and the PM trains further on them with "
            "all earlier pairs. Scores are each round's own PM (normalised anew each round), so compare KL across "
            "rounds and scores within one. Labeller–PM agreement: on the round's fresh pairs, how often the PM the "
            "policy had been optimising ranks the labeller's preferred response higher (ties left out).\n"
        )
        header = [
            "round",
            "updates",
            "score first → last",
            "sqrt(KL) at the end",
            "pairs labelled",
            "labeller confidence |p − 0.5|",
            "labeller–PM agreement [95% CI] (n)",
            "PM held-out accuracy",
        ]
        md.append(table(header, rows))
        rep.data.setdefault("rounds", {})[rep.label(a)] = rounds
    return md


def _round_row(r: dict, fb_stats: dict | None, pm_sum: dict, pm_held: dict | None = None) -> list:
    """One round's table row; round 1's PM is the preference_model stage's (its summary, and `pm_held`, its
    eval.json's held-out block)."""
    first = r.get("round") == 1
    pairs = (fb_stats or {}) if first else (r.get("pairs") or {})
    held = pm_held if first else (r.get("pm_held_out") or {})
    acc = pm_sum.get("held_out_accuracy") if first else held.get("accuracy")
    n = scored_pairs(pm_sum) if first else held.get("n_scored", held.get("n"))
    updates = r.get("updates") or [None, None]
    return [
        r.get("round"),
        f"{updates[0]}–{updates[1]}",
        f"{num(r.get('score_first'))} → {num(r.get('score_last'))}",
        num(r.get("sqrt_kl_last")),
        pairs.get("pairs"),
        num(pairs.get("mean_confidence")),
        "— (the feedback stage's labels)" if first else with_ci(r.get("pm_agreement")),
        with_ci(held_out_result(acc, n, held)),
    ]
