"""How an evaluation's baselines look in the report: rows of a suite table (each baseline with its CI, the lift
over the best one and over the untrained model, the correlation with length) and the warnings beneath it (a
baseline far from chance, a PM that mostly measures length). The numbers come from cai.eval.measure."""

from __future__ import annotations

from cai.eval.baselines import describe
from cai.markdown import with_ci


def lift_cell(lift: dict | None) -> str:
    if not lift or lift.get("value") is None:
        return "—"
    lo, hi = lift["ci95"]
    return f"{lift['value']:+.3f} [{lo:+.2f}, {hi:+.2f}] over {lift['over']} (n = {lift['n']})"


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
