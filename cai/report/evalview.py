"""How an evaluation's baselines look in the report: rows of a suite table (each baseline with its CI, the lift
over the best one and over the untrained model, the correlation with length) and the warnings beneath it (a
baseline far from chance, a PM that mostly measures length). The numbers come from cai.eval.measure."""

from __future__ import annotations

from cai.credit import length_hits
from cai.eval.baselines import compare, describe
from cai.markdown import with_ci


def lift_cell(lift: dict | None) -> str:
    if not lift or lift.get("value") is None:
        return "—"
    lo, hi = lift["ci95"]
    small = ", small: unreliable" if lift.get("small_sample") else ""
    return f"{lift['value']:+.3f} [{lo:+.2f}, {hi:+.2f}] over {lift['over']} (n = {lift['n']}{small})"


def baseline_rows(suite: str, results: list[dict]) -> list[list]:
    """Table rows for one suite, one cell per PM (each result from cai.eval.measure.evaluate_pm)."""
    names: list[str] = []
    for r in results:
        names += [k for k in r.get("baselines") or {} if k not in names]
    rows = [
        [f"{suite}: baseline, {k}"] + [with_ci((r.get("baselines") or {}).get(k)) for r in results]
        for k in names
    ]
    if names:
        rows.append(
            [f"{suite}: **lift over the best baseline**"] + [lift_cell(r.get("lift")) for r in results]
        )
    if any(r.get("lift_untrained") for r in results):
        rows.append(
            [f"{suite}: lift over the untrained model"]
            + [lift_cell(r.get("lift_untrained")) for r in results]
        )
    if any(r.get("length") for r in results):
        rows.append(
            [f"{suite}: correlation of score with length (r)"]
            + [with_ci(r.get("length"), "r") for r in results]
        )
    return rows


def baseline_warnings(evals: dict[str, dict[str, dict]], name_pm: bool) -> list[str]:
    """'> **Warning**' lines for every PM and suite: baselines far from chance, scores that mostly measure length."""
    out = []
    for pm, by_suite in evals.items():
        for suite, res in by_suite.items():
            _, warnings = describe(res or {})
            who = f"{suite}, {pm}" if name_pm else suite
            out += [f"> **Warning ({who}):** {w}.\n" for w in warnings]
    return out


def check_baseline_rows(checks: list[dict | None]) -> list[list]:
    """Rows for the labeller check: how often preferring the longer or the shorter reply agrees with the human
    choice on the same pairs, and the labeller's lift over the better of the two (checks from feedback/check.json
    that carry per-pair `hits` and `lengths`)."""
    res = []
    for c in checks:
        if not c or not c.get("hits") or len(c.get("lengths") or []) != len(c["hits"]):
            res.append({})
            continue
        res.append(compare(c["hits"], length_hits(c["lengths"], [0] * len(c["hits"])), 0.5, 0))
    if not any(res):
        return []
    rows = [
        [f"baseline, {k} (agreement)"] + [with_ci(r.get("baselines", {}).get(k)) for r in res]
        for k in ("prefer longer", "prefer shorter")
    ]
    rows.append(["lift over the best baseline"] + [lift_cell(r.get("lift")) for r in res])
    return rows
