"""One block of the recipe schema per stage (gold, critique_revise, sft, feedback, preference_model, report),
each field documented once; unknown keys are errors. The policy stage's three blocks (`policy`, `ppo`, `dpo`) are
in cai.config.policy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cai.config.fields import (
    CheckSet,
    FileRef,
    GenerationOverride,
    HumanMix,
    ModelRef,
    NamedRef,
    PolicyRef,
    Strict,
    TrainConfig,
    UnitRange,
)


class CritiqueReviseConfig(Strict):
    num_revisions: int = Field(1, ge=1, description="Critique→revision rounds per prompt.")
    few_shot: FileRef | None = Field(
        None, description="Few-shot file (paper JSON); overrides the constitution's."
    )
    num_few_shot: int = Field(1, ge=0, description="How many few-shot transcripts to prepend.")
    generation: GenerationOverride | None = Field(None, description="Generation overrides for this stage.")


class SFTConfig(TrainConfig):
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    merge_lora: bool = Field(
        True,
        description="Merge LoRA adapters into the saved model; false saves the adapters alone, which the policy "
        "stage and the report cannot load (preflight refuses it when they run).",
    )
    include_helpful: bool = Field(
        True, description="Train on helpful prompts' initial answers too, as the paper does."
    )


class FeedbackConfig(Strict):
    policy: PolicyRef = Field(
        "sft",
        description="Who samples the responses: 'sft' (the SFT output), 'base' (models.policy) or a model ref.",
    )
    responses_per_prompt: int = Field(
        2, ge=2, description="k responses sampled per prompt; pairs are formed from them."
    )
    max_pairs_per_prompt: int = Field(1, ge=1, description="Pairs kept per prompt (of the k·(k-1)/2).")
    both_orders: bool = Field(
        True, description="Score both option orders and average (position-bias control)."
    )
    num_principles: int = Field(
        1, ge=1, description="Ensemble over this many sampled principles (probabilities averaged)."
    )
    chain_of_thought: bool = Field(
        False, description="Generate step-by-step reasoning before reading the option probabilities."
    )
    cot_clamp: UnitRange = Field(
        (0.4, 0.6), description="Clamp CoT probabilities to this range [low, high], 0 <= low <= high <= 1."
    )
    few_shot: FileRef | None = Field(
        None, description="Few-shot feedback file (paper JSON); overrides the constitution's."
    )
    num_few_shot: int = Field(0, ge=0, description="How many few-shot examples to prepend.")
    score_batch_size: int = Field(8, ge=1, description="Batch size of the option-scoring forward passes.")
    check_set: CheckSet | None = Field(
        None, description="Measure labeller agreement with humans before labelling."
    )
    human_mix: HumanMix | None = Field(None, description="Mix in human preference pairs.")
    generation: GenerationOverride | None = Field(
        None, description="Generation overrides for response sampling."
    )


class PreferenceModelConfig(TrainConfig):
    spec: NamedRef | None = Field(
        None,
        description="A preference-model spec (a name in cai/pm/specs, or a YAML file): a partial preference_model block whose keys this block's own keys override.",
    )
    backbone: ModelRef | None = Field(
        None,
        description="Backbone of the preference model; default: models.reward_backbone, then models.policy.",
    )
    human_data: HumanMix | None = Field(
        None, description="Human preference pairs mixed into the PM's training pairs (HH format)."
    )
    loss: Literal["soft", "bradley_terry"] = Field(
        "soft", description="Soft-label cross-entropy (paper) or Bradley–Terry on hard labels."
    )
    center_coef: float = Field(0.0, ge=0.0, description="Weight of the reward-centring term (r_a + r_b)^2.")
    head: Literal["classifier", "value_head"] = Field(
        "classifier", description="Scalar head: sequence classifier or value head on a causal LM."
    )
    lm_coef: float = Field(
        0.0,
        ge=0.0,
        description="value_head only: weight of a language-modelling loss on the preferred response, which keeps the PM a language model (Askell et al. 2021).",
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of pairs held out for PM evaluation."
    )
    norm_sample: int = Field(
        64, ge=2, description="Responses scored after training to store the score mean and std."
    )
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")

    @field_validator("lm_coef")
    @classmethod
    def _lm_coef_needs_value_head(cls, v, info):
        # with a spec, the head may come from it: checked once merged (cai.config.pm_spec)
        if v > 0 and info.data.get("head") == "classifier" and not info.data.get("spec"):
            raise ValueError("an LM loss needs head: value_head (a classifier PM has no LM head)")
        return v


class ReportConfig(Strict):
    suites: list[NamedRef] = Field(
        ["pairs", "ai-risk"],
        description="PM evaluation suites (names in cai/eval/suites, or suite or data files).",
    )
    eval_limit: int = Field(64, ge=1, description="Items per evaluation suite.")
    win_rate_prompts: int = Field(
        16, ge=0, description="Held-out prompts for the harmlessness win rate (0 disables)."
    )
    examples: int = Field(3, ge=0, description="Example responses shown side by side.")
    batch_size: int = Field(
        8, ge=1, description="Sequences per scoring forward pass (PM evaluation, the judge)."
    )


class GoldConfig(TrainConfig):
    """The gold judge (Gao et al. 2022): a PM trained on human preference pairs, independent of the labeller."""

    enabled: bool = Field(
        False,
        description="Train the gold PM (stage 'gold'): the report then scores the policy's samples with it (proxy and gold against sqrt(KL)) and judges win rates with it.",
    )
    data: FileRef | None = Field(
        None, description="Human preference pairs in HH format (chosen/rejected); needed when enabled."
    )
    backbone: ModelRef | None = Field(
        None, description="Backbone of the gold PM; default: models.reward_backbone, then models.policy."
    )
    train_pairs: int = Field(256, ge=2, description="Pairs of `data` it trains on (a seeded sample).")
    eval_pairs: int = Field(
        128, ge=1, description="Other pairs of `data`, never trained on, that evaluate it with its baselines."
    )
    loss: Literal["soft", "bradley_terry"] = Field(
        "bradley_terry",
        description="Bradley–Terry on the human choice, or the soft-label loss (the same here).",
    )
    head: Literal["classifier", "value_head"] = Field(
        "classifier", description="Scalar head: sequence classifier or value head on a causal LM."
    )
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    max_length: int = Field(384, ge=8, description="Truncate sequences to this many tokens (from the left).")

    @model_validator(mode="after")
    def _data_when_enabled(self):
        if self.enabled and not self.data:
            raise ValueError("gold.enabled needs gold.data: a file of human preference pairs (HH format)")
        return self
