"""The recipe schema: the top-level keys of a recipe (name, seed, device, models, constitution, prompts,
generation, arms, sweeps) and one block per stage (cai.config.blocks), each field documented once, unknown
keys rejected. A recipe is YAML validated against `Recipe` (cai.config.load reads it); fields that name files
are marked (cai.config.fields) and anchored at the recipe's folder. A preference-model spec file is a partial
`preference_model` block (cai.config.pm_spec).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from cai.config.blocks import (
    CritiqueReviseConfig,
    FeedbackConfig,
    GoldConfig,
    PreferenceModelConfig,
    ReportConfig,
    SFTConfig,
)
from cai.config.fields import FileRef, GenerationConfig, ModelRef, Strict
from cai.config.policy import DPOConfig, PolicyConfig, PPOConfig
from cai.runtime.settings import Device, DType, Settings

_SETTING = Settings.model_fields

STAGES = ("gold", "critique_revise", "sft", "feedback", "preference_model", "policy", "report")
StageId = Literal["gold", "critique_revise", "sft", "feedback", "preference_model", "policy", "report"]
# Former stage names, still accepted in `stages:`, `--only` and `--from` (the policy stage was 'ppo').
LEGACY_STAGES = {"ppo": "policy"}


class ModelsConfig(Strict):
    policy: ModelRef = Field(
        "smollm2-135m-instruct",
        description="Helpful model that SL-CAI starts from: alias, HF dir, .gguf or hub id; default: the "
        "embedded SmolLM2-135M-Instruct.",
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


class Arm(Strict):
    name: str = Field(description="Arm name (a folder under arms/).")
    set: dict[str, Any] = Field(
        default_factory=dict, description="Recipe overrides for this arm, as dotted keys."
    )


class Recipe(Strict):
    name: str = Field(
        description="Run name (letters, digits and . _ + = -); the default run directory is runs/<name>."
    )
    seed: int = Field(0, ge=0, lt=2**32, description=_SETTING["seed"].description)
    run_dir: FileRef | None = Field(
        None, description="Run directory; default runs/<name> in the current directory."
    )
    stages: list[StageId] = Field(list(STAGES), description="Stages this recipe runs, in pipeline order.")
    device: Device = Field("auto", description=_SETTING["device"].description)
    dtype: DType = Field("auto", description=_SETTING["dtype"].description)
    trust_remote_code: bool = Field(False, description=_SETTING["trust_remote_code"].description)
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description=_SETTING["save_dtype"].description
    )
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
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig,
        description="The policy stage: which algorithm optimises the SFT policy, and online rounds.",
    )
    ppo: PPOConfig = Field(
        default_factory=PPOConfig,
        description="On-policy RL against the PM: PPO's settings, whose rollout and optimiser settings RLOO and "
        "GRPO share.",
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Soft-label DPO on the feedback pairs.")
    report: ReportConfig = Field(default_factory=ReportConfig, description="Report and evaluation.")
    gold: GoldConfig = Field(
        default_factory=GoldConfig, description="Optional gold judge: a PM trained on human preference pairs."
    )
    arms: list[Arm] | None = Field(
        None, description="Arms that share upstream stages and differ by overrides."
    )
    sweep: dict[str, list[Any]] | None = Field(
        None, description="A sweep over one or more dotted keys, run as arms."
    )
    _source: Any = PrivateAttr(default=None)  # cai.config.load.RecipeSource: for messages naming file:line

    @field_validator("name")
    @classmethod
    def _a_folder_name(cls, name):
        if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name) or name in (".", ".."):
            raise ValueError(
                "a run name of letters, digits and . _ + = - (not '.' or '..') is expected: it names the folder "
                "runs/<name>"
            )
        return name

    @field_validator("stages", mode="before")
    @classmethod
    def _former_names(cls, stages):
        if isinstance(stages, (list, tuple)):
            return [LEGACY_STAGES.get(s, s) if isinstance(s, str) else s for s in stages]
        return stages

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages):
        if list(stages) != [s for s in STAGES if s in stages]:
            raise ValueError(f"stages must follow the pipeline order {', '.join(STAGES)}, each once")
        return stages

    @property
    def source(self):
        """The file, key lines and `--set` overrides it was loaded from (None for a recipe built in code)."""
        return self._source

    @property
    def settings(self) -> Settings:
        """device, dtype, trust_remote_code and seed as the one settings object models are loaded with."""
        return Settings(
            device=self.device,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            seed=self.seed,
            save_dtype=self.save_dtype,
        )
