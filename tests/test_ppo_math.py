"""PPO maths against values computed by hand on small tensors; padding never contributes."""

from __future__ import annotations

import math

import pytest
import torch

from cai.rl import ppo_math as pm


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_masked_mean_var_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1000.0]])
    assert float(pm.masked_mean(x, MASK)) == pytest.approx(3.0)  # (1+2+3+4+5)/5
    assert pm.masked_mean(x, MASK, dim=1).tolist() == pytest.approx([2.0, 4.5])
    assert float(pm.masked_var(x, MASK)) == pytest.approx(2.5)  # unbiased: 10/4
    assert float(pm.masked_var(x, MASK, unbiased=False)) == pytest.approx(2.0)
    w = pm.whiten(x, MASK)
    assert w[1, 2] == 0  # padding comes out as 0
    assert w[0, 0] == pytest.approx((1 - 3) / math.sqrt(2.5), rel=1e-5)
    assert float(pm.masked_mean(w, MASK)) == pytest.approx(0.0, abs=1e-6)
    scaled = pm.whiten(x, MASK, shift_mean=False)  # scale only: the mean is kept
    assert scaled[0, 0] == pytest.approx((1 - 3) / math.sqrt(2.5) + 3, rel=1e-5)
    # a different value under the padding changes nothing
    x2 = x.clone()
    x2[1, 2] = -7.0
    assert torch.equal(pm.whiten(x2, MASK), w)


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0]])
    close(pm.kl_per_token(logp, ref, mask, "k1"), [[0.5, -1.0]])
    # k3 = (r - 1) - log r with log r = ref - logp
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    close(pm.kl_per_token(logp, ref, mask, "k3"), [k3])
    assert (pm.kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()
    close(pm.kl_per_token(logp, ref, torch.tensor([[1.0, 0.0]]), "k1"), [[0.5, 0.0]])
    # a padded position's log-prob may be anything (generation logits are not zeroed there): k3's exp overflows
    # to inf, and the masked sum stays finite
    far = pm.kl_per_token(
        torch.tensor([[-1.0, -95.0]]), torch.tensor([[-1.2, 0.0]]), torch.tensor([[1, 0]]), "k3"
    )
    close(far, [[math.exp(-0.2) - 1 + 0.2, 0.0]])
    with pytest.raises(ValueError):
        pm.kl_per_token(logp, ref, mask, "k2")


def test_token_rewards_put_score_on_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    rewards, non_score = pm.token_rewards(torch.tensor([1.0, 2.0]), kl, 0.5, MASK)
    close(non_score, [[-0.05, -0.1, -0.15], [-0.2, -0.25, 0.0]])
    close(rewards, [[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.6, 5.0]])
    adv, ret = pm.gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - 0.3 = 0.7; d1 = 0 + 0.9*0.3 - 0.2 = 0.07; d0 = 0.9*0.2 - 0.1 = 0.08
    a2 = 0.7
    a1 = 0.07 + 0.72 * a2
    a0 = 0.08 + 0.72 * a1
    # row 1 ends at t=1: d1 = 1 - 0.6 = 0.4; d0 = 0.5 + 0.9*0.6 - 0.4 = 0.64; padding (r=7, V=5) ignored
    b1 = 0.4
    b0 = 0.64 + 0.72 * b1
    close(adv, [[a0, a1, a2], [b0, b1, 0.0]])
    close(ret, [[a0 + 0.1, a1 + 0.2, a2 + 0.3], [b0 + 0.4, b1 + 0.6, 0.0]])
    # gamma = lam = 1: advantages are reward-to-go minus value
    adv1, _ = pm.gae(rewards, values, MASK, 1.0, 1.0)
    assert adv1[0].tolist() == pytest.approx([0.9, 0.8, 0.7], rel=1e-5)


def test_policy_loss_clips_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, st = pm.policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: ratio 1.5, A=1 -> max(-1.5, -1.2) = -1.2 (clipped); token 1: ratio .5 -> max(-.5, -.8) = -.5
    assert float(loss) == pytest.approx((-1.2 - 0.5) / 2, rel=1e-5)
    assert float(st["clipfrac"]) == pytest.approx(0.5)
    approx_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    assert float(st["approx_kl"]) == pytest.approx(approx_kl, rel=1e-5)
    # gradient flows only through the unclipped token
    logp = logp.clone().requires_grad_(True)
    pm.policy_loss(logp, old, adv, mask, 0.2)[0].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 1] != 0


def test_sequence_mean_weighs_each_response_once_by_hand():
    # two responses of 1 and 3 tokens (row 1 padded at its end), advantages 3 and -1, ratio 1 everywhere
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[3.0, 3.0, 3.0], [-1.0, -1.0, -1.0]]) * mask
    w = pm.sequence_weights(mask)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert pm.sequence_weights(torch.zeros(1, 3)).tolist() == [[0.0, 0.0, 0.0]]  # an empty row weighs nothing
    logp = torch.zeros(2, 3, requires_grad=True)
    # token mean: (-3 + 1 + 1 + 1) / 4 = 0; sequence mean: (-3 + 1) / 2 = -1
    token, _ = pm.policy_loss(logp, torch.zeros(2, 3), adv, mask, 0.2)
    seq, st = pm.policy_loss(logp, torch.zeros(2, 3), adv, mask, 0.2, n_tokens=2, weights=w)
    assert float(token) == pytest.approx(0.0) and float(seq) == pytest.approx(-1.0)
    assert float(st["ratio"]) == pytest.approx(1.0)  # the stats stay token means
    seq.backward()  # d/dlogp of -A·ρ/|o_i|/2 at ρ = 1: -3/2 on the short row, 1/6 on each token of the long one
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.5, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]]))


def test_value_loss_clips_by_hand():
    v = torch.tensor([[1.0, 0.9, 3.0]])
    old = torch.tensor([[0.5, 0.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = pm.value_loss(v, old, ret, mask, clip_range=0.2)
    # token 0: (1-0)^2 = 1 vs clipped (0.7-0)^2 = .49 -> 1; token 1: (0.9-1)^2 = .01 vs clipped (0.2-1)^2 = .64 -> .64
    assert float(loss) == pytest.approx(0.5 * (1.0 + 0.64) / 2, rel=1e-5)
    assert float(clipfrac) == pytest.approx(0.5)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    assert float(pm.explained_variance(ret, ret, MASK)) == pytest.approx(1.0)
    assert float(pm.explained_variance(torch.zeros_like(ret), ret - 3.0, MASK)) == pytest.approx(
        0.0, abs=1e-6
    )
    assert math.isnan(float(pm.explained_variance(ret, torch.ones_like(ret), MASK)))


def test_explained_variance_over_processes_is_the_whole_batchs():
    """Two processes' halves: the variance over both (what the trainer passes) gives the whole batch's explained
    variance; the mean of each half's does not."""
    g = torch.Generator().manual_seed(0)
    ret, val = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    whole = float(pm.explained_variance(val, ret, mask))

    def over_both(x, m):  # as global_stats sums both halves' moments
        return pm.masked_var(x, m, unbiased=False)

    halves = [(val[i : i + 2], ret[i : i + 2], mask[i : i + 2]) for i in (0, 2)]
    mean_of_halves = sum(float(pm.explained_variance(*h)) for h in halves) / 2
    assert abs(mean_of_halves - whole) > 0.05
    assert float(pm.explained_variance(val, ret, mask, over_both)) == pytest.approx(whole, abs=1e-6)


def test_entropy_from_logits():
    from cai.runtime.forward import logit_entropy

    assert float(logit_entropy(torch.zeros(4))) == pytest.approx(math.log(4))


def test_adaptive_controller_by_hand_and_state():
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert c.update(9.0, n_steps=100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error 0.5 clipped to 0.2
    c2 = pm.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    c2.update(5.4, n_steps=100)  # error -0.1
    assert c2.value == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    c3 = pm.AdaptiveKLController(1.0, 1.0, 1)
    c3.load_state_dict(c.state_dict())
    assert c3.state_dict() == c.state_dict()
    f = pm.FixedKLController(0.3)
    assert f.update(100.0, 8) == 0.3


def test_lr_factor():
    assert [pm.lr_factor(u, 4, 2, "linear") for u in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert pm.lr_factor(3, 4, 0, "constant") == 1.0
    assert pm.lr_factor(0, 4, 0, "cosine") == pytest.approx(1.0)
    assert pm.lr_factor(2, 4, 0, "cosine") == pytest.approx(0.5)


def test_group_advantages_by_hand():
    # two prompts, k = 3 samples each, contiguous
    r = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    # RLOO: r_i − mean of the other two: 1 − 4, 2 − 3.5, 6 − 1.5; a flat group gives 0
    assert pm.rloo_advantages(r, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    # GRPO: (r − mean) / (std + eps), std with Bessel's correction: mean 3, std sqrt(7)
    s = math.sqrt(7.0) + 1e-4
    assert pm.grpo_advantages(r, 3).tolist() == pytest.approx([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0])
    # Dr. GRPO: centred, not divided by the spread
    assert pm.grpo_advantages(r, 3, scale=False).tolist() == pytest.approx([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])
    # a leave-one-out advantage is k/(k−1) times the centred reward, so each group's advantages sum to 0
    assert pm.rloo_advantages(r, 3).tolist() == pytest.approx(
        (1.5 * (r - r.view(2, 3).mean(1).repeat_interleave(3))).tolist()
    )
    spread, flat = pm.group_stats(r, 3)
    assert float(spread) == pytest.approx(math.sqrt(7.0) / 2) and float(flat) == 0.5


@pytest.mark.parametrize("value", [-1.5255959033966064, -211.52194213867188, 0.7])
def test_a_group_of_equal_rewards_has_no_advantage_whatever_the_rounding(value):
    # the mean of three equal floats can differ from them by an ulp: GRPO divided that residue by its eps
    r = torch.tensor([value] * 3 + [1.0, 2.0, 4.0])
    for adv in (pm.grpo_advantages(r, 3), pm.rloo_advantages(r, 3)):
        assert adv[:3].tolist() == [0.0, 0.0, 0.0] and adv[3:].abs().min() > 0.1
    assert float(pm.group_stats(r, 3)[1]) == 0.5
    assert float(pm.group_stats(r[:3], 3)[1]) == 1.0


def test_selected_logprobs_by_hand_and_against_log_softmax():
    from cai.runtime.forward import selected_logprobs

    # two tokens with probabilities 1/4 and 3/4; at temperature 2 the logits halve: p = [1, sqrt 3] / (1 + sqrt 3)
    z = torch.tensor([[0.0, math.log(3.0)]])
    assert selected_logprobs(z, torch.tensor([1])).tolist() == pytest.approx([math.log(0.75)])
    assert selected_logprobs(z, torch.tensor([0]), 2.0).tolist() == pytest.approx(
        [-math.log(1 + math.sqrt(3))]
    )

    # 40 rows (more than one block of rows) in [5, 8, V]: values and gradients as log_softmax + gather give
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 8, 70)).requires_grad_(True)
    tokens = torch.randint(0, 70, (5, 8))
    upstream = torch.randn(5, 8)
    got = selected_logprobs(logits, tokens, 0.7)
    (got * upstream).sum().backward()
    grad_got, logits.grad = logits.grad.clone(), None
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (want * upstream).sum().backward()
    assert got.shape == (5, 8)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_got, logits.grad, rtol=1e-5, atol=1e-7)
    # each row's gradient sums to zero (the softmax part cancels the one-hot part)
    assert grad_got.sum(-1).abs().max() < 1e-5
    small = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: selected_logprobs(x, torch.tensor([0, 5, 2]), 1.3), (small,))


@pytest.mark.parametrize("scale", [1.0, 100.0, float("nan")])
def test_gradient_clipping_matches_torch_and_leaves_unclipped_gradients_alone(scale):
    """The trainer's clip gives what torch.nn.utils.clip_grad_norm_ gives: the same norm and gradients, NaN
    spreading the same way; under the limit the gradients are not rewritten (same storage, same values)."""
    from cai.rl.engine import clip_gradients

    g = torch.Generator().manual_seed(0)
    made = [torch.randn(5, 3, generator=g) * 0.1, torch.randn(7, generator=g) * 0.1]
    made[1][2] *= scale

    def params():
        ps = [torch.nn.Parameter(torch.zeros_like(t)) for t in made]
        for p, t in zip(ps, made):
            p.grad = t.clone()
        return ps + [torch.nn.Parameter(torch.zeros(2))]  # one without a gradient

    ours, theirs = params(), params()
    before = [p.grad.data_ptr() for p in ours[:2]]
    norm = clip_gradients(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(norm, expected, equal_nan=True)
    for a, b in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)
    if scale == 1.0:  # norm ~0.4: nothing clipped, the very tensors handed in
        assert float(norm) < 1.0
        assert [p.grad.data_ptr() for p in ours[:2]] == before
        assert all(torch.equal(p.grad, t) for p, t in zip(ours[:2], made))
    elif scale == 100.0:
        assert float(
            torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:2]]))
        ) == pytest.approx(1.0, rel=1e-5)
    else:
        assert all(torch.isnan(p.grad).all() for p in ours[:2])
