"""The preference model's loss maths, pure functions on tensors (tested on hand-made values): the CAI paper's
soft-label cross-entropy, Bradley–Terry on hard labels, reward centring, and pair accuracy."""

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


def preference_loss(r_a, r_b, p_a, *, hard: bool = False, center_coef: float = 0.0):
    """Mean PM loss over a batch: soft labels (or labels rounded to 0/1 with `hard`) plus optional centring."""
    target = (p_a > 0.5).to(r_a.dtype) + 0.5 * (p_a == 0.5).to(r_a.dtype) if hard else p_a
    loss = soft_label_loss(r_a, r_b, target).mean()
    if center_coef:
        loss = loss + center_coef * centring_loss(r_a, r_b).mean()
    return loss


def pair_accuracy(r_a, r_b, p_a):
    """Share of pairs (with a non-tied label) whose score order agrees with the label; nan when all tie."""
    keep = p_a != 0.5
    if not bool(keep.any()):
        return float("nan")
    return float(((r_a > r_b) == (p_a > 0.5))[keep].float().mean())
