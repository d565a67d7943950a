"""The recipe's building blocks: the file-reference markers (`FileRef`, `ModelRef`, `NamedRef`), the strict base
of every block, LoRA, the training block the training stages share, and the blocks of the three stages that
train a model (SFT, the preference model, the gold judge). cai.config.recipe assembles the recipe from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


@dataclass(frozen=True)
class Ref:
    """Marks a recipe field whose value points at a file: kind 'file' (always a path), 'model' (a path when it
    looks like one: a folder, a .gguf file, './x'; else an alias or hub id) or 'named' (a shipped name, else a
    file path)."""

    kind: str


FileRef = Annotated[str, Ref("file")]
ModelRef = Annotated[str, Ref("model")]
NamedRef = Annotated[str, Ref("named")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules to adapt.")


class TrainConfig(Strict):
    """Settings shared by the training stages."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(512, ge=8, description="Truncate sequences to this many tokens.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps for LR warm-up.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="LR schedule after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    save_steps: int = Field(20, ge=1, description="Checkpoint every this many steps (for resume).")
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of all weights.")


class SFTConfig(TrainConfig):
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    merge_lora: bool = Field(True, description="Merge LoRA adapters into the saved model.")
    include_helpful: bool = Field(
        True, description="Train on helpful prompts' initial answers too, as the paper does."
    )


class HumanMix(Strict):
    path: FileRef = Field(description="Human preference pairs in HH format, label 1.0 for chosen.")
    ratio: float = Field(0.5, gt=0.0, description="Human pairs per AI-labelled pair.")


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


class GoldConfig(TrainConfig):
    """The gold judge (Gao et al. 2022): a PM trained on human preference pairs, independent of the labeller."""

    enabled: bool = Field(
        False,
        description="Train the gold PM (stage 'gold'): the report then scores PPO samples with it (proxy and gold against sqrt(KL)) and judges win rates with it.",
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
