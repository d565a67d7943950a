"""The report's reading of the policy's sampled responses (policy/samples.jsonl, PPO, RLOO or GRPO): does the proxy PM mostly measure length,
and, with a gold judge (stage `gold`), the over-optimisation picture of Gao et al. 2022 — the proxy PM's score
(what the policy optimises) and the gold PM's score of the same responses against sqrt(KL), each fitted with the line
a + b·sqrt(KL) and with Gao's d(α − β·ln d), d = sqrt(KL).

Scores are shown as gains over the first update (the SFT policy), in units of that PM's standard deviation over
all sampled responses, so both PMs share one axis.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

from cai.eval.baselines import length_correlation
from cai.markdown import table, with_ci
from cai.plots import plot_overoptimisation
from cai.pm.scoring import RewardScorer
from cai.report.klfit import fit_gao, fit_sqrt_kl, kl_key, round_note, rounds_of
from cai.runtime.rundir import SAMPLES, read_jsonl
from cai.stats import mean_std


def read_samples(path: Path) -> dict[int, list[dict]]:
    """{update: its sampled rows}; an update logged twice (a run resumed before its checkpoint) keeps the rows of
    its last rollout (a new rollout starts again at i = 0)."""
    out: dict[int, list[dict]] = {}
    for r in read_jsonl(path):
        u = r.get("update")
        if not isinstance(u, int) or not isinstance(r.get("response"), str):
            continue
        if u not in out or r.get("i") == 0:
            out[u] = []
        out[u].append(r)
    return out


def gains(by_update: dict[int, list[float]]) -> list[float]:
    """Per update (in order), the mean score minus the first update's, over the SD of all scores (1 if none)."""
    updates = sorted(by_update)
    every = [x for u in updates for x in by_update[u]]
    _, sd = mean_std(every)
    first = sum(by_update[updates[0]]) / len(by_update[updates[0]])
    return [(sum(by_update[u]) / len(by_update[u]) - first) / sd for u in updates]


def fits(kl: list[float], gain: list[float]) -> dict:
    """Both forms on one series of (KL, gain) points."""
    linear = fit_sqrt_kl(kl, gain) if len(kl) >= 2 else None
    return {"gain": gain, "linear": linear, "gao": fit_gao(kl, gain)}


def gold_scores(
    gold_model: Path, settings, prompts: dict[str, list[dict]], rows: list[dict], batch_size: int
):
    """The gold PM's raw score of each sampled response (None where its prompt is unknown)."""
    scorer = RewardScorer(gold_model, settings)
    keep = [i for i, r in enumerate(rows) if r.get("prompt_id") in prompts]
    convs = [
        prompts[rows[i]["prompt_id"]] + [{"role": "assistant", "content": rows[i]["response"]}] for i in keep
    ]
    got = scorer.score(convs, batch_size=batch_size).tolist() if convs else []
    del scorer
    gc.collect()
    out: list[float | None] = [None] * len(rows)
    for i, s in zip(keep, got):
        out[i] = s
    return out


def _analyse(rep, arm, policy_dir: Path) -> dict | None:
    samples = read_samples(policy_dir / SAMPLES)
    log = read_jsonl(policy_dir / "metrics.jsonl")
    key = kl_key(log)  # k3 (never negative) when logged; a negative k1 estimate has no sqrt and is left out
    kl_of = {r.get("step"): r.get(key) for r in log}
    updates = [u for u in sorted(samples) if isinstance(kl_of.get(u), (int, float)) and kl_of[u] >= 0]
    if not updates:
        return None
    rows = [r for u in updates for r in samples[u]]
    out = {"n": len(rows), "updates": updates, "kl": [float(kl_of[u]) for u in updates]}
    # online rounds: each round's proxy PM is retrained, so its raw scores are compared within the last round only
    rounds, round_of = rounds_of(log), {r.get("step"): r.get("round") for r in log}
    proxy_u = [u for u in updates if len(rounds) < 2 or round_of.get(u) == rounds[-1]]
    out["note"] = round_note(rounds, "the proxy curve and its length check")
    proxy_rows = [r for u in proxy_u for r in samples[u]]
    prompt_of = [
        r.get("prompt_id") for r in proxy_rows
    ]  # every sample of a prompt, across updates, is a cluster
    out["length_proxy"] = length_correlation(
        [r["score"] for r in proxy_rows], [r["response"] for r in proxy_rows], prompt_of
    )
    if proxy_u:
        proxy_kl = [float(kl_of[u]) for u in proxy_u]
        out["proxy"] = {
            **fits(proxy_kl, gains({u: [r["score"] for r in samples[u]] for u in proxy_u})),
            "kl": proxy_kl,
        }
    gold = rep.index.stage_dir("gold", arm)
    cr = rep.index.stage_dir("critique_revise", arm)
    if gold is None or not (gold / "model" / "config.json").is_file() or cr is None:
        return out
    prompts = {p["id"]: p["messages"] for p in read_jsonl(cr / "prompts.jsonl")}
    scores = gold_scores(gold / "model", rep.config.settings, prompts, rows, rep.config.report.batch_size)
    k, by_update = 0, {}
    for u in updates:
        got = [s for s in scores[k : k + len(samples[u])] if s is not None]
        k += len(samples[u])
        if got:
            by_update[u] = got
    if len(by_update) == len(updates):
        out["gold"] = fits(out["kl"], gains(by_update))
        kept = [(r, s) for r, s in zip(rows, scores) if s is not None]
        out["length_gold"] = length_correlation(
            [s for _, s in kept], [r["response"] for r, _ in kept], [r.get("prompt_id") for r, _ in kept]
        )
    return out


def _fit_rows(results: dict) -> list[list]:
    rows = []
    for label, res in results.items():
        for pm in ("proxy", "gold"):
            f = res.get(pm)
            if not f:
                continue
            lin, gao, gain = f["linear"] or {}, f["gao"] or {}, f["gain"]
            rows.append(
                [
                    f"{label}: {pm}",
                    f"{lin['a']:+.3f} {'-' if lin['b'] < 0 else '+'} {abs(lin['b']):.3f}·d (R² {lin['r2']:.2f})"
                    if lin
                    else "—",
                    f"d·({gao['alpha']:.3f} {'+' if gao['beta'] < 0 else '−'} {abs(gao['beta']):.3f}·ln d) "
                    f"(R² {gao['r2']:.2f})"
                    if gao
                    else "—",
                    gao.get("kl_peak"),
                    f"{gain[0]:+.2f} → {gain[-1]:+.2f}",
                    len(gain),
                ]
            )
    return rows


def section(rep) -> list[str]:
    """Length check on the policy's samples; with a gold judge, proxy and gold against sqrt(KL) and the gold PM's own
    evaluation. Numbers go to data['policy_samples']."""
    dirs, seen = {}, set()
    for a in rep.arms:
        d = rep.index.stage_dir("policy", a)
        if d is not None and (d / SAMPLES).is_file() and str(d) not in seen:
            seen.add(str(d))
            dirs[a] = d
    results = {rep.label(a): r for a, d in dirs.items() if (r := _analyse(rep, a, d))}
    if not results:
        return []
    rep.data["policy_samples"] = results
    md = ["### Does the PM measure length? (policy samples)\n"]
    md.append(
        "Pearson correlation of each PM's score of the policy's sampled responses with their length in characters "
        "(95% CI by a bootstrap over prompts: a prompt's samples, in one update or across updates, are not "
        "independent); |r| ≥ 0.7 means the PM mostly measures length.\n"
    )
    rows = [
        [f"{label}: {pm}", with_ci(res[key], "r")]
        for label, res in results.items()
        for pm, key in (("proxy", "length_proxy"), ("gold", "length_gold"))
        if key in res
    ]
    md.append(table(["PM", "r [95% CI] (n)"], rows))
    md += [f"> **Note ({label}):** {res['note']}.\n" for label, res in results.items() if res.get("note")]
    for label, res in results.items():
        for key in ("length_proxy", "length_gold"):
            if (res.get(key) or {}).get("warning"):
                md.append(f"> **Warning ({label}, {key.split('_')[1]} PM):** {res[key]['warning']}.\n")
    if any("gold" in r for r in results.values()):
        md += _gold_block(rep, results)
    return md


def _gold_block(rep, results: dict) -> list[str]:
    md = ["### Over-optimisation: proxy and gold PM against sqrt(KL)\n"]
    md.append(
        "Every update's sampled responses scored by the proxy PM (the one the policy optimises) and by the gold PM "
        "(trained on human preference pairs, independent of the labeller), as the gain of the mean score over the "
        "first update, in score SDs. Fits: a + b·d (dashed) and Gao et al.'s d(α − β·ln d) (solid), d = "
        "sqrt(KL), fitted through the origin (uncentred R²); with α > 0 and β > 0 the score is predicted to "
        "peak at the KL shown. A proxy that keeps rising while the gold score falls is over-optimised.\n"
    )
    series = []
    for label, res in results.items():
        for pm in ("proxy", "gold"):
            if res.get(pm):
                d = [math.sqrt(max(k, 0.0)) for k in res[pm].get("kl", res["kl"])]
                series.append({"label": f"{label}: {pm}", "d": d, **res[pm]})
    plot_overoptimisation(
        rep.out / "overoptimisation.png", series, "Proxy and gold PM score against sqrt(KL)"
    )
    md.append(
        table(
            ["series", "a + b·d", "Gao fit", "KL at the peak", "gain first → last", "updates"],
            _fit_rows(results),
        )
    )
    md.append("![proxy and gold against sqrt(KL)](overoptimisation.png)\n")
    gold_dirs = {str(rep.index.stage_dir("gold", a)) for a in rep.arms if rep.index.stage_dir("gold", a)}
    for g in sorted(gold_dirs):
        held = (_read_json(Path(g) / "eval.json") or {}).get("held_out")
        lift = (held or {}).get("lift")
        if held and lift:
            lo, hi = lift["ci95"]
            md.append(
                f"The gold PM on {held['n']} held-out human pairs it never trained on: accuracy {with_ci(held)}, "
                f"chance {held['chance']:.2f}; lift over the best baseline ({lift['over']}) {lift['value']:+.3f} "
                f"(95% CI {lo:+.3f} to {hi:+.3f}).\n"
            )
        warning = gold_warning(Path(g))
        if warning:
            md.append(f"> **Warning:** {warning}.\n")
    return md


def gold_warning(gold_dir: Path) -> str | None:
    """A plain warning when the gold PM does not beat its baselines on its held-out human pairs (the lower end
    of the lift's CI at or below 0): then its scores carry no demonstrated signal."""
    held = (_read_json(Path(gold_dir) / "eval.json") or {}).get("held_out") or {}
    lift = held.get("lift")
    if not lift or lift["ci95"][0] > 0:
        return None
    lo, hi = lift["ci95"]
    return (
        f"the gold PM does not beat its best baseline ({lift['over']}) on {held['n']} held-out human pairs (lift "
        f"{lift['value']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f}): its scores carry no demonstrated signal, so "
        "neither do the gold curve and the gold-judged win rates; give it a larger backbone or more pairs"
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None
