"""What `cai constitution effect` shows: the lines it prints and effect.md (cai.constitution.effect computes).

Every edited principle gets a measured flip rate with its interval, or "not measured: N pairs drew it" and
what to do; the PM verdict is a paired comparison on the pairs whose label flipped, with its interval and n.
Intervals are clustered by prompt, so n (pairs) is shown with the number of prompts they come from.
"""

from __future__ import annotations

from cai.credit import TIE
from cai.markdown import num, quote, with_ci


def _n(r: dict) -> str:
    """'n = 60 pairs of 10 prompts': the interval is clustered by prompt, so both counts matter."""
    return f"n = {r['pairs']} pairs of {r['clusters']} prompts" if "clusters" in r else f"n = {r['pairs']}"


def _rate(r: dict) -> str:
    if r["flip_rate"] is None:
        return r["note"] or "-"
    ci = r["ci95"]
    text = f"flip rate {r['flip_rate']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, {_n(r)})" if ci else "")
    return text + (f"; {r['note']}" if r["note"] else "")


def _overall(s: dict) -> str:
    """The pooled rate with its CI and n, or why there is none (--draw-edited rows are not independent)."""
    if s["flip_rate"] is None:
        return "no pooled rate (the rows of one pair are not independent: see each principle, n = pairs)"
    lo, hi = s["ci95"]
    return f"flip rate {s['flip_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {_n(s)})"


def summary_lines(s: dict) -> list[str]:
    """The lines the command prints."""
    if s["draw_edited"]:
        unit = f"pairs {s.get('independent_pairs', s['pairs'])}  pair x edited principle rows {s['pairs']}"
    else:
        unit = f"pairs {s['pairs']}"
    out = [
        f"{unit}  relabelled {s['relabelled']}  flips {s['flips']}  {_overall(s)}  "
        f"mean |dp| {s['mean_abs_dp']:.4f}"
    ]
    for pid, r in s["per_principle"].items():
        out.append(f"  {pid:24s} {r['change']:22s} drew {r['pairs']:4d}  flips {r['flips']:4d}  {_rate(r)}")
    if s["draw_edited"]:
        out.append(
            "  (--draw-edited: every pair was labelled under each edited principle; rates are conditional on "
            "drawing it, the run's labels change by about rate x its sampling share)"
        )
    if s["unattributed_flips"]:
        out.append(f"  flips not attributable to an edited principle: {len(s['unattributed_flips'])}")
    if s.get("reordered"):
        out.append(f"  {REORDER_NOTE}")
    out += [f"  note: {note}" for note in s.get("notes", [])]
    if "pm" in s:
        pm = s["pm"]
        out.append(
            f"PM agreement (all labelled pairs): old labels {with_ci(pm['agree_old'], 'agreement')}, new labels "
            f"{with_ci(pm['agree_new'], 'agreement')}. {pm['verdict']}"
        )
    return out


REORDER_NOTE = (
    "the principles were reordered: this measurement's coupled draw ignores order, but the stages' seeded "
    "draw picks by position, so a rerun of the feedback stage draws other principles for many pairs"
)


def report_markdown(summary: dict, rows: list[dict], meta: dict, diff_text: str) -> str:
    s = summary
    out = [
        f"# Effect of a constitution edit: {meta['old']} → {meta['new']}",
        "",
        f"- pairs: {meta['sampled']} sampled (seed {meta['seed']}) of {meta['pairs_total']} in `{meta['pairs_file']}`",
        f"- feedback model: `{meta['model']}`; both orders averaged: {meta['both_orders']}; "
        f"principles per pair: {meta['num_principles']} (coupled seeded draw, see `cai/constitution/effect.py`)",
        f"- a flip: p(A) crosses 0.5 by more than {meta['margin']} on both sides; an edited principle drawn by "
        f"fewer than {s['min_pairs']} pairs is not measured",
        (
            "- every pair was labelled under each edited principle (`--draw-edited`): rates are conditional on "
            "drawing the principle"
            if s["draw_edited"]
            else f"- pairs relabelled under NEW (their drawn principles' feedback text differs): {s['relabelled']}; "
            "the others get the same prompt, hence the same label, under OLD and NEW (Δp = 0, no flip)"
        ),
        "",
        "## Diff",
        "",
        "```",
        diff_text,
        "```",
        "",
        "## Overall",
        "",
        "| flip rate | 95% CI (clustered by prompt) | flips | prompts | mean abs Δp |",
        "|---|---|---|---|---|",
        (
            f"| {s['flip_rate']:.3f} | [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | {s['flips']}/{s['pairs']} | "
            f"{s.get('clusters', '-')} | {s['mean_abs_dp']:.4f} |"
            if s["flip_rate"] is not None
            else f"| no pooled rate (--draw-edited: rows of one pair are not independent) | - | "
            f"{s['flips']}/{s['pairs']} rows of {s.get('independent_pairs')} pairs | {s.get('clusters', '-')} | "
            f"{s['mean_abs_dp']:.4f} |"
        ),
        "",
    ]
    if s.get("reordered"):
        out += [f"Note: {REORDER_NOTE}.", ""]
    out += [x for note in s.get("notes", []) for x in (f"Note: {note}.", "")]
    if s["per_principle"]:
        out += [
            "## Per edited principle",
            "",
            "| principle | change | pairs that drew it | their prompts | flips | flip rate | 95% CI | mean abs Δp "
            "| note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for pid, r in s["per_principle"].items():
            ci = "-" if r["ci95"] is None else f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            out.append(
                f"| {pid} | {r['change']} | {r['pairs']} | {r.get('clusters', '-')} | {r['flips']} "
                f"| {num(r['flip_rate'], '.3f', 'not measured')} | {ci} | {num(r['mean_abs_dp'], '.4f', '-')} "
                f"| {r['note'] or ''} |"
            )
        out.append("")
    if s["unattributed_flips"]:
        out += [
            f"Flips not attributable to an edited principle: {len(s['unattributed_flips'])} "
            f"({', '.join(s['unattributed_flips'][:10])}).",
            "",
        ]
    if "pm" in s:
        out += _pm_markdown(s["pm"])
    out += ["## Δp", "", "![histogram of Δp](delta_p.png)", ""]
    return "\n".join(out + flipped_markdown(s["top_flipped"], rows))


def _pm_markdown(pm: dict) -> list[str]:
    """The PM agreement section: each agreement with its interval and n, and the verdict."""
    return [
        "## Preference model agreement",
        "",
        f"PM: `{pm['dir']}`",
        "",
        "PM agreement with each set of labels [95% CI, clustered by prompt] (n pairs, in how many prompts): a PM "
        f"tie counts half, a label within {TIE:g} of 0.5 is left out.",
        "",
        "| labels | PM agrees (all pairs) | PM agrees (relabelled pairs) | PM agrees (flipped pairs) |",
        "|---|---|---|---|",
        *[
            f"| {name} | "
            + " | ".join(
                with_ci(pm[f"agree_{key}{part}"], "agreement") for part in ("", "_relabelled", "_flipped")
            )
            + " |"
            for name, key in (("OLD", "old"), ("NEW", "new"))
        ],
        "",
        f"Relabelled pairs: {pm['relabelled']}. {pm['verdict']}",
        "",
    ]


def flipped_markdown(top: list[str], rows: list[dict]) -> list[str]:
    """The most-changed flipped pairs: prompt, both responses, which label prefers which."""
    by_id = {r["id"]: r for r in rows}
    out = ["## Top flipped pairs", ""] if top else []
    for i, pid in enumerate(top, 1):
        r = by_id[pid]
        last_user = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
        out += [
            f"### {i}. `{pid}`: p(A) {r['p_old']:.3f} → {r['p_new']:.3f}",
            "",
            f"principles: {', '.join(r['old_principles'])} → {', '.join(r['new_principles'])}",
            "",
            "**User:**",
            "",
            quote(last_user),
            "",
            f"**Response A** ({'preferred by NEW' if r['p_new'] > 0.5 else 'preferred by OLD'}):",
            "",
            quote(r["response_a"]),
            "",
            f"**Response B** ({'preferred by NEW' if r['p_new'] <= 0.5 else 'preferred by OLD'}):",
            "",
            quote(r["response_b"]),
            "",
        ]
    return out
