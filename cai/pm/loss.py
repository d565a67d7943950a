"""The preference model's loss maths, pure functions on tensors (tested on hand-made values): the CAI paper's
soft-label cross-entropy, Bradley–Terry on hard labels, reward centring, and pair accuracy; and DPO's, whose
implicit reward β·log(π/π_ref) the same soft-label loss scores (cai.rl.dpo)."""

from __future__ import annotations


def soft_label_loss(r_a, r_b, p_a):
    """Per-pair soft-label cross-entropy −[p·log σ(r_a−r_b) + (1−p)·log σ(r_b−r_a)] (the CAI paper's PM loss).

    With p_a ∈ {0, 1} it is the Bradley–Terry loss on hard labels."""
    import torch.nn.functional as F

    d = r_a - r_b
    return -(p_a * F.logsigmoid(d) + (1.0 - p_a) * F.logsigmoid(-d))


def centring_loss(r_a, r_b):
    """Reward-centring term (r_a + r_b)², which keeps scores near zero mean (as in TRL's center_rewards)."""
    return (r_a + r_b) ** 2


def pair_losses(r_a, r_b, p_a, *, hard: bool = False, center_coef: float = 0.0):
    """Each pair's PM loss: soft labels (or labels rounded to 0/1 with `hard`) plus optional centring."""
    loss = soft_label_loss(r_a, r_b, soft_targets(p_a, hard))
    if center_coef:
        loss = loss + center_coef * centring_loss(r_a, r_b)
    return loss


def preference_loss(r_a, r_b, p_a, *, hard: bool = False, center_coef: float = 0.0):
    """Mean PM loss over a batch (pair_losses averaged)."""
    return pair_losses(r_a, r_b, p_a, hard=hard, center_coef=center_coef).mean()


def pair_hits(r_a, r_b, p_a):
    """(hits, scored): over the pairs with a non-tied label (scored), how many have a score order that agrees
    with it, a tie in score counting half whichever side the label prefers (as ties share the credit everywhere
    else). Sums, so that batches pool into one accuracy (tensors)."""
    keep = p_a != 0.5
    return pair_credit(r_a, r_b, p_a)[keep].sum(), keep.sum()


def pair_credit(r_a, r_b, p_a):
    """Each pair's credit for pair_hits: 1 when its score order agrees with its label, 0.5 for a tie in score,
    else 0 (meaningless where the label ties)."""
    return ((r_a > r_b) == (p_a > 0.5)).float().masked_fill(r_a == r_b, 0.5)


def pair_accuracy(r_a, r_b, p_a):
    """Share of pairs (with a non-tied label) whose score order agrees with the label (pair_hits); nan when all
    labels tie."""
    hits, scored = pair_hits(r_a, r_b, p_a)
    return float(hits / scored) if int(scored) else float("nan")


def dpo_loss(logp_a, logp_b, ref_logp_a, ref_logp_b, p_a, beta: float):
    """Per-pair soft-label DPO loss −[p·log σ(βΔ) + (1−p)·log σ(−βΔ)], Δ = (log π(a) − log π_ref(a)) −
    (log π(b) − log π_ref(b)) from sequence log-probabilities: the soft-label PM loss on the implicit rewards
    β·log(π/π_ref). At p = 1 it is DPO's sigmoid loss −log σ(βΔ); a uniform p = 1 − ε is conservative DPO."""
    return soft_label_loss(beta * (logp_a - ref_logp_a), beta * (logp_b - ref_logp_b), p_a)


def soft_targets(p_a, hard: bool = False):
    """The target of each pair: its AI label p, or with `hard` p rounded at 0.5 (a tie stays 0.5)."""
    if not hard:
        return p_a
    return (p_a > 0.5).to(p_a.dtype) + 0.5 * (p_a == 0.5).to(p_a.dtype)
