"""What a model with no skill scores on a suite, so that an accuracy can be read as skill or not.

On the same items as the model under test:
- `untrained`: the PM's backbone with a freshly initialised head, same seed (scored by the caller: what training
  added is the lift over it);
- `prefer longer` / `prefer shorter`: the candidate with the most / fewest characters wins;
- `most common answer` (option suites: ai_risk, multiple_choice): the candidate whose text is most often the
  right answer among the *other* items of the suite (leave-one-out, so an item never votes for itself).
  Leaving an item out moves its own candidates' rates by one vote, against its right answer; candidates whose
  rates differ by no more than that are tied, so an answer text that carries no information scores chance.

Ties among the top candidates share the credit (1/m each), as for the model. `compare` gives each baseline's
accuracy with its 95% Wilson interval (as the model's), the lift of the model over the best baseline (and over
the untrained model) as a paired bootstrap CI of the per-item difference (marked unreliable below SMALL_N items),
and a flag for a baseline already far from chance. The correlation of scores with response length says whether
a PM mostly measures length.
"""

from __future__ import annotations

from collections import Counter

from cai.credit import length_hits
from cai.stats import (
    bootstrap_ci,
    cluster_correlation_ci,
    correlation_ci,
    mean,
    pearson,
    small_n,
    small_n_note,
    wilson_ci,
)

UNTRAINED = "untrained"
COMMON = "most common answer"
OPTION_FORMATS = ("ai_risk", "multiple_choice")
FAR = 0.1  # a baseline this far from chance, with a CI that excludes chance, is flagged
LENGTH_WARN = 0.7  # |r| between score and length at or above this: the PM mostly measures length


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _other_counts(candidates: list[list[str]], correct: list[int]) -> list[list[tuple[int, int]]]:
    """Per item, each candidate text's (times right, times seen) over the other items only."""
    right: Counter = Counter()
    seen: Counter = Counter()
    for cands, c in zip(candidates, correct):
        for j, text in enumerate(cands):
            seen[_norm(text)] += 1
            right[_norm(text)] += j == c
    return [
        [(right[_norm(t)] - (j == c), seen[_norm(t)] - 1) for j, t in enumerate(cands)]
        for cands, c in zip(candidates, correct)
    ]


def answer_prior(candidates: list[list[str]], correct: list[int]) -> list[list[float]]:
    """Per item, each candidate's smoothed rate of being the right answer, (right + 1) / (seen + 2), counted over
    the other items only (its own item left out)."""
    return [[(r + 1) / (n + 2) for r, n in row] for row in _other_counts(candidates, correct)]


def prior_hits(candidates: list[list[str]], correct: list[int]) -> list[float]:
    """Per-item credit of the 'most common answer' baseline: the candidate with the best leave-one-out rate
    (answer_prior), tied with every candidate it does not beat by more than this item's own vote. Leaving the
    item out tips the counts against its own right answer, so where the texts are balanced (each right half the
    time) the leave-one-out choice was wrong on every item (accuracy 0); a choice that would survive giving this
    item's vote to the other candidate is not tipped. A text seen in no other item keeps the prior's 0.5."""
    out = []
    for row, c in zip(_other_counts(candidates, correct), correct):
        loo = [(r + 1) / (n + 2) for r, n in row]
        lo = [(r + 1) / (n + 3) if n else 0.5 for r, n in row]  # were this item a wrong vote for the text
        hi = [(r + 2) / (n + 3) if n else 0.5 for r, n in row]  # ... a right one
        top = max(range(len(row)), key=lambda j: loo[j])
        tied = [j for j in range(len(row)) if j == top or not lo[top] > hi[j]]
        out.append(1.0 / len(tied) if c in tied else 0.0)
    return out


def trivial_hits(
    candidates: list[list[str]], correct: list[int], option_suite: bool
) -> dict[str, list[float]]:
    """Per-item credit of the trivial baselines that fit the suite's format."""
    out = length_hits([[float(len(t)) for t in cands] for cands in candidates], correct)
    if option_suite:
        out[COMMON] = prior_hits(candidates, correct)
    return out


def far_from_chance(accuracy: float, ci: tuple[float, float], chance: float) -> bool:
    return abs(accuracy - chance) >= FAR and not (ci[0] <= chance <= ci[1])


def _paired_lift(hits: list[float], base: list[float], seed: int) -> dict:
    diffs = [a - b for a, b in zip(hits, base)]
    out = {"value": mean(diffs), "ci95": list(bootstrap_ci(diffs, seed=seed)), "n": len(diffs)}
    if small_n(len(diffs)):  # a bootstrap over a few items collapses: [0, 0] for three equal pairs
        out.update(small_sample=True, note=f"unreliable: {small_n_note(len(diffs))}")
    return out


def compare(hits: list[float], baselines: dict[str, list[float]], chance: float, seed: int = 0) -> dict:
    """Each baseline's accuracy [95% Wilson CI] and whether it is far from chance; the model's lift over the best
    baseline (and over the untrained model) with a paired bootstrap CI; plain-words flags. The 'most common
    answer' baseline is never flagged below chance: leaving each item out can only tip it against the item."""
    table = {}
    for name, h in baselines.items():
        acc, ci = mean(h), wilson_ci(sum(h), len(h))
        table[name] = {
            "accuracy": acc,
            "ci95": list(ci),
            "n": len(h),
            "far_from_chance": far_from_chance(acc, ci, chance) and not (name == COMMON and acc < chance),
        }
    out: dict = {"baselines": table, "flags": []}
    if not table or not hits:
        return out
    best = max(table, key=lambda k: table[k]["accuracy"])
    out["best_baseline"] = best
    out["lift"] = {"over": best, **_paired_lift(hits, baselines[best], seed)}
    if UNTRAINED in baselines and best != UNTRAINED:
        out["lift_untrained"] = {"over": UNTRAINED, **_paired_lift(hits, baselines[UNTRAINED], seed)}
    for name, row in table.items():
        if row["far_from_chance"]:
            side = "above" if row["accuracy"] > chance else "below"
            out["flags"].append(
                f"baseline '{name}' is far {side} chance: {row['accuracy']:.3f} "
                f"[{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] against chance {chance:.3f}; "
                "the suite rewards something other than skill, so read the lift, not the accuracy"
            )
    return out


def length_correlation(
    scores: list[float], texts: list[str], groups: list | None = None, unit: str = "prompts"
) -> dict:
    """Pearson correlation of scores with response length in characters, with its 95% CI, and whether the scores
    mostly measure length (|r| >= LENGTH_WARN). With `groups` (each text's prompt or item) the interval is a
    bootstrap over the groups (`unit` names them), since texts of one group share its effects; without, Fisher's z
    over the texts."""
    lengths = [float(len(t)) for t in texts]
    scores = list(map(float, scores))
    r = pearson(scores, lengths)
    if groups is None:
        ci, method = correlation_ci(r, len(lengths)), "Fisher z"
    else:
        ci = cluster_correlation_ci(scores, lengths, groups) if r is not None else None
        method = f"bootstrap over {len(set(groups))} {unit}"
    out = {
        "r": r,
        "ci95": list(ci) if ci else None,
        "ci_method": method,
        "n": len(lengths),
        "mostly_length": False,
    }
    if r is not None and abs(r) >= LENGTH_WARN:
        out["mostly_length"] = True
        out["warning"] = (
            f"scores correlate with response length (r = {r:.2f}"
            + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            + f", n = {len(lengths)}): the PM mostly measures length"
        )
    return out


def _ci(lo: float, hi: float, signed: bool = False) -> str:
    return f"{lo:+.3f} to {hi:+.3f}" if signed else f"{lo:.2f}, {hi:.2f}"


def describe(result: dict) -> tuple[list[str], list[str]]:
    """(lines, warnings) in plain words for the baselines, lift and length check of an evaluation result."""
    lines: list[str] = []
    table = result.get("baselines") or {}
    if table:
        parts = [f"{k} {r['accuracy']:.3f} [{_ci(*r['ci95'])}]" for k, r in table.items()]
        lines.append(f"baselines on the same {result.get('n')} items: " + "; ".join(parts))
    for key, what in (("lift", "the best baseline"), ("lift_untrained", "the untrained model")):
        lift = result.get(key)
        if lift and lift.get("value") is not None:
            over = f" ({lift['over']})" if key == "lift" else ""
            note = f"; {lift['note']}" if lift.get("note") else ""
            lines.append(
                f"lift over {what}{over}: {lift['value']:+.3f} (95% CI {_ci(*lift['ci95'], signed=True)}{note})"
            )
    if result.get("untrained_note"):
        lines.append(result["untrained_note"])
    length = result.get("length")
    if length and length.get("r") is not None:
        ci = f" [{_ci(*length['ci95'])}]" if length.get("ci95") else ""
        how = f"; CI by {length['ci_method']}" if length.get("ci_method") and ci else ""
        lines.append(
            f"correlation of score with response length: r = {length['r']:.2f}{ci} (n = {length['n']}{how})"
        )
    warnings = list(result.get("flags") or [])
    if length and length.get("warning"):
        warnings.append(length["warning"])
    return lines, warnings
