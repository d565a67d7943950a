"""Markdown pieces every report uses (the run report, evaluation reports, constitution test and effect reports):
a table, a number, a number with its interval, and quoted model text."""

from __future__ import annotations

import math

from cai.stats import small_n


def num(x, spec: str = ".3f", missing: str = "—") -> str:
    """A number for a table: `spec`-formatted; None or NaN is `missing`."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return format(x, spec)


def cell(v, nd: int = 3) -> str:
    """Any value for a table cell: None as '—', bools as yes/no, floats to `nd` significant digits."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v).replace("|", "\\|").replace("\n", "<br>")


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells go through `cell`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def with_ci(res: dict | None, key: str = "accuracy") -> str:
    """'0.812 [0.71, 0.89] (n = 64)' from a result dict with `key`, optional 'ci95' and 'n' ('(n = 8, small)'
    below cai.stats.SMALL_N; '(n = 64 in 32 prompts)' when 'clusters', the prompts of a clustered interval, is
    below n, and then small when the prompts are: pairs of one prompt count for less than independent ones); '—'
    when absent, 'error: ...' when the result is an error."""
    if not res or res.get(key) is None:
        return "—" if not res or "error" not in res else f"error: {res['error'][:80]}"
    ci, n, k = res.get("ci95"), res.get("n"), res.get("clusters")
    text = f"{res[key]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{res[key]:.3f}"
    clustered = k is not None and n is not None and k < n
    of = f" in {k} prompts" if clustered else ""
    return text + (
        f" (n = {n}{of}{', small' if small_n(k if clustered else n) else ''})" if n is not None else ""
    )


def clean(text: str, limit: int = 600) -> str:
    """Model text for markdown: trimmed to `limit` characters, control characters (a random model writes some)
    replaced."""
    text = "".join(
        c if c in "\n\t" or (ord(c) >= 32 and not 0x7F <= ord(c) < 0xA0) else "\ufffd" for c in (text or "")
    ).strip()
    return (text[:limit] + " …") if len(text) > limit else text


def quote(text: str, limit: int = 600) -> str:
    """Model text as a markdown block quote ('> ' on every line)."""
    return "\n".join("> " + line for line in clean(text, limit).splitlines() or [""])
