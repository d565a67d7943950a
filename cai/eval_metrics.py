"""Evaluation statistics (pure Python): bootstrap CIs, calibration (ECE, reliability bins), per-tag tables,
plus the reliability-diagram PNG and the markdown summary of an evaluation."""

from __future__ import annotations

import math
import random
from pathlib import Path


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def wilson_ci(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (ties may count as half successes)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p)))  # contains p despite rounding


def agreement(p_a: list[float], human_a: list[bool]) -> dict:
    """Agreement of soft labels with human choices: p_a > 0.5 agrees when humans chose A; a tie counts half."""
    hits = [0.5 if p == 0.5 else float((p > 0.5) == h) for p, h in zip(p_a, human_a)]
    n = len(hits)
    lo, hi = wilson_ci(sum(hits), n)
    p_human = [p if h else 1.0 - p for p, h in zip(p_a, human_a)]
    return {
        "n": n,
        "agreement": sum(hits) / n if n else float("nan"),
        "ci95": [lo, hi],
        "mean_p_human_choice": sum(p_human) / n if n else float("nan"),
        "above_chance": lo > 0.5,
    }


def bootstrap_ci(
    values: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (e.g. 0/1 hits)."""
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int(math.floor((1 - level) / 2 * n_boot))]
    hi = means[min(n_boot - 1, int(math.ceil((1 + level) / 2 * n_boot)) - 1)]
    return (lo, hi)


def reliability_bins(probs: list[float], outcomes: list[float], n_bins: int = 10) -> list[dict]:
    """Equal-width bins of predicted probability: count, mean prediction, observed frequency."""
    bins = [
        {"lo": i / n_bins, "hi": (i + 1) / n_bins, "n": 0, "p_sum": 0.0, "y_sum": 0.0} for i in range(n_bins)
    ]
    for p, y in zip(probs, outcomes):
        b = bins[min(int(p * n_bins), n_bins - 1)]
        b["n"] += 1
        b["p_sum"] += p
        b["y_sum"] += y
    out = []
    for b in bins:
        n = b["n"]
        out.append(
            {
                "lo": b["lo"],
                "hi": b["hi"],
                "n": n,
                "mean_p": b["p_sum"] / n if n else None,
                "freq": b["y_sum"] / n if n else None,
            }
        )
    return out


def ece(probs: list[float], outcomes: list[float], n_bins: int = 10) -> float:
    """Expected calibration error: Σ_bins (n_b/N)·|observed frequency − mean predicted probability|."""
    total = len(probs)
    if total == 0:
        return float("nan")
    return sum(
        b["n"] / total * abs(b["freq"] - b["mean_p"])
        for b in reliability_bins(probs, outcomes, n_bins)
        if b["n"]
    )


def calibration_points(
    option_probs: list[list[float]], correct: list[int]
) -> tuple[list[float], list[float]]:
    """Every option of every item as (predicted probability, 1 if it is the right one). For two options this is
    the HH-RLHF paper's P(chosen) = σ(r_c − r_r) against the observed frequency, counted in both directions."""
    ps, ys = [], []
    for probs, c in zip(option_probs, correct):
        for k, p in enumerate(probs):
            ps.append(float(p))
            ys.append(1.0 if k == c else 0.0)
    return ps, ys


def summarise(
    hits: list[float],
    option_probs: list[list[float]],
    correct: list[int],
    tags: list[str],
    margins: list[float] | None = None,
    seed: int = 0,
) -> dict:
    """Accuracy with a 95% bootstrap CI, chance level, mean margin, ECE and bins, and the per-tag breakdown."""
    ps, ys = calibration_points(option_probs, correct)
    out = {
        "n": len(hits),
        "accuracy": mean(hits),
        "ci95": list(bootstrap_ci(hits, seed=seed)),
        "chance": mean(1.0 / len(p) for p in option_probs),
        "ece": ece(ps, ys),
        "reliability": reliability_bins(ps, ys),
    }
    if margins is not None:
        out["mean_margin"] = mean(margins)
    per_tag = {}
    for tag in sorted(set(tags)):
        idx = [i for i, t in enumerate(tags) if t == tag]
        row = {
            "n": len(idx),
            "accuracy": mean(hits[i] for i in idx),
            "ci95": list(bootstrap_ci([hits[i] for i in idx], seed=seed)),
        }
        if margins is not None:
            row["mean_margin"] = mean(margins[i] for i in idx)
        per_tag[tag] = row
    out["per_tag"] = per_tag
    return out


def reliability_png(
    path: str | Path, bins: list[dict], title: str, xlabel: str = "predicted probability"
) -> Path:
    """Reliability diagram: observed frequency against mean predicted probability per bin, with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    pts = [b for b in bins if b["n"]]
    ax.bar(
        [(b["lo"] + b["hi"]) / 2 for b in pts],
        [b["freq"] for b in pts],
        width=bins[0]["hi"] - bins[0]["lo"],
        alpha=0.3,
        edgecolor="tab:blue",
        label="observed frequency",
    )
    ax.plot(
        [b["mean_p"] for b in pts],
        [b["freq"] for b in pts],
        "o-",
        color="tab:blue",
        label="bin (mean prediction)",
    )
    for b in pts:
        ax.annotate(
            str(b["n"]),
            (b["mean_p"], b["freq"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("observed frequency of being the right option")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(x, nd=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown(result: dict, png_name: str | None) -> str:
    """A short markdown report of one evaluation result."""
    lo, hi = result["ci95"]
    lines = [
        f"# {result['kind']} eval: {result['suite']}",
        "",
        f"- model: `{result['model']}`",
        f"- items: {result['n']}" + (f" (limit {result['limit']})" if result.get("limit") else ""),
        f"- accuracy: **{_f(result['accuracy'])}** (95% bootstrap CI {_f(lo)}–{_f(hi)}); chance {_f(result['chance'])}",
    ]
    if "mean_margin" in result:
        lines.append(f"- mean margin (right − best wrong score): {_f(result['mean_margin'])}")
    if "mean_order_gap" in result:
        lines.append(
            f"- mean order gap (|p_a shown first − p_a shown second|): {_f(result['mean_order_gap'])}"
        )
    lines.append(f"- expected calibration error: {_f(result['ece'])}")
    lines += [
        "",
        "| tag | n | accuracy | 95% CI |" + (" mean margin |" if "mean_margin" in result else ""),
        "|---|---|---|---|" + ("---|" if "mean_margin" in result else ""),
    ]
    for tag, row in result["per_tag"].items():
        extra = f" {_f(row.get('mean_margin'))} |" if "mean_margin" in result else ""
        lines.append(
            f"| {tag} | {row['n']} | {_f(row['accuracy'])} | {_f(row['ci95'][0])}–{_f(row['ci95'][1])} |{extra}"
        )
    if png_name:
        lines += ["", f"![reliability diagram]({png_name})"]
    return "\n".join(lines) + "\n"
