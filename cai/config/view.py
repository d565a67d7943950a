"""A stage's read-only view of the recipe: exactly the keys it declares (cai.config.layout.STAGES), each with
its fallbacks resolved once, here:

- `settings`: device, dtype, trust_remote_code, seed and save_dtype as one cai.runtime.settings.Settings
  (save_dtype at its default for a stage that writes no model);
- `models.feedback`: models.feedback, else models.policy;
- `models.judge`: models.judge, else the feedback model;
- `models.reward_backbone`: models.reward_backbone, else models.policy;
- `feedback_constitution`: feedback_constitution, else constitution;
- `preference_model`: the block merged with its spec, its backbone resolved (cai.config.pm_spec);
- `gold`: the gold judge's block, its backbone resolved as the preference model's.

Values are the recipe's own (frozen) pydantic objects, so they keep their types. Reading a key the stage did
not declare raises `UndeclaredRead`: what a stage reads is what its fingerprint hashes.
"""

from __future__ import annotations

import glob
import os
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cai.config.fields import NamedRef
from cai.config.load import field_at, ref_kind
from cai.config.pm_spec import effective_pm_config
from cai.config.recipe import Recipe
from cai.errors import UserError
from cai.hashing import hash_json, sha256_file
from cai.yamlio import load_yaml

# A key whose value falls back to other keys: the first one set in the recipe gives it.
FALLBACKS = {
    "models.feedback": ("models.feedback", "models.policy"),
    "models.judge": ("models.judge", "models.feedback", "models.policy"),
    "models.reward_backbone": ("models.reward_backbone", "models.policy"),
    "feedback_constitution": ("feedback_constitution", "constitution"),
}
RESOLVED = {
    "settings": lambda r: r.settings,
    "preference_model": lambda r: effective_pm_config(
        r.preference_model, r.models.policy, r.models.reward_backbone
    ),
    "gold": lambda r: r.gold.model_copy(
        update={"backbone": r.gold.backbone or r.models.reward_backbone or r.models.policy}
    ),
}


class UndeclaredRead(RuntimeError):
    """A stage read a recipe key it does not declare."""


def source_key(recipe: Recipe, key: str) -> str:
    """The key whose value `key` takes: itself, or the first of its fallbacks that the recipe sets."""
    chain = FALLBACKS.get(key, (key,))
    return next((k for k in chain if _raw(recipe, k)), chain[-1])


def _raw(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def value_of(recipe: Recipe, key: str) -> Any:
    """A dotted key's value with its fallback resolved (see the module docstring)."""
    if key in RESOLVED:
        return RESOLVED[key](recipe)
    return _raw(recipe, source_key(recipe, key))


class RecipeView:
    """Attribute access to declared keys only: `view.sft`, `view.models.policy`, `view.settings`."""

    def __init__(self, values: dict[str, Any], stage: str, prefix: str = ""):
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        values = self._values
        if name in values:
            return values[name]
        sub = {k[len(name) + 1 :]: v for k, v in values.items() if k.startswith(name + ".")}
        if sub:
            return RecipeView(sub, self._stage, f"{self._prefix}{name}.")
        raise UndeclaredRead(
            f"stage '{self._stage}' read recipe key '{self._prefix}{name}', which it does not declare "
            f"(declared: {', '.join(self._prefix + k for k in values)}; see cai.config.layout.STAGES)"
        )

    def __setattr__(self, name, value):
        raise AttributeError(f"the recipe view of stage '{self._stage}' is read-only")

    def keys(self) -> list[str]:
        return list(self._values)

    def fingerprint_dict(self) -> dict:
        """The declared values as JSON, files referenced by `FileRef` keys replaced by their content hash (a
        constitution's with the few-shot files it names)."""
        out = {k: _hashable(v, _annotation(self._prefix + k)) for k, v in self._values.items()}
        for k in CONSTITUTION_KEYS:
            if isinstance(out.get(k), dict):
                out[k] = _constitution_digest(self._values[k], out[k])
        if isinstance(out.get("report"), dict):
            out["report"]["suites"] = [suite_digest(v) for v in self._values["report"].suites]
        return out


def view_of(recipe: Recipe, keys, stage: str, saves_models: bool = True, unread=()) -> RecipeView:
    """The view of `keys` for `stage`. A stage that writes no model gets `settings` with the default save_dtype,
    so changing the dtype of saved models does not rerun its generation or labelling; the dotted keys `unread`
    (of blocks in `keys`) are at their defaults, for the same reason."""
    values = {k: value_of(recipe, k) for k in keys}
    if not saves_models and "settings" in values:
        values["settings"] = values["settings"].with_(save_dtype=type(values["settings"])().save_dtype)
    for key in unread:
        block, _, name = key.rpartition(".")
        if block in values:
            model = values[block]
            default = (
                type(model)
                .model_fields[name]
                .get_default(call_default_factory=True, validated_data=dict(model))
            )
            # which keys the recipe set stays as it was: the stage names those it ignores (unused_settings)
            values[block] = type(model).model_construct(
                _fields_set=set(model.model_fields_set), **{**dict(model), name: default}
            )
    return RecipeView(values, stage)


def _annotation(key: str):
    if key == "settings":
        return None
    info = field_at(key)
    return info


_FILE_HASHES: dict[tuple, str] = {}
CONSTITUTION_KEYS = ("constitution", "feedback_constitution")


def _constitution_digest(path: str, digest: dict) -> dict:
    """A constitution's digest by what it says, not how it is written: the hash of its parsed YAML, so an edit
    to a comment, the layout or the quoting re-runs nothing; with the digests of the few-shot files its
    `few_shot` block names (relative to it, as cai.constitution.schema.load_constitution resolves them), so an
    edit to one re-runs the stages that read them. A file that does not parse keeps its byte digest (preflight
    reports it)."""
    try:
        data, _ = load_yaml(path)
    except UserError:
        return digest
    out = {"file": digest["file"], "content": hash_json(data)}
    shots = data.get("few_shot") if isinstance(data, dict) else None
    if not isinstance(shots, dict):
        return out
    files = {
        k: file_digest(str(Path(path).parent / v)) for k, v in sorted(shots.items()) if isinstance(v, str)
    }
    return {**out, "few_shot": files} if files else out


def suite_digest(ref: str) -> dict | str:
    """A suite named by its YAML file: its settings and the content digests of its data files (relative to it,
    as cai.eval.suites.load_suite resolves them), so an edit to either reruns the report; a shipped name or a
    data file as `_hashable` gives it."""
    if not (ref.endswith((".yaml", ".yml")) and Path(ref).is_file()):
        return _hashable(ref, NamedRef)
    try:
        data, _ = load_yaml(ref)
    except UserError:  # preflight reports a bad suite; its content hash still stands
        return file_digest(ref)
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return file_digest(ref)
    base = Path(ref).resolve().parent
    files = sorted({f for p in data["files"] if isinstance(p, str) for f in glob.glob(os.path.join(base, p))})
    return {
        "suite": {k: v for k, v in data.items() if k != "files"},
        "files": [file_digest(f) for f in files],
    }


def file_digest(path: str) -> dict | str:
    """{"file": name, "sha256": ...} of an existing file (cached by size and mtime); of a folder (a dataset saved
    to disk, a folder of data files) the same over every file below it, by relative path; the path itself
    otherwise (a hub name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        listing = [{"file": f.relative_to(p).as_posix(), "sha256": _sha256(f)} for f in files]
        return {"folder": p.name, "sha256": hash_json(listing)}
    if not p.is_file():
        return path
    return {"file": p.name, "sha256": _sha256(p)}


def _sha256(p: Path) -> str:
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_file(p)
    return _FILE_HASHES[key]


def _new_default(model: BaseModel, name: str, info) -> bool:
    """A field added after runs were made (`json_schema_extra={"since": date}`) at its default: left out of the
    fingerprint, so upgrading cai does not rerun (and reset an interrupted) stage whose recipe did not change."""
    return bool((info.json_schema_extra or {}).get("since")) and getattr(model, name) == info.default


def _hashable(value, annotation):
    if isinstance(value, BaseModel):
        fields = type(value).model_fields.items()
        return {
            name: _hashable(getattr(value, name), info)
            for name, info in fields
            if not _new_default(value, name, info)
        }
    if isinstance(value, (list, tuple)):
        if getattr(annotation, "metadata", None) is not None:  # a FieldInfo: its annotation holds the items'
            annotation = annotation.annotation
        inner = [a for a in typing.get_args(annotation) if typing.get_args(a) or a is not type(None)]
        return [_hashable(v, inner[0] if inner else annotation) for v in value]
    kind = ref_kind(annotation) if isinstance(value, str) and annotation is not None else None
    # a named data file (a suite given as its .jsonl) by content too; a named YAML (a suite, a PM spec) is
    # expanded where it is read, so its path stands for it
    data_file = kind == "named" and value.endswith((".jsonl", ".json", ".gz")) and Path(value).is_file()
    if kind == "file" or data_file:
        return file_digest(value)
    if isinstance(value, dict):
        return {k: _hashable(v, None) for k, v in value.items()}
    return value
