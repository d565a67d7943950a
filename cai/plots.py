"""Every PNG cai writes: line charts, curve grids, reliability diagrams, the reward-against-sqrt(KL) plot, the
proxy-and-gold over-optimisation plot and the delta-p histogram of a constitution edit (Agg backend; matplotlib
is imported inside the functions)."""

from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (shorter at the start); window <= 1 returns the values as they are."""
    if window <= 1:
        return list(ys)
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def line_chart(
    path: str | Path,
    series: dict[str, tuple[list, list]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    smooth: int = 1,
    logy: bool = False,
) -> Path:
    """One line per series {label: (xs, ys)}; with `smooth` > 1 the raw values are drawn faintly under a moving
    average. Returns the PNG path."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (xs, ys) in series.items():
        xs, ys = list(xs), [float(y) for y in ys]
        if smooth > 1 and len(ys) > smooth:
            (line,) = ax.plot(xs, ys, alpha=0.25, linewidth=1)
            ax.plot(xs, moving_average(ys, smooth), color=line.get_color(), label=label, linewidth=1.8)
        else:
            ax.plot(xs, ys, label=label, linewidth=1.8, marker="o" if len(xs) <= 20 else None, markersize=3)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1 or smooth > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def reliability_png(
    path: str | Path, bins: list[dict], title: str, xlabel: str = "predicted probability"
) -> Path:
    """Reliability diagram: observed frequency against mean predicted probability per bin, with counts."""
    plt = _pyplot()

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


def curves_png(
    path: Path, panels: list[tuple[str, str]], data: dict[str, dict[str, tuple[list, list]]], title: str = ""
) -> Path | None:
    """A grid of small line charts, one panel per (metric key, panel title), one line per label of `data`
    ({label: {metric key: (steps, values)}}), each label in one colour in every panel (also where a label
    lacks a panel's metric, as DPO lacks policy/clipfrac)."""
    plt = _pyplot()
    panels = [(k, t) for k, t in panels if any(k in d for d in data.values())]
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), dpi=100, squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: cycle[i % len(cycle)] for i, label in enumerate(data)}  # a label's colour in every panel
    for ax, (key, name) in zip(axes.flat, panels):
        for label, d in data.items():
            if key in d:
                xs, ys = d[key]
                marker = "o" if len(xs) <= 20 else None
                ax.plot(xs, ys, marker=marker, markersize=3, linewidth=1.6, label=label, color=colour[label])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_kl_reward(path: str | Path, series: list[dict], title: str = "PM reward vs sqrt(KL)") -> Path:
    """Points and fitted line per series on one plot (x: sqrt(KL), y: PM score)."""
    plt = _pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for s in series:
        if not s.get("fit"):
            continue
        xs = [math.sqrt(k) for k in s["kl"]]  # KL ≥ 0: cai.report.klfit leaves negative estimates out
        pts = ax.scatter(xs, s["score"], s=14, alpha=0.6)
        f = s["fit"]
        x1 = max(xs)
        ax.plot(
            [0, x1],
            [f["a"], f["a"] + f["b"] * x1],
            color=pts.get_facecolor()[0],
            linewidth=1.8,
            label=f"{s['label']}: {f['a']:.2f} {'-' if f['b'] < 0 else '+'} {abs(f['b']):.2f}·√KL (R² {f['r2']:.2f})",
        )
    ax.set_xlabel("sqrt(KL(π ‖ π_ref)) per sequence")
    ax.set_ylabel("PM score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_overoptimisation(path: str | Path, series: list[dict], title: str) -> Path:
    """Proxy and gold score gains against sqrt(KL): points per update and both fits per series (each series:
    label, d, gain, optional `linear` {a, b} and `gao` {alpha, beta}); solid: Gao's d(α − β·ln d), dashed:
    a + b·d."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for s in series:
        pts = ax.scatter(s["d"], s["gain"], s=16, alpha=0.7, label=s["label"])
        colour = pts.get_facecolor()[0]
        top = max(s["d"] + [1e-6])
        xs = [top * i / 60 for i in range(61)]
        g = s.get("gao")
        if g:
            ys = [x * (g["alpha"] - g["beta"] * math.log(x)) if x > 0 else 0.0 for x in xs]
            ax.plot(xs, ys, color=colour, linewidth=1.8, label=f"{s['label']}: d(α − β·ln d)")
        lin = s.get("linear")
        if lin:
            ax.plot(xs, [lin["a"] + lin["b"] * x for x in xs], color=colour, linewidth=1.0, linestyle="--")
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("d = sqrt(KL(π ‖ π_ref)) per sequence")
    ax.set_ylabel("score gain over the first update (in score SDs)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def delta_histogram(path: Path, kept: list[float], flipped: list[float], unchanged: int, title: str) -> Path:
    """Histogram of the label changes of a constitution edit: Δp of the relabelled pairs that kept their
    preference and of those that flipped (red), on a range fitted to them; `unchanged` pairs (Δp = 0 by
    construction) are counted in the title."""
    plt = _pyplot()
    path = Path(path)
    span = max([abs(x) for x in kept + flipped] + [0.005]) * 1.1
    span = 1.0 if span > 0.5 else span
    bins = [span * (i / 15 - 1) for i in range(31)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(
        [kept, flipped],
        bins=bins,
        stacked=True,
        color=["#4477aa", "#cc3311"],
        edgecolor="white",
        label=["same preference", "flipped"],
    )
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("Δp = p_new(A) − p_old(A)")
    ax.set_ylabel("pairs")
    ax.set_xlim(-span, span)
    ax.legend(fontsize=8)
    relabelled = len(kept) + len(flipped)
    ax.set_title(
        f"{title}\n{relabelled} pairs relabelled, {len(flipped)} flipped; "
        f"{unchanged} of {relabelled + unchanged} unchanged by the edit (Δp = 0, not shown)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
