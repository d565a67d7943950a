"""Statistics in pure Python, the one place for them: Wilson, bootstrap (over one sample, or crossed over two)
and median intervals, agreement with human labels, calibration (ECE, reliability bins), the per-tag summary of an
evaluation, least squares and correlation. How a preference becomes a hit (ties) is cai.credit.

Proportions (accuracy, agreement, win rate) get Wilson intervals, which stay honest at small n: 0 of 8 is
[0, 0.32], where a bootstrap says [0, 0]; items that come in clusters (several pairs of one prompt) get them at
the effective sample size (clustered_ci). Below SMALL_N items a proportion is flagged as a small sample."""

from __future__ import annotations

import math
import random

from cai.credit import preference_credit

SMALL_N = 30  # below this many items a 95% interval of a proportion is wider than ±0.17: flagged as small


def small_n(n: int | None) -> bool:
    """Whether a proportion over n items is a small sample (n < SMALL_N)."""
    return n is not None and n < SMALL_N


def small_n_note(n: int | None, what: str = "items") -> str | None:
    """A warning for a proportion over fewer than SMALL_N items, else None."""
    if not small_n(n):
        return None
    return (
        f"only {n} {what} (fewer than {SMALL_N}): the 95% interval is wide; read it, not the point estimate"
    )


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def mean_std(xs) -> tuple[float, float]:
    """Mean (0 when empty) and sample standard deviation, as a scale to divide by: 1.0 where it is 0 or undefined."""
    xs = list(xs)
    n = len(xs)
    m = sum(xs) / n if n else 0.0
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, sd or 1.0


def wilson_ci(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (ties may count as half successes)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p)))  # contains p despite rounding


def clustered_ci(values, clusters, z: float = 1.959964) -> tuple[float, float]:
    """95% interval of the mean p of per-item credits in [0, 1] that come in clusters (pairs of one prompt): a
    Wilson interval at the effective sample size n_eff = n / deff, deff Kish's design effect (Kish 1965, Survey
    Sampling) V_c / V_srs, clamped to >= 1: V_c = Σ_g (Y_g − p·n_g)² / n² is the cluster-robust (sandwich,
    ratio-estimator) variance of p (Y_g, n_g: cluster g's credit sum and size), V_srs = Σ_i (y_i − p)² / n² the
    same for independent items (p(1 − p)/n for 0/1 credits). k copies of m items give n_eff = m; all singletons
    give wilson_ci exactly; where V_c says nothing (all credits equal, or one cluster) n_eff = number of clusters."""
    values = [float(v) for v in values]
    clusters = list(clusters)
    if len(values) != len(clusters):
        raise ValueError(f"clustered_ci: {len(values)} values but {len(clusters)} cluster labels")
    n = len(values)
    totals: dict = {}
    for v, g in zip(values, clusters):
        t = totals.setdefault(g, [0.0, 0])
        t[0] += v
        t[1] += 1
    m = len(totals)
    if m == n:
        return wilson_ci(sum(values), n, z)
    p = sum(values) / n
    v_srs = sum((v - p) ** 2 for v in values) / (n * n)
    if m < 2 or v_srs <= 0:
        n_eff = float(m)
    else:
        v_c = sum((y - p * k) ** 2 for y, k in totals.values()) / (n * n)
        n_eff = n / max(1.0, v_c / v_srs)
    return wilson_ci(p * n_eff, n_eff, z)


def agreement(p_a: list[float], human_a: list[bool]) -> dict:
    """Agreement of soft labels with human choices: p_a > 0.5 agrees when humans chose A; a tie (is_tie) counts
    half. `hits` holds each pair's credit."""
    hits = [preference_credit(p, h) for p, h in zip(p_a, human_a)]
    n = len(hits)
    lo, hi = wilson_ci(sum(hits), n)
    p_human = [p if h else 1.0 - p for p, h in zip(p_a, human_a)]
    return {
        "n": n,
        "agreement": sum(hits) / n if n else float("nan"),
        "ci95": [lo, hi],
        "mean_p_human_choice": sum(p_human) / n if n else float("nan"),
        "above_chance": lo > 0.5,
        "hits": hits,
    }


def bootstrap_ci(
    values: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (e.g. 0/1 hits)."""
    return crossed_bootstrap_ci([values], n_boot, seed, level)


def crossed_bootstrap_ci(
    rows: list[list[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of a table whose rows and columns are both samples (seeds x prompts):
    each draw resamples the rows and the columns independently. One row: the bootstrap over its values."""
    k, n = len(rows), len(rows[0]) if rows else 0
    if not n:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    draws = []
    for _ in range(n_boot):
        picked = rows if k == 1 else [rows[rng.randrange(k)] for _ in range(k)]
        cols = [rng.randrange(n) for _ in range(n)]
        draws.append(sum(r[c] for r in picked for c in cols) / (k * n))
    return _percentiles(sorted(draws), level)


def _percentiles(draws: list[float], level: float) -> tuple[float, float]:
    """The central `level` interval of sorted bootstrap draws (percentile method)."""
    m = len(draws)
    return (
        draws[int(math.floor((1 - level) / 2 * m))],
        draws[min(m - 1, int(math.ceil((1 + level) / 2 * m)) - 1)],
    )


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free interval of the median of independent draws: the order statistics (x_(k), x_(n+1-k))
    of the narrowest such pair that covers the median with probability >= `level`, which is
    1 - 2·P(Binomial(n, 1/2) <= k - 1). Returns (low, high, coverage). Below 6 draws no pair reaches 95%: the
    range is returned with the coverage it has (75% for 3 draws)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return (float("nan"), float("nan"), 0.0)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return (xs[k - 1], xs[n - k], coverage(k))


def balanced_coins(n: int, rng) -> list[bool]:
    """n seeded coins, exactly half of them True (an odd one drawn): for putting the right answer at (A) in half
    of the items, so that a judge that always answers the same letter scores chance, not the coins' imbalance
    (21 of 30 free coins came up (A) for seed 0)."""
    coins = [k % 2 == 1 for k in range(n)]
    if n % 2:
        coins[-1] = rng.random() < 0.5
    rng.shuffle(coins)
    return coins


def reliability_bins(probs: list[float], outcomes: list[float], n_bins: int = 10) -> list[dict]:
    """Equal-width bins of predicted probability: count, mean prediction, observed frequency (a non-finite
    probability, from a NaN or infinite score, belongs to no bin and is left out)."""
    bins = [
        {"lo": i / n_bins, "hi": (i + 1) / n_bins, "n": 0, "p_sum": 0.0, "y_sum": 0.0} for i in range(n_bins)
    ]
    for p, y in zip(probs, outcomes):
        if not math.isfinite(p):
            continue
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


def summarise(
    hits: list[float],
    option_probs: list[list[float]],
    correct: list[int],
    tags: list[str],
    margins: list[float] | None = None,
    seed: int = 0,
) -> dict:
    """Accuracy with a 95% Wilson interval (a tie is half a hit), chance level, mean margin, ECE and reliability
    bins over items, and the per-tag breakdown; `small_sample` when n < SMALL_N. (`seed` is unused: kept for
    callers.) An item is one reliability point, not one per option (a pair is not p and 1 − p): the probability
    of the option the model prefers, and the item's hit, so ties count in the calibration as in the accuracy."""
    ps, ys = [float(max(p)) for p in option_probs], [float(h) for h in hits]
    out = {
        "n": len(hits),
        "accuracy": mean(hits),
        "ci95": list(wilson_ci(sum(hits), len(hits))),
        "interval": "wilson",
        "small_sample": small_n(len(hits)),
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
            "ci95": list(wilson_ci(sum(hits[i] for i in idx), len(idx))),
        }
        if margins is not None:
            row["mean_margin"] = mean(margins[i] for i in idx)
        per_tag[tag] = row
    out["per_tag"] = per_tag
    return out


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Ordinary least squares y = a + b·x: a, b, R², and the standard error of b."""
    n = len(xs)
    if n < 2:
        raise ValueError("a fit needs at least 2 points")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx > 0 else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    se_b = math.sqrt(ss_res / (n - 2) / sxx) if n > 2 and sxx > 0 else float("inf")
    return {"a": a, "b": b, "r2": r2, "se_b": se_b, "n": n}


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = [
    float(t)
    for t in "12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 2.131 2.120 "
    "2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042".split()
]


def slope_ci(fit: dict) -> tuple[float, float] | None:
    """95% interval of a linear_fit's slope, b ± t(0.975, n − 2)·SE (Cornish–Fisher above 30 degrees of freedom);
    None below 3 points."""
    df, se = fit.get("n", 0) - 2, fit.get("se_b")
    if df < 1 or se is None or not math.isfinite(se):
        return None
    z = 1.959964
    t = (
        _T975[df - 1]
        if df <= 30
        else z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)
    )
    return (fit["b"] - t * se, fit["b"] + t * se)


def pearson(a: list[float], b: list[float]) -> float | None:
    n = len(a)
    if n < 2:
        return None
    ma, mb = sum(a) / n, sum(b) / n
    va, vb = sum((x - ma) * (x - ma) for x in a), sum((y - mb) * (y - mb) for y in b)  # inf, never an error
    if va <= 0 or vb <= 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(va * vb)


def epoch_means(rows: list[dict], key: str = "loss") -> list[float]:
    """Mean of `key` over the logged steps of each epoch, in order (a step logged at epoch e counts toward epoch
    ceil(e)); [] when rows carry no epoch. Per-step losses of small runs are noisy (a partial last batch), so
    the epoch means are what shows whether a fine-tune learned."""
    groups: dict[int, list[float]] = {}
    for r in rows:
        e, v = r.get("epoch"), r.get(key)
        if isinstance(e, (int, float)) and isinstance(v, (int, float)) and math.isfinite(v):
            groups.setdefault(max(1, math.ceil(e - 1e-6)), []).append(float(v))
    return [sum(vs) / len(vs) for _, vs in sorted(groups.items())]


def correlation_ci(r: float | None, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95% interval of a Pearson correlation by Fisher's z transform (None when n < 4 or r is undefined)."""
    if r is None or n < 4:
        return None
    r = max(min(r, 1 - 1e-12), -1 + 1e-12)
    centre, half = math.atanh(r), z / math.sqrt(n - 3)
    return (math.tanh(centre - half), math.tanh(centre + half))


def cluster_correlation_ci(
    a: list[float], b: list[float], groups: list, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the Pearson correlation of paired observations that come in clusters
    (responses to one prompt share its effects on both length and score, so they are not independent draws and
    Fisher's z over all of them is too narrow): whole clusters are drawn with replacement. Each cluster enters
    through its sums, so a resample costs one pass over the clusters. None below 4 clusters, or when fewer than
    half the resamples have a defined correlation."""
    ma, mb = sum(a) / max(len(a), 1), sum(b) / max(len(b), 1)
    sums: dict = {}
    for x, y, g in zip(a, b, groups):  # centred first: no cancellation in the variances
        x, y = x - ma, y - mb
        c = sums.setdefault(g, [0, 0.0, 0.0, 0.0, 0.0, 0.0])
        c[0] += 1
        c[1] += x
        c[2] += y
        c[3] += x * x
        c[4] += y * y
        c[5] += x * y
    clusters = list(sums.values())
    k = len(clusters)
    if k < 4:
        return None
    rng, rs = random.Random(seed), []
    for _ in range(n_boot):
        t = [0.0] * 6
        for _ in range(k):
            t = [u + v for u, v in zip(t, clusters[rng.randrange(k)])]
        n, sx, sy, sxx, syy, sxy = t
        va, vb = sxx - sx * sx / n, syy - sy * sy / n
        if va > 1e-12 * max(sxx, 1e-300) and vb > 1e-12 * max(syy, 1e-300):
            rs.append(max(-1.0, min(1.0, (sxy - sx * sy / n) / math.sqrt(va * vb))))
    return _percentiles(sorted(rs), level) if len(rs) >= n_boot / 2 else None


def fit_through_origin(f1: list[float], f2: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = c1·f1 + c2·f2 (no intercept): (c1, c2); a ValueError when the features are collinear."""
    s11 = sum(a * a for a in f1)
    s22 = sum(b * b for b in f2)
    s12 = sum(a * b for a, b in zip(f1, f2))
    s1y = sum(a * y for a, y in zip(f1, ys))
    s2y = sum(b * y for b, y in zip(f2, ys))
    det = s11 * s22 - s12 * s12
    if abs(det) <= 1e-12 * max(s11 * s22, 1e-300):
        raise ValueError("the two features are collinear: no unique fit")
    return (s22 * s1y - s12 * s2y) / det, (s11 * s2y - s12 * s1y) / det
