"""`cai constitution effect --pm DIR`: does the trained preference model side with the OLD labels or the NEW?

Only pairs whose label flipped (crossed 0.5 by more than the margin) can tell: there OLD and NEW prefer
different responses, so the PM agrees with exactly one of them. The comparison is paired on those discordant
pairs (McNemar's test, an exact sign test on them): the share of them where the PM sides with OLD, with its 95%
interval, and the paired difference agree(OLD) − agree(NEW) = 2·share − 1. "Retrain the PM" only when that
interval excludes 0; a pair whose label moves 0.49 → 0.51 is not a flip and counts for nothing. Pairs of one
prompt (feedback.max_pairs_per_prompt > 1) are not independent: every interval here is clustered by the pair's
prompt (cai.stats.clustered_ci), the sign test flips a prompt's votes together (sign_test), and `clusters`
counts the prompts beside n (pairs).
"""

from __future__ import annotations

from collections import Counter

from cai.constitution.effect import prompt_of
from cai.credit import is_tie
from cai.stats import clustered_ci


def sign_test(sides: list[bool], clusters: list) -> float:
    """Exact two-sided p-value of the votes `sides` (True: sides with OLD) under "each prompt's votes are as
    likely flipped": the prompt's net vote d (OLD minus NEW) keeps or flips its sign by a fair coin, and p is the
    chance that |the sum of the signed d| reaches the observed one. Votes of one prompt move together, so they
    count as one coin, not several; with one vote per prompt this is McNemar's exact test (a binomial sign test)."""
    net: dict = {}
    for side, c in zip(sides, clusters):
        net[c] = net.get(c, 0) + (1 if side else -1)
    observed = abs(sum(net.values()))
    ways = {0: 1}  # sum of the signed net votes -> number of the 2^prompts sign patterns giving it (exact)
    # the m prompts of one net size d together: j of them positive with C(m, j) patterns, sum d(2j - m)
    for d, m in Counter(abs(v) for v in net.values() if v).items():
        nxt: dict = {}
        c = 1  # C(m, j), stepped by its recurrence
        for j in range(m + 1):
            shift = d * (2 * j - m)
            for s, w in ways.items():
                nxt[s + shift] = nxt.get(s + shift, 0) + w * c
            c = c * (m - j) // (j + 1)
        ways = nxt
    return sum(w for s, w in ways.items() if abs(s) >= observed) / sum(ways.values())


def pm_agreement(rows: list[dict], scores: list[tuple[float, float]], pm_dir: str, min_pairs: int) -> dict:
    """How often the PM's preference (r_a > r_b) agrees with the OLD and the NEW labels, on all labelled pairs,
    the relabelled ones and the flipped ones; the verdict from the paired comparison on the flipped pairs."""

    def agree(sel, key) -> dict | None:
        """{agreement, ci95, n, clusters} over the selected pairs whose label prefers a side (one within
        cai.credit.TIE of 0.5 is no preference: float noise would pick a side); a PM tie (r_a = r_b) counts half.
        The rows of one pair (--draw-edited: one per edited principle) are one pair: its credit is their mean, n
        counts pairs; the interval is clustered by prompt, `clusters` prompts."""
        by_pair: dict = {}
        for i, (r, s) in enumerate(zip(rows, scores)):
            if r["p_old"] is not None and sel(r) and not is_tie(r[key]):
                hit = 0.5 if s[0] == s[1] else float((s[0] > s[1]) == (r[key] > 0.5))
                by_pair.setdefault(r.get("pair", i), (prompt_of(r, i), []))[1].append(hit)
        if not by_pair:
            return None
        credits = [sum(h) / len(h) for _, h in by_pair.values()]
        prompts = [g for g, _ in by_pair.values()]
        return {
            "agreement": sum(credits) / len(credits),
            "ci95": list(clustered_ci(credits, prompts)),
            "n": len(credits),
            "clusters": len(set(prompts)),
        }

    relabelled = len(
        {
            r.get("pair", i)
            for i, r in enumerate(rows)
            if r["p_old"] is not None and not r.get("same_prompt", False)
        }
    )
    res = {
        "dir": pm_dir,
        "relabelled": relabelled,
        "agree_old": agree(lambda r: True, "p_old"),
        "agree_new": agree(lambda r: True, "p_new"),
        "agree_old_relabelled": agree(lambda r: not r.get("same_prompt", False), "p_old"),
        "agree_new_relabelled": agree(lambda r: not r.get("same_prompt", False), "p_new"),
        "agree_old_flipped": agree(lambda r: r["flipped"], "p_old"),
        "agree_new_flipped": agree(lambda r: r["flipped"], "p_new"),
    }
    # discordant pairs: flipped, and the PM has a preference (r_a = r_b sides with neither label). The rows of
    # one pair are one vote, counted only when its flipped rows agree on the direction (else "mixed", left out)
    votes: dict = {}
    for i, (r, s) in enumerate(zip(rows, scores)):
        if r["p_old"] is not None and r["flipped"] and s[0] != s[1]:
            votes.setdefault(r.get("pair", i), (prompt_of(r, i), set()))[1].add(
                (s[0] > s[1]) == (r["p_old"] > 0.5)
            )
    disc = [(g, v.pop()) for g, v in votes.values() if len(v) == 1]
    k = sum(side for _, side in disc)
    # the share siding with OLD, clustered by prompt: flipped pairs of one prompt are not independent votes
    lo, hi = clustered_ci([float(side) for _, side in disc], [g for g, _ in disc])
    res["paired"] = {
        "n": len(disc),
        "clusters": len({g for g, _ in disc}),
        "pm_sides_with_old": k,
        "pm_sides_with_new": len(disc) - k,
        "difference": (2 * k - len(disc)) / len(disc) if disc else None,
        "difference_ci95": [2 * lo - 1, 2 * hi - 1] if disc else None,
        "p_value": sign_test([side for _, side in disc], [g for g, _ in disc]),
        "mixed": len(votes) - len(disc),
    }
    res["verdict"] = verdict(res["paired"], relabelled, min_pairs)
    return res


def verdict(p: dict, relabelled: int, min_pairs: int) -> str:
    """What the paired comparison says; "retrain" only when the interval of the difference excludes 0."""
    if relabelled < min_pairs:
        return (
            f"Not measured: {relabelled} pair(s) were relabelled under NEW (fewer than {min_pairs}), so the PM's "
            "agreement says nothing about the edit; rerun with --draw-edited or more pairs."
        )
    mixed = p.get("mixed", 0)
    left = (
        f"{mixed} pair(s) whose labels flipped both ways under different principles left out" if mixed else ""
    )
    if not p["n"]:
        return (
            f"{'No pair flipped one way' if mixed else 'No label flipped'} beyond the margin on the {relabelled} "
            f"relabelled pairs (n = 0 discordant pairs{'; ' + left if left else ''}): the edit changes no "
            "preference the PM could disagree with."
        )
    lo, hi = p["difference_ci95"]
    prompts = f" in {p['clusters']} prompts" if "clusters" in p else ""
    head = (
        f"On the {p['n']} flipped pairs{f' ({left})' if left else ''} the PM sides with OLD on {p['pm_sides_with_old']} and with NEW on "
        f"{p['pm_sides_with_new']}: agree(OLD) - agree(NEW) = {p['difference']:+.3f} (95% CI {lo:+.3f} to "
        f"{hi:+.3f}, exact sign test over prompts p = {p['p_value']:.3g}, n = {p['n']}{prompts}): "
    )
    if lo > 0:
        return head + "retrain the PM on NEW labels to carry the edit into RL."
    if hi < 0:
        return head + "the PM already prefers what the NEW labels prefer."
    return head + "the interval includes 0, so this does not show that the PM must be retrained."
