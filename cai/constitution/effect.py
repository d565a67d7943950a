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

An edited principle that few pairs draw is not measured: below `min_pairs` its result is "not measured: N
pairs drew it", with what to do. `draw_edited` measures it anyway: every pair is labelled once per edited
principle with that principle forced into both draws where it exists (an added principle takes the last slot
of the pair's OLD draw, exactly what happens when it wins the race; a removed one is forced into OLD only), so
OLD and NEW still differ by the edit alone, and the rates are conditional on drawing the principle. A flip is a
label that crosses 0.5 by more than `margin` on both sides (0.499 → 0.503 is not one).
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

from cai.constitution.schema import diff
from cai.errors import UserError
from cai.feedback.labeller import PairToLabel
from cai.plots import delta_histogram
from cai.stats import wilson_ci
from cai.yamlio import iter_jsonl

MIN_PAIRS = 10  # an edited principle drawn by fewer pairs is "not measured"
FLIP_MARGIN = 0.05  # a flip crosses 0.5 by more than this on both sides


def race_key(seed: int, pair_id: str, principle_id: str, weight: float) -> float:
    h = hashlib.sha256(f"{seed}\x00{pair_id}\x00{principle_id}".encode()).digest()
    u = (int.from_bytes(h[:8], "big") + 0.5) / 2**64
    return -math.log(u) / weight


def ranked(constitution, pair_id: str, seed: int) -> list:
    """Every principle in the order of this pair's race (smallest key first)."""
    return sorted(constitution.principles, key=lambda p: (race_key(seed, pair_id, p.id, p.weight), p.id))


def draw(constitution, pair_id: str, seed: int, k: int = 1) -> list:
    """The k principles this pair draws from the constitution (coupled weighted sampling, see module doc)."""
    order = ranked(constitution, pair_id, seed)
    return order[: max(1, min(k, len(order)))]


def forced_draws(old, new, pid: str, kind: str, pair_id: str, seed: int, k: int = 1) -> tuple[list, list]:
    """(OLD draw, NEW draw) of a pair with the edited principle `pid` forced in: first in both where it exists,
    the other k-1 slots from the pair's own race, so the two differ by the edit alone."""
    k = max(1, k)
    ro, rn = ranked(old, pair_id, seed), ranked(new, pair_id, seed)
    rest_o, rest_n = [p for p in ro if p.id != pid], [p for p in rn if p.id != pid]
    if kind == "added":
        return ro[:k], [new.by_id()[pid]] + rest_n[: k - 1]
    if kind == "removed":
        return [old.by_id()[pid]] + rest_o[: k - 1], rn[:k]
    return [old.by_id()[pid]] + rest_o[: k - 1], [new.by_id()[pid]] + rest_n[: k - 1]


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


def edits(old, new) -> dict[str, str]:
    """{principle id: 'added' | 'removed' | 'changed: field, ...'} of an edit."""
    d = diff(old, new)
    out = {pid: kind for kind in ("added", "removed") for pid in d[kind]}
    out.update({pid: "changed: " + ", ".join(fields) for pid, fields in d["changed"].items()})
    return out


def _step(pair: dict, po: list, pn: list, touched: list[str], forced: str | None = None) -> dict:
    return {
        "pair": pair,
        "old": po,
        "new": pn,
        "same_prompt": prompt_key(po) == prompt_key(pn),
        "touched": touched,
        "forced": forced,
    }


def plan(pairs: list[dict], old, new, seed: int, k: int = 1, draw_edited: bool = False) -> list[dict]:
    """Per pair: the OLD and NEW draws, whether NEW needs its own label, and the edited principles it touches;
    with `draw_edited`, one step per (pair, edited principle) with that principle forced in."""
    edited = edits(old, new)
    if draw_edited:
        return [
            _step(pair, *forced_draws(old, new, pid, kind.split(":")[0], pair["id"], seed, k), [pid], pid)
            for pid, kind in edited.items()
            for pair in pairs
        ]
    out = []
    for pair in pairs:
        po, pn = draw(old, pair["id"], seed, k), draw(new, pair["id"], seed, k)
        ids = [p.id for p in po] + [p.id for p in pn]
        out.append(_step(pair, po, pn, sorted({pid for pid in ids if pid in edited})))
    return out


def delta(row: dict) -> float:
    """p_new − p_old; 0 for a pair whose prompt the edit leaves unchanged (labelled or not)."""
    return 0.0 if row["p_old"] is None else row["p_new"] - row["p_old"]


def flipped(p_old: float, p_new: float, margin: float = FLIP_MARGIN) -> bool:
    """The preferred response changed: p(A) crossed 0.5 by more than `margin` on both sides."""
    lo, hi = 0.5 - margin, 0.5 + margin
    return (p_old < lo and p_new > hi) or (p_old > hi and p_new < lo)


def _principle_result(pid: str, change: str, sel: list[dict], min_pairs: int, draw_edited: bool) -> dict:
    f = sum(r["flipped"] for r in sel)
    exact = change.startswith("changed") and not {"feedback", "weight"} & set(change[9:].split(", "))
    measured = len(sel) >= min_pairs or exact
    plo, phi = wilson_ci(f, len(sel))
    res = {
        "change": change,
        "pairs": len(sel),
        "measured": measured,
        "flips": f,
        "flip_rate": f / len(sel) if sel and measured else None,
        "ci95": [plo, phi] if sel and measured else None,
        "mean_abs_dp": sum(abs(delta(r)) for r in sel) / len(sel) if sel else None,
        "note": None,
    }
    if exact:
        res["note"] = "its feedback text and weight are unchanged: no feedback label can change (exactly 0)"
    elif not measured:
        res["note"] = f"not measured: {len(sel)} pair(s) drew it (fewer than {min_pairs}); " + (
            "give more pairs (--pairs from a bigger run, or no --limit)"
            if draw_edited
            else "rerun with --draw-edited to label every pair under it, or give more pairs"
        )
    return res


def summarise(
    rows: list[dict],
    edited: dict[str, str],
    top: int = 5,
    min_pairs: int = MIN_PAIRS,
    draw_edited: bool = False,
) -> dict:
    """Rows: {id, p_old, p_new, touched, ...}. Overall flip rate with CI, mean |Δp|, per-edited-principle rates
    (None, with a note, below `min_pairs` pairs)."""
    n = len(rows)
    flips = [r for r in rows if r["flipped"]]
    lo, hi = wilson_ci(len(flips), n)
    per = {
        pid: _principle_result(pid, kind, [r for r in rows if pid in r["touched"]], min_pairs, draw_edited)
        for pid, kind in edited.items()
    }
    return {
        "pairs": n,
        "flips": len(flips),
        "flip_rate": len(flips) / n if n else 0.0,
        "ci95": [lo, hi],
        "mean_abs_dp": sum(abs(delta(r)) for r in rows) / n if n else 0.0,
        "relabelled": sum(not r["same_prompt"] for r in rows),
        "draw_edited": draw_edited,
        "min_pairs": min_pairs,
        "measured": all(r["measured"] for r in per.values()),
        "per_principle": per,
        "unattributed_flips": [r["id"] for r in flips if not r["touched"]],
        "top_flipped": [r["id"] for r in sorted(flips, key=lambda r: -abs(delta(r)))[:top]],
    }


def pm_agreement(
    rows: list[dict], scores: list[tuple[float, float]], pm_dir: str, min_pairs: int = MIN_PAIRS
) -> dict:
    """How often the PM's preference (r_a > r_b) agrees with the OLD and the NEW labels, on all labelled pairs
    and on the relabelled ones (whose prompt the edit changed); a verdict only from enough relabelled pairs."""

    def agree(sel, key):
        pairs = [(r, s) for r, s in zip(rows, scores) if r["p_old"] is not None and sel(r)]
        if not pairs:
            return None
        return sum((s[0] > s[1]) == (r[key] > 0.5) for r, s in pairs) / len(pairs)

    relabelled = sum(1 for r in rows if r["p_old"] is not None and not r.get("same_prompt", False))
    res = {
        "dir": pm_dir,
        "relabelled": relabelled,
        "agree_old": agree(lambda r: True, "p_old"),
        "agree_new": agree(lambda r: True, "p_new"),
        "agree_old_relabelled": agree(lambda r: not r.get("same_prompt", False), "p_old"),
        "agree_new_relabelled": agree(lambda r: not r.get("same_prompt", False), "p_new"),
        "agree_old_flipped": agree(lambda r: r["flipped"], "p_old"),
        "agree_new_flipped": agree(lambda r: r["flipped"], "p_new"),
    }
    if relabelled < min_pairs:
        res["verdict"] = (
            f"Not measured: {relabelled} pair(s) were relabelled under NEW (fewer than {min_pairs}), so the PM's "
            "agreement says nothing about the edit; rerun with --draw-edited or more pairs."
        )
        return res
    gap = res["agree_old_relabelled"] - res["agree_new_relabelled"]
    res["verdict"] = (
        f"On the {relabelled} relabelled pairs the PM agrees with the OLD labels {gap:+.3f} more often than with "
        "the NEW ones: "
        + (
            "retrain the PM on NEW labels to carry the edit into RL."
            if gap > 0.02
            else "the edit changes little of what the PM already prefers."
        )
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
    *,
    draw_edited: bool = False,
    margin: float = FLIP_MARGIN,
    min_pairs: int = MIN_PAIRS,
):
    """Label `pairs` under OLD and NEW (coupled principle draws; with `draw_edited`, every pair under each
    edited principle); per-pair rows and the summary.

    A pair whose drawn principles have the same feedback texts in OLD and NEW gets the same prompt, hence the
    same label, under both: it cannot flip and its Δp is 0, so it is only labelled with `all_pairs` (needed
    for PM agreement, or to see the labels themselves). Its p_old/p_new are None otherwise."""
    steps = plan(pairs, old, new, seed, num_principles, draw_edited)

    def key(s):
        return f"{s['pair']['id']}@{s['forced']}" if s["forced"] else s["pair"]["id"]

    def label(sel, side, desc):
        if not sel:
            return {}
        ps = [
            PairToLabel(key(s), s["pair"]["messages"], s["pair"]["response_a"], s["pair"]["response_b"])
            for s in sel
        ]
        return {r.id: r for r in labeller.label(ps, [s[side] for s in sel], desc=desc)}

    redo = [s for s in steps if not s["same_prompt"]]
    old_res = label(steps if all_pairs else redo, "old", "label OLD")
    new_res = label(redo, "new", "label NEW")
    rows = []
    for s in steps:
        pair = s["pair"]
        ro = old_res.get(key(s))
        rn = new_res.get(key(s), ro)
        rows.append(
            {
                "id": key(s),
                "pair": pair["id"],
                "p_old": ro.p_a if ro else None,
                "p_new": rn.p_a if rn else None,
                "flipped": bool(ro and flipped(ro.p_a, rn.p_a, margin)),
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
    return rows, summarise(rows, edits(old, new), top, min_pairs, draw_edited)


def write_histogram(rows: list[dict], path: Path, title: str) -> Path:
    """The Δp histogram of an effect run (cai.plots.delta_histogram) from its per-pair rows."""
    changed = [r for r in rows if not r["same_prompt"] and r["p_old"] is not None]
    kept = [delta(r) for r in changed if not r["flipped"]]
    flips = [delta(r) for r in changed if r["flipped"]]
    return delta_histogram(path, kept, flips, len(rows) - len(changed), title)
