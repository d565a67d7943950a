"""The report's reading over seeds: arms whose policy stages differ only in policy.seed (a sweep over it) are one
setting trained several times. For each setting: the final policies' PM-score gain over the SFT model, averaged
over seeds and held-out prompts, with a 95% CI from a bootstrap that resamples seeds and prompts both (every
seed's policy answered the same prompts, so the two are crossed; an interval over prompts alone would leave out
how much a setting's result depends on its seed); each setting's gain minus the first setting's, paired by seed
and prompt, with the same interval; and sqrt(KL) to the SFT model and the win rate against it as their mean over
seeds with the range."""

from __future__ import annotations

import json

from cai.markdown import num, table
from cai.stats import crossed_bootstrap_ci, mean

SEED_KEYS = (("policy", "seed"), ("settings", "seed"))


def _without_seed(config: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for block, key in SEED_KEYS:
        if isinstance(out.get(block), dict):
            out[block].pop(key, None)
    return out


def _seed(config: dict):
    """The seed the stage ran with: its settings' (policy.seed, when set, is already there: cai.config.layout)."""
    return (config.get("settings") or {}).get("seed")


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def seed_groups(configs: dict, inputs: dict) -> list[tuple[str, dict]]:
    """[(label, {seed: arm})] for the arms whose policy-stage config (`configs`, from the manifests) and upstream
    folders (`inputs`) are equal but for the seed, in the arms' order; a label names the keys in which the settings
    differ ('ppo.critic=value_head'), 'every arm' when there is one setting; settings whose keys match but whose
    upstream folders differ (an arm with its own SFT model) add the first arm whose folders they read. Empty unless
    a setting has 2 seeds."""
    keyed: dict[str, dict] = {}
    for arm, config in configs.items():
        key = json.dumps([_without_seed(config), inputs.get(arm)], sort_keys=True, default=str)
        keyed.setdefault(key, {}).setdefault(_seed(config), arm)
    if not any(len(g) > 1 for g in keyed.values()):
        return []
    flats = {key: _flat(_without_seed(configs[next(iter(g.values()))])) for key, g in keyed.items()}
    differ = sorted({k for f in flats.values() for k in f if len({g.get(k) for g in flats.values()}) > 1})
    out = []
    for key, group in keyed.items():
        label = ", ".join(f"{k}={json.loads(flats[key][k])}" for k in differ if k in flats[key])
        out.append((label or ("every arm" if len(keyed) == 1 else "the rest"), group))
    labels = [label for label, _ in out]
    return [
        (f"{label} (upstream of {next(iter(g.values()))})" if labels.count(label) > 1 else label, g)
        for label, g in out
    ]


def _table(values: dict, arm_of_seed: dict) -> dict | None:
    """Mean and crossed CI of per-prompt values ({arm: {prompt: value}}) over the seeds of `arm_of_seed` and the
    prompts they all share."""
    per = {s: values.get(a) for s, a in arm_of_seed.items()}
    per = {s: v for s, v in per.items() if v}
    common = sorted(set.intersection(*(set(v) for v in per.values()))) if per else []
    if not common:
        return None
    rows = [[per[s][p] for p in common] for s in sorted(per)]
    return {
        "mean": mean([x for r in rows for x in r]),
        "ci95": list(crossed_bootstrap_ci(rows)),
        "seeds": len(rows),
        "prompts": len(common),
    }


def over_seeds(groups: list[tuple[str, dict]], gains: dict, sqrt_kl: dict, win_rate: dict) -> list[dict]:
    """One row per setting: `gains` {arm: {prompt: final − SFT score}}, `sqrt_kl` and `win_rate` {arm: float}."""
    first = groups[0][1] if groups else {}
    out = []
    for i, (label, arms) in enumerate(groups):
        row = {"setting": label, "arms": list(arms.values()), "gain": _table(gains, arms)}
        if i:
            both = [s for s in arms if s in first]
            diffs = {
                s: {
                    p: gains[arms[s]][p] - gains[first[s]][p]
                    for p in gains.get(arms[s], {})
                    if p in gains.get(first[s], {})
                }
                for s in both
            }
            row["vs_first"] = _table(diffs, {s: s for s in both})
        for name, values in (("sqrt_kl", sqrt_kl), ("win_rate", win_rate)):
            xs = [values[a] for a in arms.values() if values.get(a) is not None]
            row[name] = {"mean": mean(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None
        out.append(row)
    return out


def _ci(res: dict | None) -> str:
    if not res:
        return "—"
    lo, hi = res["ci95"]
    return f"{num(res['mean'])} [{num(lo)}, {num(hi)}] ({res['seeds']} seeds × {res['prompts']} prompts)"


def _spread(res: dict | None) -> str:
    return f"{num(res['mean'])} [{num(res['min'])}–{num(res['max'])}]" if res else "—"


def section(rows: list[dict]) -> list[str]:
    """The markdown of `over_seeds`' rows; nothing without them."""
    if not rows:
        return []
    first = rows[0]["setting"]
    body = [
        [
            r["setting"],
            ", ".join(map(str, r["arms"])),
            _ci(r["gain"]),
            _ci(r.get("vs_first")) if "vs_first" in r else "(the baseline)",
            _spread(r["sqrt_kl"]),
            _spread(r["win_rate"]),
        ]
        for r in rows
    ]
    head = [
        "setting",
        "arms (one per seed)",
        "final − SFT PM score [95% CI]",
        f"− {first}'s, paired by seed and prompt [95% CI]",
        "sqrt(KL), mean over seeds [range]",
        "win rate against the SFT model, mean [range]",
    ]
    return [
        "### Over seeds\n",
        "Arms that differ only in `policy.seed` are one setting trained once per seed. The intervals resample "
        "seeds and prompts both, so they include how much a result depends on its seed; with few seeds they are "
        "wide, and a difference whose interval holds 0 is not shown to exist.\n",
        table(head, body),
    ]
