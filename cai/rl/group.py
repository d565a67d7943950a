"""Critic-free on-policy learners against the PM: RLOO and GRPO, as a subclass of the PPO trainer that shares
everything but the advantages and the micro-batch loss.

One update: rollout_batch_size / k prompts (cai.rl.rollout.prompt_indices), each sampled k times in one generate
call through the same sampling as PPO (cai.rl.loop: the policy's current weights, seeded by place in the global
batch); the same forwards for old and reference log-probs (packed); the same scoring (normalised PM or reward
function, missing-EOS penalty, clipping). Then, per prompt group (cai.rl.ppo_math):

- RLOO (Ahmadian et al. 2024): the sequence reward is the score − β·Σ_t KL_t (k1, as PPO's penalty); the
  advantage is that reward minus the mean of the group's other k − 1 rewards;
- GRPO (Shao et al. 2024): the advantage is the score's group z-score (centred only with `scale_rewards` off,
  as in Dr. GRPO); the KL to the reference enters the loss as β times the token mean of the k3 estimate, as in
  the paper. k3 is never negative and its value estimates KL(π‖π_ref), but with the samples held fixed its
  expected gradient is that of the reverse KL(π_ref‖π): the two agree near the reference and part further
  from it.

A group whose rewards are all equal has advantage 0. Each response token gets its sequence's advantage, and
PPO's clipped surrogate (cai.rl.ppo_math.policy_loss) runs over `ppo_epochs` passes, as in PPO: with `loss_mean`
'token' (the default) an exact token mean over the global minibatch, with 'sequence' the mean over its
responses of each response's token mean (the GRPO paper's 1/G Σ_i 1/|o_i| Σ_t; GRPO's KL term alike). With one
epoch and one minibatch the ratio is 1 and the step is REINFORCE with the group baseline.

Why not TRL's RLOOTrainer / GRPOTrainer: they run their own generation loop (their own sampling, not cai's one
engine with its per-place seeds and, under issue 14, vLLM), their own checkpoints (no exact resume with the run
token, no fail-together divergence stop) and log under other names; continuing a policy across online rounds with
a new PM each round, the samples log and the first-step check would all be rewritten around them. This subclass
is the PPO loop with two small functions swapped.
"""

from __future__ import annotations

import torch

from cai.errors import UserError
from cai.rl import ppo_math as pm
from cai.rl.rollout import Rollout, prompt_indices
from cai.rl.trainer import PPOTrainer
from cai.runtime import distributed as dist

ALGORITHMS = ("rloo", "grpo")


class GroupTrainer(PPOTrainer):
    """RLOO or GRPO on a causal LM: `algorithm` 'rloo' or 'grpo', `samples_per_prompt` k; the policy (a
    PolicyModel without a value head), reference and reward as for PPOTrainer, no critic."""

    critic_free = True
    log_keys = ("policy/approx_kl", "policy/clipfrac", "loss/policy", "loss/kl")
    loss_keys = ("loss/policy", "loss/kl")

    def __init__(
        self, cfg, *, algorithm: str, samples_per_prompt: int, loss_mean="token", scale_rewards=True, **kwargs
    ):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm '{algorithm}': one of {', '.join(ALGORITHMS)} expected")
        if loss_mean not in ("token", "sequence"):
            raise ValueError(f"loss_mean '{loss_mean}': 'token' or 'sequence' expected")
        self.loss_mean, self.scale_rewards = loss_mean, scale_rewards
        k = samples_per_prompt
        if cfg.rollout_batch_size % k:
            raise UserError(
                f"ppo.rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of "
                f"policy.samples_per_prompt ({k}): an update samples k responses to each of its prompts"
            )
        self.algorithm, self.k = algorithm, k
        if algorithm == "rloo":  # its KL is in the reward: no KL loss term
            self.log_keys, self.loss_keys = self.log_keys[:-1], self.loss_keys[:-1]
        super().__init__(cfg, critic=None, **kwargs)

    @torch.no_grad()
    def rollout(self, update: int) -> Rollout:
        cfg, k = self.cfg, self.k
        groups = prompt_indices(len(self.prompt_ids), cfg.rollout_batch_size // k, update, self.seed)
        idx = [i for i in groups for _ in range(k)]  # each group's k samples contiguous
        s = self._sample(idx, update)
        input_ids, attn, mask, score = s.input_ids, s.attn, s.mask, s.score
        logprobs, ref_logprobs = s.logprobs, s.ref_logprobs

        beta = self.kl_ctl.value
        kl = pm.kl_per_token(logprobs, ref_logprobs, mask, cfg.kl_estimator)
        penalised = score - beta * kl.sum(1)  # the KL-regularised objective, logged alike by every learner
        if self.algorithm == "rloo":  # the KL penalty is part of the sequence reward
            reward = penalised
            adv = pm.rloo_advantages(reward, k)
        else:  # GRPO: the score alone; the KL is a loss term (_micro_step)
            reward = score
            adv = pm.grpo_advantages(reward, k, scale=self.scale_rewards)
        kl_seq = self._mean(kl.sum(1).mean())
        self.kl_ctl.update(kl_seq, n_steps=len(idx) * dist.world_size())
        spread, flat = pm.group_stats(reward, k)
        stats = {
            **self._sample_stats(s, kl_seq, beta),
            "objective/reward": self._mean(penalised.mean()),
            "group/reward_std": self._mean(spread),
            "group/no_signal": self._mean(flat),  # groups whose k rewards are all equal
            "_kl_coef": beta,  # GRPO's loss uses the β logged for this update, before the controller moves it
        }
        zeros = torch.zeros_like(mask)
        return Rollout(
            input_ids, attn, mask, logprobs, ref_logprobs, zeros, adv[:, None] * mask, zeros, stats
        )

    def _loss_count(self, mask):
        """Per-sequence means count the minibatch's responses (rows with a token) where token means count tokens."""
        return super()._loss_count(mask if self.loss_mean == "token" else mask.sum(1) > 0)

    def _micro_step(self, batch, mi, n_tokens, critic_only, last, update, logs, losses):
        """Forward, clipped policy loss (+ GRPO's β·k3 KL term) and backward of one micro-batch; `n_tokens` is
        _loss_count's normaliser (tokens or responses)."""
        cfg, R = self.cfg, batch.mask.shape[1]
        ids, am, mask = batch.input_ids[mi], batch.attention_mask[mi], batch.mask[mi]
        w = mask if self.loss_mean == "token" else pm.sequence_weights(mask)
        kept, self._epoch0 = self._epoch0 or {}, None  # epoch 0's log-probs kept by the rollout, if any
        out = self._train_forward(kept, mi, ids, am, R, logprobs=True, values=False)
        args = (out["logprobs"], batch.logprobs[mi], batch.advantages[mi], mask, cfg.clip_range)
        loss, st = pm.policy_loss(*args, n_tokens=n_tokens, weights=w)
        losses["loss/policy"] += float(loss.detach())
        if self.algorithm == "grpo":
            kl = pm.token_mean(pm.kl_k3(out["logprobs"], batch.ref_logprobs[mi]), w, n_tokens)
            loss = loss + batch.stats["_kl_coef"] * kl
            losses["loss/kl"] += float(kl.detach())
        self._token_stats(
            logs, mask, **{"policy/approx_kl": st["approx_kl"], "policy/clipfrac": st["clipfrac"]}
        )
        self._check_finite(loss.detach(), "loss", update)
        self.stepper.backward(loss, last)
        return st
