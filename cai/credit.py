"""How a preference becomes a hit: the one set of rules by which a probability, a score or a length turns into a
win, a hit or an agreement, where a tie counts half (a judge, a labeller, a PM, a length baseline)."""

from __future__ import annotations

# A preference probability this near 0.5 prefers neither side: a tie, half credit wherever a label or judgement
# becomes a win or a hit (float noise would otherwise pick a side: a judge with p = 0.5 ± 1e-4 "won" 4 of 4).
TIE = 1e-3


def is_tie(p: float) -> bool:
    """Whether a preference probability prefers neither side (|p - 0.5| < TIE)."""
    return abs(p - 0.5) < TIE


def preference_credit(p: float, a_right: bool = True) -> float:
    """Credit of a preference probability p(A) when the right side is A (`a_right`) or B: 1 when it prefers the
    right side, 0 when the wrong one, 0.5 on a tie (is_tie): the one rule for wins, hits and agreements."""
    return 0.5 if is_tie(p) else float((p > 0.5) == a_right)


def option_credit(probs: list[float], correct: int) -> float:
    """Credit of option probabilities when option `correct` is right: 1 when it alone is on top, 1/m when it is
    one of m tied at the top, else 0. An option ties with the top one when the preference between the two,
    p_top / (p_top + p), is a tie (is_tie), so float noise picks no side; for a pair [p, 1 − p] this is
    preference_credit(p)."""
    top = max(probs)
    tied = [i for i, p in enumerate(probs) if top + p <= 0 or is_tie(top / (top + p))]
    return 1.0 / len(tied) if correct in tied else 0.0


def credit(scores: list[float], correct: int) -> float:
    """1 when the right candidate scores highest alone, 1/m when m candidates tie at the top with it, else 0."""
    top = max(scores)
    tied = [i for i, s in enumerate(scores) if s == top]
    return 1.0 / len(tied) if correct in tied else 0.0


LONGER, SHORTER = "prefer longer", "prefer shorter"


def length_hits(lengths: list[list[float]], correct: list[int]) -> dict[str, list[float]]:
    """Per-item credit of the length baselines, preferring the longest and the shortest candidate, from the
    candidates' lengths (equal lengths share the credit)."""
    return {
        LONGER: [credit(ls, c) for ls, c in zip(lengths, correct)],
        SHORTER: [credit([-x for x in ls], c) for ls, c in zip(lengths, correct)],
    }
