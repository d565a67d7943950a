"""Preference-model specs: a spec file is a partial `preference_model` block of the recipe schema, validated
by it, its file references relative to the spec file. A recipe names one with `preference_model.spec` (a
name in cai/pm/specs, or a file); the keys the recipe's block sets itself win over the spec's, key by key in a
nested block (`lora.r` alone keeps the spec's other `lora` keys).
`effective_pm_config` is the one place that merges them and resolves the backbone's fallbacks."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from cai.config.blocks import PreferenceModelConfig
from cai.config.load import anchor_refs
from cai.errors import UserError
from cai.yamlio import load_yaml, named_file, validation_error

SPEC_DIR = Path(__file__).resolve().parents[1] / "pm" / "specs"


def spec_path(ref: str) -> Path:
    """The file behind a spec reference: a shipped name or a YAML file."""
    return named_file(ref, SPEC_DIR, "preference-model spec")


def load_pm_spec(ref: str) -> dict:
    """The keys a spec file sets, validated as a partial preference_model block ('spec' itself excluded),
    file references anchored at the spec's folder."""
    path = spec_path(ref)
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a mapping of preference_model keys is expected")
    if "spec" in data:
        raise UserError(f"{path}:{lines.get(('spec',), 1)}: a spec cannot name another spec")
    anchor_refs(data, PreferenceModelConfig, path.resolve().parent)
    try:
        block = PreferenceModelConfig.model_validate(data)
    except ValidationError as exc:
        raise validation_error(path, exc, lines, PreferenceModelConfig) from None
    return block.model_dump(exclude_unset=True)


def deep_merge(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys over it; a block (a dict) in both merges key by key."""
    out = dict(base)
    for key, value in top.items():
        old = out.get(key)
        out[key] = deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def effective_pm_config(cfg: PreferenceModelConfig, policy: str, reward_backbone: str | None):
    """The preference_model block as the stage runs it: the spec's keys under the block's own, validated as a
    whole, with `backbone` resolved (the block's or spec's, else models.reward_backbone, else models.policy)."""
    merged = cfg.model_dump()
    if cfg.spec:
        spec = load_pm_spec(cfg.spec)
        own = cfg.model_dump(exclude_unset=True)  # in a nested block too, only the keys the recipe set
        merged = deep_merge(deep_merge(merged, spec), own)
    merged["backbone"] = merged.get("backbone") or reward_backbone or policy
    try:
        out = PreferenceModelConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        where = f" (recipe block on top of spec '{cfg.spec}')" if cfg.spec else ""
        raise UserError(
            f"preference_model.{key}: {err['msg'].removeprefix('Value error, ')}{where}"
        ) from None
    if out.lm_coef > 0 and out.head != "value_head":
        where = f" (recipe block on top of spec '{cfg.spec}')" if cfg.spec else ""
        raise UserError(
            f"preference_model.lm_coef: an LM loss needs head: value_head (a classifier PM has no LM head){where}"
        )
    return out
