"""`cai constitution effect OLD NEW`: the measured effect of a constitution edit on existing AI labels.

The same sample of response pairs is labelled under both constitutions by the same feedback model, with the
same seeds and the same order-averaging (through `cai.labels.Labeller`, the feedback stage's own code).

Principle sampling is *coupled* between OLD and NEW so that every change of label can be traced to the edit.
For each pair, every principle id gets a seeded race key -ln(u)/weight with u = hash(seed, pair id, principle
id) in (0, 1); the pair draws the k principles with the smallest keys. This is weighted sampling (without
replacement, Efraimidis–Spirakis): P(principle i drawn first) = w_i / Σw, as with `Constitution.sample`.
Because a principle's key depends only on (seed, pair, its own id, its weight):
- OLD = NEW gives the same draws and the same prompt for every pair, so the flip rate is exactly 0;
- adding a principle changes a pair's draw only when the new principle wins the race for that pair, so every
  changed draw (and every flip) is attributable to it; removing one or changing its weight changes only the
  pairs whose old or new draw contains it; rewording one changes only the pairs that drew it.
A pair whose drawn principles have the same feedback texts under OLD and NEW has, by construction, the same
prompt: it is labelled once and shares that label (no second forward pass, no floating-point noise).
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from cai.constitution.schema import diff
from cai.errors import UserError
from cai.feedback.labeller import PairToLabel
from cai.markdown import quote
from cai.plots import delta_histogram
from cai.stats import wilson_ci
from cai.yamlio import iter_jsonl


def race_key(seed: int, pair_id: str, principle_id: str, weight: float) -> float:
    h = hashlib.sha256(f"{seed}\x00{pair_id}\x00{principle_id}".encode()).digest()
    u = (int.from_bytes(h[:8], "big") + 0.5) / 2**64
    return -math.log(u) / weight


def draw(constitution, pair_id: str, seed: int, k: int = 1) -> list:
    """The k principles this pair draws from the constitution (coupled weighted sampling, see module doc)."""
    ranked = sorted(constitution.principles, key=lambda p: (race_key(seed, pair_id, p.id, p.weight), p.id))
    return ranked[: max(1, min(k, len(ranked)))]


def prompt_key(principles) -> tuple:
    """What of the drawn principles reaches the feedback prompt: ids and feedback instructions."""
    return tuple((p.id, p.feedback.strip()) for p in principles)


def read_pairs(path: str | Path) -> list[dict]:
    """AI-labelled rows of a feedback pairs.jsonl as {id, messages, response_a, response_b, p_a_run}; the chat
    messages may be under "messages" or "prompt". Human-mix rows are skipped. Errors name file:line."""
    path = Path(path)
    rows = []
    for n, row in iter_jsonl(path):
        if row.get("source") == "human":  # human-mix pairs carry human labels, not AI feedback
            continue
        msgs = row.get("prompt", row.get("messages"))
        if isinstance(msgs, str):
            msgs = [{"role": "user", "content": msgs}]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
        )
        if not ok:
            raise UserError(
                f"{path}:{n}: key 'prompt': a list of chat messages {{role, content}} is expected"
            )
        for key in ("response_a", "response_b"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{path}:{n}: key '{key}': a string is expected")
        rows.append(
            {
                "id": str(row.get("id", f"line{n}")),
                "messages": msgs,
                "response_a": row["response_a"],
                "response_b": row["response_b"],
                "p_a_run": row.get("p_a"),
            }
        )
    if not rows:
        raise UserError(f"{path}: no AI-labelled pairs")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: pair ids are not unique")
    return rows


def sample_pairs(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded sample of at most `limit` pairs, kept in file order."""
    if not limit or limit >= len(rows):
        return list(rows)
    keep = set(random.Random(seed).sample(range(len(rows)), limit))
    return [r for i, r in enumerate(rows) if i in keep]


def plan(pairs: list[dict], old, new, seed: int, k: int = 1) -> list[dict]:
    """Per pair: the OLD and NEW draws, whether NEW needs its own label, and the edited principles it touches."""
    d = diff(old, new)
    edited = {pid: kind for kind in ("added", "removed") for pid in d[kind]}
    edited.update({pid: "changed" for pid in d["changed"]})
    out = []
    for pair in pairs:
        po, pn = draw(old, pair["id"], seed, k), draw(new, pair["id"], seed, k)
        ids = [p.id for p in po] + [p.id for p in pn]
        out.append(
            {
                "pair": pair,
                "old": po,
                "new": pn,
                "same_prompt": prompt_key(po) == prompt_key(pn),
                "touched": sorted({pid for pid in ids if pid in edited}),
            }
        )
    return out


def delta(row: dict) -> float:
    """p_new − p_old; 0 for a pair whose prompt the edit leaves unchanged (labelled or not)."""
    return 0.0 if row["p_old"] is None else row["p_new"] - row["p_old"]


def flipped(p_old: float, p_new: float) -> bool:
    """The preferred response changed (p(A) crossed 0.5)."""
    return (p_old > 0.5) != (p_new > 0.5)


def summarise(rows: list[dict], d: dict, top: int = 5) -> dict:
    """Rows: {id, p_old, p_new, touched, ...}. Overall flip rate with CI, mean |Δp|, per-edited-principle rates."""
    n = len(rows)
    flips = [r for r in rows if r["flipped"]]
    lo, hi = wilson_ci(len(flips), n)
    per = {}
    kinds = {pid: kind for kind in ("added", "removed") for pid in d[kind]}
    kinds.update({pid: "changed" for pid in d["changed"]})
    for pid, kind in kinds.items():
        sel = [r for r in rows if pid in r["touched"]]
        f = sum(r["flipped"] for r in sel)
        plo, phi = wilson_ci(f, len(sel))
        per[pid] = {
            "change": kind if kind != "changed" else "changed: " + ", ".join(d["changed"][pid]),
            "pairs": len(sel),
            "flips": f,
            "flip_rate": f / len(sel) if sel else None,
            "ci95": [plo, phi] if sel else None,
            "mean_abs_dp": sum(abs(delta(r)) for r in sel) / len(sel) if sel else None,
        }
    unattributed = [r["id"] for r in flips if not r["touched"]]
    return {
        "pairs": n,
        "flips": len(flips),
        "flip_rate": len(flips) / n if n else 0.0,
        "ci95": [lo, hi],
        "mean_abs_dp": sum(abs(delta(r)) for r in rows) / n if n else 0.0,
        "relabelled": sum(not r["same_prompt"] for r in rows),
        "per_principle": per,
        "unattributed_flips": unattributed,
        "top_flipped": [r["id"] for r in sorted(flips, key=lambda r: -abs(delta(r)))[:top]],
    }


def report_markdown(summary: dict, rows: list[dict], meta: dict, diff_text: str) -> str:
    s = summary

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    out = [
        f"# Effect of a constitution edit: {meta['old']} → {meta['new']}",
        "",
        f"- pairs: {s['pairs']} sampled (seed {meta['seed']}) of {meta['pairs_total']} in `{meta['pairs_file']}`",
        f"- feedback model: `{meta['model']}`; both orders averaged: {meta['both_orders']}; "
        f"principles per pair: {meta['num_principles']} (coupled seeded draw, see `cai/constitution/effect.py`)",
        f"- pairs relabelled under NEW (their drawn principles' feedback text differs): {s['relabelled']}; the "
        "others get the same prompt, hence the same label, under OLD and NEW (Δp = 0, no flip)",
        "",
        "## Diff",
        "",
        "```",
        diff_text,
        "```",
        "",
        "## Overall",
        "",
        "| flip rate | 95% CI | flips | mean abs Δp |",
        "|---|---|---|---|",
        f"| {s['flip_rate']:.3f} | [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | {s['flips']}/{s['pairs']} | {s['mean_abs_dp']:.4f} |",
        "",
    ]
    if s["per_principle"]:
        out += [
            "## Per edited principle",
            "",
            "| principle | change | pairs that drew it | flips | flip rate | 95% CI | mean abs Δp |",
            "|---|---|---|---|---|---|---|",
        ]
        for pid, r in s["per_principle"].items():
            ci = "-" if r["ci95"] is None else f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            out.append(
                f"| {pid} | {r['change']} | {r['pairs']} | {r['flips']} | {fmt(r['flip_rate'])} | {ci} | {fmt(r['mean_abs_dp'], '.4f')} |"
            )
        out.append("")
    if s["unattributed_flips"]:
        out += [
            f"Flips not attributable to an edited principle: {len(s['unattributed_flips'])} "
            f"({', '.join(s['unattributed_flips'][:10])}).",
            "",
        ]
    if "pm" in s:
        pm = s["pm"]
        out += [
            "## Preference model agreement",
            "",
            f"PM: `{pm['dir']}`",
            "",
            "| labels | PM agrees (all pairs) | PM agrees (flipped pairs) |",
            "|---|---|---|",
            f"| OLD | {fmt(pm['agree_old'])} | {fmt(pm['agree_old_flipped'])} |",
            f"| NEW | {fmt(pm['agree_new'])} | {fmt(pm['agree_new_flipped'])} |",
            "",
            pm["verdict"],
            "",
        ]
    out += ["## Δp", "", "![histogram of Δp](delta_p.png)", ""]
    return "\n".join(out + flipped_markdown(s["top_flipped"], rows))


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


def pm_agreement(rows: list[dict], scores: list[tuple[float, float]], pm_dir: str) -> dict:
    """How often the PM's preference (r_a > r_b) agrees with the OLD and the NEW labels."""

    def agree(sel, key):
        pairs = [(r, s) for r, s in zip(rows, scores) if r["p_old"] is not None and sel(r)]
        if not pairs:
            return None
        return sum((s[0] > s[1]) == (r[key] > 0.5) for r, s in pairs) / len(pairs)

    res = {
        "dir": pm_dir,
        "agree_old": agree(lambda r: True, "p_old"),
        "agree_new": agree(lambda r: True, "p_new"),
        "agree_old_flipped": agree(lambda r: r["flipped"], "p_old"),
        "agree_new_flipped": agree(lambda r: r["flipped"], "p_new"),
    }
    gap = (res["agree_old"] or 0) - (res["agree_new"] or 0)
    res["verdict"] = f"The PM agrees with the OLD labels {gap:+.3f} more often than with the NEW ones: " + (
        "retrain the PM on NEW labels to carry the edit into RL."
        if gap > 0.02
        else "the edit changes little of what the PM already prefers."
    )
    return res


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


def write_histogram(rows: list[dict], path: Path, title: str) -> Path:
    """The Δp histogram of an effect run (cai.plots.delta_histogram) from its per-pair rows."""
    changed = [r for r in rows if not r["same_prompt"] and r["p_old"] is not None]
    kept = [delta(r) for r in changed if not r["flipped"]]
    flips = [delta(r) for r in changed if r["flipped"]]
    return delta_histogram(path, kept, flips, len(rows) - len(changed), title)
