"""PPO maths as small pure functions on tensors, and the group baselines of the critic-free learners (RLOO,
GRPO) that share PPO's clipped loss. Every function takes a `mask` (1 = real token, 0 = padding) and padding
never contributes to a sum, a mean, a variance, a reward or an advantage.

Shapes: per-token tensors are [B, T] (T response tokens), per-sequence tensors are [B]; a group's k samples of
one prompt are contiguous rows.
"""

from __future__ import annotations

import math

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over the masked-in entries (0 when there are none)."""
    m = mask.to(x.dtype)
    n = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / n.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked-in entries; with `unbiased`, Bessel's correction n/(n-1) (n >= 2)."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, stats: tuple | None = None
) -> torch.Tensor:
    """(x - mean) / std over the masked-in entries; padding comes out as 0.

    `stats` = (mean, var) overrides the local statistics (e.g. all-reduced over processes). With
    `shift_mean=False` the mean is added back (scale only), as for reward whitening.
    """
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---- KL estimators (http://joschu.net/blog/kl-approx.html), per token, sampled from the policy ----


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref: unbiased, can be negative per token."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r with r = π_ref/π: unbiased, always ≥ 0, lower variance."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


def kl_per_token(logp, ref_logp, mask, estimator: str = "k1") -> torch.Tensor:
    if estimator not in ("k1", "k3"):
        raise ValueError(f"kl estimator '{estimator}': 'k1' or 'k3' expected")
    kl = kl_k1(logp, ref_logp) if estimator == "k1" else kl_k3(logp, ref_logp)
    # selected, not multiplied: k3 of a padded position's arbitrary log-probs can overflow to inf, and inf * 0 is NaN
    return torch.where(mask.bool(), kl, kl.new_zeros(()))


# ---- rewards and advantages ----


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last masked-in token of each row of a right-padded mask (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor):
    """Per-token rewards −β·KL_t on every response token, plus the sequence score on its last token.

    Returns (rewards [B, T], non_score_rewards [B, T]); padding gets 0.
    """
    m = mask.to(kl.dtype)
    non_score = -kl_coef * kl * m
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_tokens = m.sum(-1) > 0
    rewards[rows, last_index(mask)] += torch.where(
        has_tokens, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype)
    )
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
):
    """Generalised advantage estimation over right-padded sequences.

    δ_t = r_t + γ·V_{t+1} − V_t with V beyond the last real token taken as 0 (the episode ends there);
    A_t = δ_t + γλ·A_{t+1}. Returns (advantages, returns = A + V), both 0 on padding.
    """
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    T = r.shape[1]
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last * next_m
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + v) * m


def flat_groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """[G, 1] True for each group of k whose rewards are all exactly equal (no learning signal). Tested by
    equality, not by a zero spread: the rounding of a float mean leaves r − mean ≈ 1e-7·|r| and a std above 0."""
    r = rewards.reshape(-1, k)
    return (r == r[:, :1]).all(1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each of a prompt's k sequence rewards
    minus the mean of the other k − 1 (an unbiased baseline: it does not depend on the sample itself); exactly
    0 for a group whose rewards are all equal (flat_groups)."""
    r = rewards.reshape(-1, k)
    adv = r - (r.sum(1, keepdim=True) - r) / (k - 1)
    return adv.masked_fill(flat_groups(r, k), 0.0).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each of a prompt's k rewards minus the group mean, over the group's standard
    deviation (with Bessel's correction) + eps, or not divided with `scale` off (Dr. GRPO, Liu et al. 2025);
    exactly 0 for a group whose rewards are all equal (flat_groups: its rounding residue over eps would
    otherwise be a signal of up to 0.1 at PM-scale rewards)."""
    r = rewards.reshape(-1, k)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.masked_fill(flat_groups(r, k), 0.0).reshape(-1)


def group_stats(rewards: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean within-group standard deviation of the rewards, share of groups whose rewards are all equal: they
    carry no learning signal)."""
    r = rewards.reshape(-1, k)
    return r.std(1).mean(), flat_groups(r, k).to(rewards.dtype).mean()


# ---- losses ----


def token_mean(x: torch.Tensor, mask: torch.Tensor, n_tokens=None) -> torch.Tensor:
    """Mean over the masked-in entries, or their sum over `n_tokens` when given: the token count of the whole
    minibatch (over every micro-batch and process), so that summed micro-batch gradients, averaged over processes
    and multiplied by the number of processes, are exactly the minibatch's token mean."""
    return masked_mean(x, mask) if n_tokens is None else masked_sum(x, mask) / n_tokens


def sequence_weights(mask: torch.Tensor) -> torch.Tensor:
    """Per-token weights 1/|o_i| on each row's real tokens (a row sums to 1, an empty row to 0): token_mean with
    these weights and the row count in place of the token count is the mean over sequences of each sequence's
    token mean, the GRPO paper's average (Shao et al. 2024), where token weights 1 average over all tokens."""
    m = mask.to(torch.float32)
    return m / m.sum(1, keepdim=True).clamp(min=1)


def policy_loss(logp, old_logp, advantages, mask, clip_range: float, n_tokens=None, weights=None):
    """Clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1±ε)), ρ = exp(logp − old_logp) (over
    `n_tokens` tokens when given, see token_mean; `weights` in place of the mask in that mean, e.g.
    sequence_weights with the sequence count as `n_tokens`; the stats stay token means).

    Returns (loss, stats): approx_kl = mean ½(logp − old_logp)², clipfrac = share of clipped tokens, ratio = mean
    ρ, ratio_dev = max |ρ − 1| (the first-step check: 0 before any step when old and new log-probs agree).
    """
    diff = (logp - old_logp) * mask.to(logp.dtype)
    ratio = torch.exp(diff)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = token_mean(torch.maximum(loss1, loss2), mask if weights is None else weights, n_tokens)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean(0.5 * diff.pow(2), mask),
            "clipfrac": masked_mean((loss2 > loss1).to(logp.dtype), mask),
            "ratio": masked_mean(ratio, mask),
            "ratio_dev": ((ratio - 1).abs() * mask.to(ratio.dtype)).max(),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip_range: float, n_tokens=None):
    """Clipped value loss ½·mean max((V − R)², (clip(V, V_old ± c) − R)²) (over `n_tokens` tokens when given);
    returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(l1, l2), mask, n_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((l2 > l1).to(values.dtype), mask)
    return loss, clipfrac


def explained_variance(values, returns, mask, variance=None) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over real tokens (nan when the returns do not vary). `variance(x, mask)` is the
    masked variance of this batch by default; under several processes the trainer passes one over all of them
    (a mean of per-process ratios is not the batch's ratio)."""
    variance = variance or (lambda x, m: masked_var(x, m, unbiased=False))
    var_r = variance(returns, mask)
    ev = 1.0 - variance(returns - values, mask) / var_r
    return torch.where(var_r > 0, ev, torch.full_like(ev, float("nan")))


# ---- KL coefficient controllers ----


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β·(1 + e·n/horizon), e = clip(KL/target − 1, −0.2, 0.2), n = samples seen."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        if not math.isfinite(current_kl):
            return self.value
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


def make_kl_controller(cfg):
    """The controller a PPO config asks for (adaptive_kl, kl_coef, target_kl, kl_horizon)."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


def lr_factor(update: int, total: int, warmup: int, decay: str) -> float:
    """LR multiplier for update index `update` (0-based): linear warm-up, then linear/cosine decay or constant."""
    if warmup > 0 and update < warmup:
        return (update + 1) / warmup
    if decay == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(update - warmup, 0) / span, 1.0)
    if decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def first_step_warning(
    approx_kl: float, ratio_dev: float, tolerance: float, from_generation: bool
) -> str | None:
    """Before an update's first step the policy that is trained is the one that sampled, so ratio = 1 and
    approx-KL = 0 up to rounding; a message naming the likely cause when approx-KL exceeds `tolerance`."""
    if approx_kl <= tolerance:
        return None
    cause = (
        "old log-probs come from the sampling logits, which the training forward does not reproduce in this "
        "dtype (set ppo.logprobs_from_generation: false)"
        if from_generation
        else "the training forward is not deterministic (dropout, or a non-deterministic kernel)"
    )
    return (
        f"before the first step approx-KL is {approx_kl:.3g} (max |ratio - 1| {ratio_dev:.3g}), over the "
        f"tolerance {tolerance:g} (ppo.first_step_tolerance); likely cause: {cause}"
    )
