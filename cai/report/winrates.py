"""The report's win-rate section: the table of each arm's SL-CAI model and final policy against the initial model
(overall and per prompt kind), who judged it and why its numbers may carry no signal (a judge that failed or
never met its labeller check, a judge that is the feedback model itself), and the held-out prompts it uses
interleaved by kind."""

from __future__ import annotations

import json
from pathlib import Path

from cai.credit import TIE
from cai.markdown import table
from cai.report.compute import JUDGE_HELPFUL, JUDGE_PRINCIPLE
from cai.report.overopt import gold_warning
from cai.stats import small_n, small_n_note


def judge_caveat(rep, judge: str) -> str | None:
    """Why the judge's numbers may carry no signal: it is a feedback model of this run whose labeller check was
    not above chance (or it was never checked against human labels); None when it passed the check."""
    checked = False
    for a in rep.arms:
        d = rep.index.stage_dir("feedback", a)
        stats = d / "stats.json" if d else None
        used = json.loads(stats.read_text()).get("feedback_model") if stats and stats.is_file() else None
        check = (rep.data.get("labeller_check") or {}).get(rep.label(a))
        if used != judge or not check:
            continue
        checked = True
        if not check.get("above_chance"):
            lo, hi = check["ci95"]
            return (
                f"the judge `{judge}` failed its labeller check in this run: it agrees with human harmlessness labels "
                f"on {check['agreement']:.2f} [{lo:.2f}, {hi:.2f}] of {check['n']} pairs, not above chance, so these "
                "win rates say nothing about harmlessness; name a capable judge in models.judge"
            )
    if checked:
        return None
    return (
        f"the judge `{judge}` was not checked against human labels in this run (feedback.check_set checks "
        "models.feedback): these win rates are only as good as an unmeasured judge"
    )


def mix_kinds(rows: list[dict]) -> list[dict]:
    """Prompts interleaved by kind (red-team, helpful, red-team, ...), so any prefix covers both kinds."""
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        kinds.setdefault(r.get("kind") or "red_team", []).append(r)
    groups = list(kinds.values())
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def gold_judge(rep) -> Path | None:
    """The gold PM that judges win rates when the run trained one (stage `gold`), else None (a labeller judges)."""
    gold = rep.index.stage_dir("gold", rep.arms[0])
    return gold / "model" if gold is not None and (gold / "model" / "config.json").is_file() else None


def judge_notes(rep, judge: str, gold: bool, against: str) -> tuple[str, list[str], str | None]:
    """How win rates against `against` ('the initial model', 'the SFT model') were judged, in words; the notes
    beneath their table (a gold PM without demonstrated signal, a judge that is the feedback model); and the
    caveat their cells are marked with (judge_caveat; None for the gold PM or a judge that passed its check)."""
    if gold:
        how = (
            f"judged by the gold PM (`{judge}`), trained on human preference pairs: a win is a higher gold "
            f"score than {against}'s response to the same prompt"
        )
    else:
        how = (
            f"judged by `{judge}` (one common judge for every arm, never an arm's own PM) asked “"
            f"{JUDGE_PRINCIPLE}” on red-team prompts and “{JUDGE_HELPFUL}” on helpful ones; both orders are "
            f"averaged, and a p(candidate better) within {TIE:g} of 0.5 is a tie"
        )
    notes = []
    if gold and gold_warning(Path(judge).parent):
        notes.append(f"> **Warning:** {gold_warning(Path(judge).parent)}.\n")
    if not gold and judge == rep.config.models.feedback:
        notes.append(
            "> **Note:** the judge is the feedback model whose labels trained the PM, so it is not independent; "
            "`gold.enabled: true` (with `gold.data`) makes an independent gold PM the judge.\n"
        )
    return how, notes, None if gold else judge_caveat(rep, judge)


def win_rate_md(rep, wr: dict, n_held: int, names: dict) -> list[str]:
    """The win-rate table: one column per arm; overall and per prompt kind."""
    arms, label, config = rep.arms, rep.label, rep.config
    how, notes, caveat = judge_notes(rep, wr["judge"], wr["principle"] is None, "the initial model")
    md = ["## Win rate against the initial model\n"]
    md.append(
        f"On {n_held} held-out prompts, {how}; a tie counts half; 0.5 means no difference from the initial "
        f"model `{config.models.policy}` (95% Wilson CI).\n"
    )
    md += notes
    wr["judge_caveat"] = caveat

    def cell(kind: str, a, by: str | None = None) -> str:
        r = wr["results"].get(names.get((kind, a)))
        r = (r or {}).get("by_kind", {}).get(by) if by else r
        if not r:
            return "—"
        small = ", small" if small_n(r["n"]) else ""
        mark = " †" if caveat else ""
        return f"{r['win_rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] (n = {r['n']}{small}){mark}"

    kinds = sorted({k for r in wr["results"].values() for k in r.get("by_kind", {})})
    rows = [["SL-CAI model (sft) vs initial"] + [cell("sl-cai", a) for a in arms]]
    rows += [[f"SL-CAI model, {k} prompts"] + [cell("sl-cai", a, k) for a in arms] for k in kinds]
    rows += [["final policy vs initial"] + [cell("final", a) for a in arms]]
    rows += [[f"final policy, {k} prompts"] + [cell("final", a, k) for a in arms] for k in kinds]
    md.append(table(["", *[label(a) for a in arms]], rows))
    if caveat:
        md.append(f"> **Caveat (†):** {caveat}.\n")
    if small_n(n_held):
        md.append(f"> **Small sample:** {small_n_note(n_held, 'held-out prompts')}.\n")
    return md
