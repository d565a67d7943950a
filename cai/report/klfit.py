"""`cai analyze kl-reward`: PM reward against sqrt(KL) over policy training, after Bai et al. 2022.

The HH-RLHF paper found the preference-model score roughly linear in sqrt(KL(π‖π_ref)) during RLHF:
reward = a + b·sqrt(KL). We fit that line over each policy log (`objective/score` against KL: PPO, RLOO and GRPO
log them every update, DPO at each probe), report a, b and
R², draw several runs on one plot (a β sweep, arms with different constitutions), and warn when the curve
bends at high KL — reward flat or falling while KL keeps growing, the sign that the policy is over-optimising
the preference model.

KL is `objective/kl_k3`, the k3 estimate per sequence: unbiased and never negative, so its square root exists.
`objective/kl` is the estimator the reward's penalty used (`ppo.kl_estimator`; k1 can be negative). A log
without the k3 column (written before it existed) falls back to `objective/kl`, and an update whose estimate is
negative is left out of the fit with a warning that says how many: nothing is clamped.
"""

from __future__ import annotations

import math
from pathlib import Path

from cai.config.layout import plan
from cai.config.load import RECIPE_FILE, load_run_recipe
from cai.errors import UserError
from cai.plots import plot_kl_reward
from cai.runtime.rundir import read_jsonl, write_json
from cai.stats import fit_through_origin, linear_fit, slope_ci

SCORE, KL, KL_K3 = "objective/score", "objective/kl", "objective/kl_k3"
STAGE_DIRS = ("policy", "ppo")  # the policy stage's folder; 'ppo' in runs made before it was renamed
KL_NAMES = {
    KL_K3: "k3 estimate (never negative)",
    KL: "the reward's per-token estimator (ppo.kl_estimator; k1 can be negative)",
}


def fit_sqrt_kl(kl: list[float], reward: list[float]) -> dict:
    """Fit reward = a + b·sqrt(KL); every KL must be ≥ 0 (a negative estimate has no square root)."""
    if len(kl) != len(reward):
        raise ValueError("kl and reward need the same length")
    if any(k < 0 for k in kl):
        raise ValueError("sqrt(KL) needs KL >= 0: fit the k3 estimate, or leave negative estimates out")
    xs = [math.sqrt(float(k)) for k in kl]
    fit = linear_fit(xs, [float(r) for r in reward])
    fit.update(
        kl_max=max(kl), sqrt_kl_max=max(xs), reward_first=float(reward[0]), reward_last=float(reward[-1])
    )
    return fit


def fit_gao(kl: list[float], gain: list[float]) -> dict | None:
    """Gao et al. 2022's form for RL, gain = d·(α − β·ln d) with d = sqrt(KL), by least squares through the origin
    (`gain` is the score minus the initial policy's, so it is 0 at d = 0; R² is the uncentred one of a fit through
    the origin). With α > 0 and β > 0 the predicted gain rises, then peaks at d* = exp(α/β − 1): past that KL,
    optimising the proxy lowers this score. None with fewer than 3 points at d > 0 or collinear features."""
    d = [math.sqrt(max(float(k), 0.0)) for k in kl]
    f2 = [-x * math.log(x) if x > 0 else 0.0 for x in d]
    if sum(x > 0 for x in d) < 3:
        return None
    try:
        alpha, beta = fit_through_origin(d, f2, [float(g) for g in gain])
    except ValueError:
        return None
    pred = [alpha * a + beta * b for a, b in zip(d, f2)]
    ss_tot = sum(g * g for g in gain)
    ss_res = sum((g - p) ** 2 for g, p in zip(gain, pred))
    d_peak = math.exp(alpha / beta - 1) if alpha > 0 and beta > 0 and alpha / beta < 50 else None
    return {
        "alpha": alpha,
        "beta": beta,
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0,
        "n": len(d),
        "d_peak": d_peak,
        "kl_peak": d_peak**2 if d_peak is not None else None,
    }


def overoptimisation(
    kl: list[float], reward: list[float], fit: dict | None = None, tail: float = 1 / 3
) -> str | None:
    """A warning when the reward flattens or falls at high KL while KL keeps growing, else None.

    The points with the highest KL (the top `tail` share, at least 3) get their own line against sqrt(KL).
    The warning fires when that local slope is below a quarter of the overall slope and significantly
    (two standard errors) below it; and when the overall slope is not positive (reward that rose at low KL and
    then fell, or never rose).
    """
    fit = fit or fit_sqrt_kl(kl, reward)
    pts = sorted((math.sqrt(float(k)), float(r)) for k, r in zip(kl, reward))
    m = max(3, int(round(len(pts) * tail)))
    if len(pts) < 6 or fit["sqrt_kl_max"] <= 0:
        return None
    hi, lo = pts[-m:], pts[:m]
    if hi[-1][0] - hi[0][0] <= 1e-9:
        return None
    local = linear_fit([p[0] for p in hi], [p[1] for p in hi])
    early = linear_fit([p[0] for p in lo], [p[1] for p in lo]) if lo[-1][0] > lo[0][0] else None
    if fit["b"] <= 0:
        if early and early["b"] > 0 and local["b"] < 0 and early["b"] - 2 * early["se_b"] > 0:
            return (
                f"possible over-optimisation: the reward rose at low KL (slope {early['b']:.3g}) and falls at the highest "
                f"KL (slope {local['b']:.3g}, sqrt(KL) {hi[0][0]:.2f}-{hi[-1][0]:.2f}) while KL keeps growing"
            )
        return f"reward does not rise with sqrt(KL) (b = {fit['b']:.3g}): the policy moved away from the reference without gaining reward"
    if local["b"] < 0.25 * fit["b"] and local["b"] + 2 * local["se_b"] < fit["b"]:
        how = "falls" if local["b"] < 0 else "flattens"
        return (
            f"possible over-optimisation: at the highest KL (sqrt(KL) {hi[0][0]:.2f}-{hi[-1][0]:.2f}) the reward {how} "
            f"(local slope {local['b']:.3g} against {fit['b']:.3g} overall) while KL keeps growing"
        )
    return None


def kl_key(rows: list[dict]) -> str:
    """The KL column to fit: the k3 estimate when the log has it, else `objective/kl`."""
    return KL_K3 if any(isinstance(r.get(KL_K3), (int, float)) for r in rows) else KL


def rounds_of(rows: list[dict]) -> list[int]:
    """The online rounds a policy log's rows carry (`round`, logged only with policy.rounds > 1), in order."""
    return sorted({r["round"] for r in rows if isinstance(r.get("round"), int)})


def round_note(rounds: list[int], what: str) -> str | None:
    """Why only the last round counts, when the log has several: each round's PM is retrained (and normalised
    anew), so raw scores of different rounds are not on one scale."""
    if len(rounds) < 2:
        return None
    return (
        f"the log has {len(rounds)} online rounds, each scored by its own round's PM (retrained and normalised "
        f"anew, so scores are not comparable across rounds): {what} uses only the last round ({rounds[-1]})"
    )


def read_ppo_log(path: str | Path, last_round: bool = False) -> tuple[list[float], list[float], str]:
    """(KL, score, KL column) per update from a PPO metrics.jsonl; rows without both are skipped. With
    `last_round`, a log of several online rounds gives only its last round's updates."""
    rows = read_jsonl(path)
    key = kl_key(rows)
    rounds = rounds_of(rows)
    if last_round and len(rounds) > 1:
        rows = [r for r in rows if r.get("round") == rounds[-1]]
    kl, score = [], []
    for row in rows:
        k, s = row.get(key), row.get(SCORE)
        if (
            isinstance(k, (int, float))
            and isinstance(s, (int, float))
            and math.isfinite(k)
            and math.isfinite(s)
        ):
            kl.append(float(k))
            score.append(float(s))
    return kl, score, key


def find_ppo_logs(target: str | Path, label_prefix: str = "") -> list[tuple[str, Path]]:
    """(label, metrics.jsonl) for a metrics file, a policy folder, or a run directory (with its arms); a run
    made when the stage was called 'ppo' is read from its ppo/ folders."""
    p = Path(target)
    if p.is_file():
        return [(label_prefix or p.parent.name, p)]
    if (p / "metrics.jsonl").is_file() and not any((p / s).is_dir() for s in STAGE_DIRS):
        return [(label_prefix or p.name, p / "metrics.jsonl")]
    layout = _layout(p)
    if layout is not None:  # a run made by `cai run`: the policy folders of its current arms, in recipe order
        out = []
        for arm in list(layout.arms) or [None]:
            d = layout.stage_dir("policy", arm)
            if d is not None and not (d / "metrics.jsonl").is_file():
                d = d.with_name("ppo")  # a run from before the rename
            if (d / "metrics.jsonl").is_file():
                name = arm or p.name
                out.append(
                    (
                        f"{label_prefix}/{name}" if label_prefix and arm else (label_prefix or name),
                        d / "metrics.jsonl",
                    )
                )
        return out
    out = []
    for stage in STAGE_DIRS:
        if (p / stage / "metrics.jsonl").is_file():
            out.append((label_prefix or p.name, p / stage / "metrics.jsonl"))
            break
    for arm in sorted(
        {a.parent.parent for s in STAGE_DIRS for a in (p / "arms").glob(f"*/{s}/metrics.jsonl")}
    ):
        log = next(arm / s / "metrics.jsonl" for s in STAGE_DIRS if (arm / s / "metrics.jsonl").is_file())
        out.append((f"{label_prefix}/{arm.name}" if label_prefix else arm.name, log))
    return out


def _layout(run_dir: Path):
    if not (run_dir / RECIPE_FILE).is_file():
        return None
    try:
        return plan(load_run_recipe(run_dir), run_dir)
    except UserError:
        return None


def analyze_logs(logs: list[tuple[str, Path]]) -> list[dict]:
    """One fit per log with at least 3 usable points (updates; DPO: probes); each: label, path, KL column, n (the
    points fitted), kl, score, fit, warnings.
    Updates with a negative KL estimate (only the reward's k1 column can have them) are left out and counted. A
    log of several online rounds is fitted over its last round only (round_note says so)."""
    series = []
    for label, path in logs:
        kl_all, score_all, key = read_ppo_log(path, last_round=True)
        rounds = rounds_of(read_jsonl(path))
        keep = [i for i, k in enumerate(kl_all) if k >= 0]
        kl, score = [kl_all[i] for i in keep], [score_all[i] for i in keep]
        dropped = len(kl_all) - len(kl)
        note = (
            f"{dropped} of {len(kl_all)} updates have a negative KL estimate ({key}, {KL_NAMES[key]}) and are left "
            f"out of the fit; rerun PPO to log {KL_K3}, which is never negative"
            if dropped
            else None
        )
        note = "; ".join(x for x in (round_note(rounds, "the fit"), note) if x) or None
        s = {"label": label, "path": str(path), "kl_key": key, "n": len(kl), "dropped": dropped, "note": note}
        s["round"] = rounds[-1] if len(rounds) > 1 else None
        if len(kl) < 3:
            s.update(
                fit=None,
                warning=f"{path}: only {len(kl)} point(s) (updates; DPO: probes) with {SCORE} and a usable {key}; "
                "at least 3 are needed",
            )
        else:
            fit = fit_sqrt_kl(kl, score)
            s.update(kl=kl, score=score, fit=fit, warning=overoptimisation(kl, score, fit))
        series.append(s)
    return series


def summarize(series: list[dict]) -> dict:
    """The JSON written beside the plot (no raw points)."""
    out = []
    for s in series:
        f = s.get("fit") or {}
        out.append(
            {
                "label": s["label"],
                "path": s["path"],
                "n": s["n"],
                "kl_key": s["kl_key"],
                "kl": KL_NAMES[s["kl_key"]],
                "dropped": s["dropped"],
                **{k: f.get(k) for k in ("a", "b", "r2", "se_b", "kl_max", "reward_first", "reward_last")},
                "b_ci95": list(slope_ci(f) or ()) or None if f else None,
                "warning": s.get("warning"),
                "note": s.get("note"),
            }
        )
    return {"model": "score = a + b * sqrt(KL)", "series": out}


def distinct_names(targets: list[str | Path]) -> list[str]:
    """A label per target: the shortest path suffix that no other target shares, of the run each names (a
    metrics file and a policy/ or ppo/ folder are named by the folder above). Two logs given as
    a/policy/metrics.jsonl and b/policy/metrics.jsonl both used to be 'metrics.jsonl'."""
    parts = []
    for t in targets:
        p = Path(t).resolve()
        if p.is_file():
            p = p.parent
        if p.name in STAGE_DIRS:
            p = p.parent
        parts.append(p.parts)
    names = []
    for i, own in enumerate(parts):
        others = [q for j, q in enumerate(parts) if j != i]
        k = next((k for k in range(1, len(own)) if all(q[-k:] != own[-k:] for q in others)), len(own))
        names.append("/".join(own[-k:]).lstrip("/") or str(targets[i]))
    return names


def kl_reward(targets: list[str | Path], out_dir: str | Path) -> dict:
    """Fit, plot and write `kl_reward.png` and `kl_reward.json` for runs, policy folders or metrics files."""
    logs = []
    for t in targets:
        if not Path(t).exists():
            raise UserError(f"{t}: no such run directory or file")
    names = distinct_names(targets) if len(targets) > 1 else [""] * len(targets)
    for t, name in zip(targets, names):
        found = find_ppo_logs(t, label_prefix=name)
        if not found:
            raise UserError(
                f"{t}: no policy log found (expected policy/metrics.jsonl or arms/*/policy/metrics.jsonl)"
            )
        logs += found
    series = analyze_logs(logs)
    if not any(s["fit"] for s in series):
        raise UserError("; ".join(s["warning"] for s in series))
    out_dir = Path(out_dir)
    result = summarize(series)
    result["png"] = str(plot_kl_reward(out_dir / "kl_reward.png", series))
    write_json(out_dir / "kl_reward.json", result)
    return result
