"""Small, generic matplotlib helpers that write PNG files (Agg backend; matplotlib is imported inside)."""

from __future__ import annotations

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


def bar_chart(
    path: str | Path,
    values: dict[str, float],
    title: str = "",
    ylabel: str = "",
    errors: dict[str, float] | None = None,
) -> Path:
    """Bars for {label: value}, with optional symmetric error bars {label: half-width}. Returns the PNG path."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 4.0), dpi=110)
    yerr = [errors.get(k, 0.0) for k in labels] if errors else None
    ax.bar(
        range(len(labels)), [values[k] for k in labels], yerr=yerr, capsize=4 if yerr else 0, color="#4C72B0"
    )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(
        labels, rotation=20 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center"
    )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
