"""The recipe schema: one pydantic model per stage, each field documented once, unknown keys rejected.

A recipe is YAML validated against `Recipe` (cai.config.load reads it). Fields that name a file are marked
`FileRef` (a path), `ModelRef` (an alias, a model folder, a .gguf file or a hub id) or `NamedRef` (a shipped
name or a file): the loader makes their paths relative to the recipe file, and preflight checks them.
A preference-model spec file is a partial `preference_model` block (cai.config.pm_spec).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from cai.config.blocks import (  # noqa: F401 - re-exported: the recipe's blocks are imported from here
    FileRef,
    GoldConfig,
    HumanMix,
    LoraConfig,
    ModelRef,
    NamedRef,
    PreferenceModelConfig,
    Ref,
    SFTConfig,
    Strict,
    TrainConfig,
)
from cai.runtime.settings import Device, DType, Settings

_SETTING = Settings.model_fields

STAGES = ("gold", "critique_revise", "sft", "feedback", "preference_model", "ppo", "report")
StageId = Literal["gold", "critique_revise", "sft", "feedback", "preference_model", "ppo", "report"]


class ModelsConfig(Strict):
    policy: ModelRef = Field(
        "tiny-random-llama",
        description="Helpful model that SL-CAI starts from: alias, HF dir, .gguf or hub id.",
    )
    feedback: ModelRef | None = Field(
        None, description="Feedback (labeller) model for RL-CAI; default: the policy model."
    )
    reward_backbone: ModelRef | None = Field(
        None, description="Backbone of the preference model; default: the policy model."
    )
    judge: ModelRef | None = Field(
        None, description="Common judge for win rates in reports; default: the feedback model."
    )


class GenerationConfig(Strict):
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Generation backend; 'vllm' needs vllm installed and a GPU."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    max_new_tokens: int = Field(128, ge=1, description="Cap on generated tokens per response.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="HF repetition penalty; 1.0 disables it.")


class GenerationOverride(Strict):
    """Per-stage overrides of `generation`; unset fields inherit the recipe's `generation` block."""

    batch_size: int | None = Field(None, ge=1, description="Overrides generation.batch_size.")
    max_new_tokens: int | None = Field(None, ge=1, description="Overrides generation.max_new_tokens.")
    temperature: float | None = Field(None, ge=0.0, description="Overrides generation.temperature.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Overrides generation.top_p.")
    top_k: int | None = Field(None, ge=0, description="Overrides generation.top_k.")


def merged_generation(base: GenerationConfig, over: GenerationOverride | None) -> GenerationConfig:
    """The recipe's generation settings with a stage's overrides applied."""
    if over is None:
        return base
    return base.model_copy(update={k: v for k, v in over.model_dump().items() if v is not None})


class PromptSource(Strict):
    type: Literal["builtin", "hh", "jsonl", "dataset"] = Field(
        description="builtin prompt set, HH transcripts, a JSONL file, or a `datasets` dataset."
    )
    path: FileRef | None = Field(
        None, description="File for hh/jsonl, or a local dataset path for 'dataset'."
    )
    name: str | None = Field(None, description="Dataset name on a hub (type 'dataset' without a path).")
    split: str = Field("train", description="Dataset split.")
    column: str = Field("prompt", description="Column (or JSONL field) holding the prompt text.")
    kinds: list[Literal["red_team", "helpful"]] = Field(
        ["red_team", "helpful"], description="builtin: which sets."
    )
    categories: list[str] | None = Field(
        None, description="Keep only these categories (builtin/jsonl with a category field)."
    )
    limit: int | None = Field(
        None, ge=1, description="Take at most this many prompts from this source (after shuffling)."
    )
    kind: Literal["red_team", "helpful"] = Field(
        "red_team", description="hh/jsonl/dataset: kind of these prompts (a row's own 'kind' field wins)."
    )


class PromptsConfig(Strict):
    sources: list[PromptSource] = Field(
        default_factory=lambda: [PromptSource(type="builtin")],
        min_length=1,
        description="Where prompts come from.",
    )
    held_out: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of prompts held out for evaluation (reused by later stages).",
    )
    helpful_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="If set, the share of helpful prompts in the training prompts."
    )


class CritiqueReviseConfig(Strict):
    num_revisions: int = Field(1, ge=1, description="Critique→revision rounds per prompt.")
    few_shot: FileRef | None = Field(
        None, description="Few-shot file (paper JSON); overrides the constitution's."
    )
    num_few_shot: int = Field(1, ge=0, description="How many few-shot transcripts to prepend.")
    generation: GenerationOverride | None = Field(None, description="Generation overrides for this stage.")


class CheckSet(Strict):
    path: FileRef = Field(description="Human-labelled pairs in HH format (chosen/rejected).")
    limit: int = Field(64, ge=1, description="Pairs sampled from it.")


class FeedbackConfig(Strict):
    policy: str = Field(
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
    cot_clamp: tuple[float, float] = Field((0.4, 0.6), description="Clamp CoT probabilities to this range.")
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


class PPOConfig(Strict):
    updates: int = Field(8, ge=1, description="PPO updates (one rollout batch each).")
    rollout_batch_size: int = Field(8, ge=1, description="Prompts per rollout batch (per process).")
    response_length: int = Field(48, ge=1, description="Max new tokens per response.")
    temperature: float = Field(
        0.7, gt=0.0, description="Rollout sampling temperature (also applied to the log-probs)."
    )
    top_k: int = Field(0, ge=0, description="Rollout top-k; 0 disables it.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Rollout nucleus mass.")
    ppo_epochs: int = Field(4, ge=1, description="Optimisation epochs over each rollout batch.")
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
        0.05, ge=0, description="β of the per-token KL penalty (initial value when adaptive)."
    )
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator.")
    adaptive_kl: bool = Field(False, description="Adapt β with the Ziegler et al. controller.")
    target_kl: float = Field(6.0, gt=0, description="Controller target KL (nats per sequence).")
    kl_horizon: int = Field(10000, ge=1, description="Controller horizon (samples).")
    reward_clip: float | None = Field(None, gt=0, description="Clip normalised scores to ±this.")
    whiten_rewards: bool = Field(False, description="Whiten per-token rewards before GAE.")
    whiten_advantages: bool = Field(True, description="Whiten advantages.")
    missing_eos_penalty: float | None = Field(
        None, description="Subtract this from the score of responses without EOS."
    )
    stop_string: str | None = Field(None, description="Truncate responses at this string.")
    critic: Literal["separate", "value_head"] = Field(
        "separate", description="Separate value model, or a value head on the policy trunk."
    )
    critic_warmup_updates: int = Field(0, ge=0, description="Updates that train only the critic.")
    early_stop_kl: float | None = Field(
        None, gt=0, description="Stop an update's epochs once approx-KL exceeds this."
    )
    lora: LoraConfig | None = Field(
        None, description="LoRA policy; the reference is the base with adapters disabled."
    )
    reward: str = Field(
        "pm",
        description="'pm' (the trained preference model) or an import path 'module:function' to fn(prompts, responses, **kwargs) -> list[float] (see cai.rl.rewards).",
    )
    save_every: int = Field(1, ge=1, description="Checkpoint every this many updates (for resume).")
    max_prompt_length: int = Field(
        512, ge=1, description="Keep at most this many prompt tokens (the last ones)."
    )
    logprobs_from_generation: bool = Field(
        True,
        description="Old log-probs from the sampling logits (no second forward); off: recompute them with a forward pass.",
    )


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


class Arm(Strict):
    name: str = Field(description="Arm name (a folder under arms/).")
    set: dict[str, Any] = Field(
        default_factory=dict, description="Recipe overrides for this arm, as dotted keys."
    )


class Recipe(Strict):
    name: str = Field(description="Run name; the default run directory is runs/<name>.")
    seed: int = Field(0, description=_SETTING["seed"].description)
    run_dir: FileRef | None = Field(
        None, description="Run directory; default runs/<name> in the current directory."
    )
    stages: list[StageId] = Field(list(STAGES), description="Stages this recipe runs, in pipeline order.")
    device: Device = Field("auto", description=_SETTING["device"].description)
    dtype: DType = Field("auto", description=_SETTING["dtype"].description)
    trust_remote_code: bool = Field(False, description=_SETTING["trust_remote_code"].description)
    tracker: Literal["tensorboard", "wandb"] | None = Field(
        None, description="Experiment tracker via accelerate; none by default."
    )
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Model references.")
    constitution: FileRef | None = Field(
        None,
        description="Constitution for SL-CAI (and feedback by default); the stages that read it need it.",
    )
    feedback_constitution: FileRef | None = Field(
        None, description="Constitution for RL-CAI feedback; default: `constitution`."
    )
    prompts: PromptsConfig = Field(
        default_factory=PromptsConfig, description="Prompt sources and the held-out split."
    )
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="Default generation settings."
    )
    critique_revise: CritiqueReviseConfig = Field(
        default_factory=CritiqueReviseConfig, description="SL-CAI data generation."
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tune on revisions.")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="RL-CAI AI feedback.")
    preference_model: PreferenceModelConfig = Field(
        default_factory=PreferenceModelConfig, description="Preference model training."
    )
    gold: GoldConfig = Field(
        default_factory=GoldConfig, description="Optional gold judge: a PM trained on human preference pairs."
    )
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO against the preference model.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Report and evaluation.")
    arms: list[Arm] | None = Field(
        None, description="Arms that share upstream stages and differ by overrides."
    )
    sweep: dict[str, list[Any]] | None = Field(
        None, description="A sweep over one or more dotted keys, run as arms."
    )

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages):
        if list(stages) != [s for s in STAGES if s in stages]:
            raise ValueError(f"stages must follow the pipeline order {', '.join(STAGES)}, each once")
        return stages

    @property
    def settings(self) -> Settings:
        """device, dtype, trust_remote_code and seed as the one settings object models are loaded with."""
        return Settings(
            device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code, seed=self.seed
        )
