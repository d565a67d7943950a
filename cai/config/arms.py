"""Arms and sweeps: recipes that share upstream stages and differ by a few overrides.

`recipe.arms` lists named overrides (dotted keys); `recipe.sweep` maps dotted keys to value lists and
expands into one arm per value (the product when several keys are swept; crossed with `arms` when both
are given). Each arm is a full `Recipe`, validated like one.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from typing import Any

from pydantic import ValidationError

from cai.config.load import load_recipe, parse_value, validate_dotted_key
from cai.config.recipe import Recipe
from cai.errors import UserError
from cai.errors import where as file_line
from cai.yamlio import line_of, load_yaml

# keys an arm may not change: they name the run or its shape, not a stage's behaviour
FIXED_KEYS = {"name", "run_dir", "arms", "sweep", "stages", "tracker"}
# keys only the report or the gold judge read: one of each serves every arm, so an arm's value was ignored
ONE_PER_RUN = ("report", "models.judge", "gold")
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and ("/" in value or re.search(r"\.(ya?ml|jsonl?)$", value) is not None)


def slug(value: Any) -> str:
    """A folder-safe piece of an arm name; file paths become their stem."""
    text = str(value)
    if _is_path(value):
        text = re.sub(r"\.(ya?ml|jsonl?)$", "", value.rstrip("/").rsplit("/", 1)[-1])
    return _SAFE.sub("-", text).strip("-") or "x"


def sweep_point_name(point: dict[str, Any]) -> str:
    """'kl_coef=0.02' for one key; joined with '_' for several; a path value gives its stem alone."""
    parts = []
    for key, value in point.items():
        parts.append(slug(value) if _is_path(value) else f"{key.rsplit('.', 1)[-1]}={slug(value)}")
    return "_".join(parts)


def _keys_set(key: str, value: Any) -> list[str]:
    """`key` and, when its value is a block ({models: {judge: X}}), the dotted keys inside it."""
    if not isinstance(value, dict):
        return [key]
    return [key] + [k for sub, v in value.items() for k in _keys_set(f"{key}.{sub}", v)]


def _check_key(key: str, where: str, value: Any = None) -> None:
    for k in _keys_set(key, value):
        if k.split(".")[0] in FIXED_KEYS:
            raise UserError(f"{where}: '{k}' cannot differ between arms (they share one run)")
        if any(k == one or k.startswith(one + ".") for one in ONE_PER_RUN):
            raise UserError(
                f"{where}: '{k}' cannot differ between arms (the report and the gold judge are one per run, "
                "over every arm); set it outside `arms`/`sweep`"
            )
    try:
        validate_dotted_key(key)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _merge(node: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    old = node.get(parts[-1])
    if isinstance(old, dict) and isinstance(value, dict):
        merged = dict(old)
        for k, v in value.items():
            _merge(merged, k, v)
        node[parts[-1]] = merged
    else:
        node[parts[-1]] = value


def arm_recipe(base: Recipe, overrides: dict[str, Any], where: str) -> Recipe:
    """`base` with dotted-key overrides applied (dict values merge into blocks), validated. Only the keys the
    base recipe sets are carried over, so a preference-model spec still yields to exactly those keys."""
    data = base.model_dump(mode="json", exclude={"arms", "sweep"}, exclude_unset=True)
    for key, value in overrides.items():
        _check_key(key, f"{where}.{key}", value)
        _merge(data, key, value)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{where}: {loc}: {err['msg']}") from None


def _named_overrides(recipe: Recipe) -> list[tuple[str, dict[str, Any], str]]:
    """[(arm name, its dotted-key overrides, where they were written)] in declaration order."""
    named = [(a.name, dict(a.set), f"arms.{i} ({a.name})") for i, a in enumerate(recipe.arms or [])]
    if recipe.sweep:
        keys = list(recipe.sweep)
        for key in keys:
            _check_key(key, f"sweep.{key}")
            if not isinstance(recipe.sweep[key], list) or not recipe.sweep[key]:
                raise UserError(f"sweep.{key}: a non-empty list of values is expected")
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(recipe.sweep[k] for k in keys))]
        bases = named or [("", {}, "")]
        named = []
        for (aname, aset, awhere), point in itertools.product(bases, points):
            pname = sweep_point_name(point)
            name = f"{aname}_{pname}" if aname else pname
            named.append((name, {**aset, **point}, (awhere + " × " if awhere else "") + f"sweep {pname}"))
    return named


def expand_arms(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """[(arm name, arm recipe)] in declaration order; [] for a recipe without arms or sweep."""
    out, seen = [], set()
    for name, overrides, where in _named_overrides(recipe):
        if not name or _SAFE.sub("-", name) != name or name in (".", ".."):
            raise UserError(f"{where}: arm name '{name}' must use only letters, digits and . _ + = -")
        if name in seen:
            raise UserError(f"{where}: arm name '{name}' is used twice")
        seen.add(name)
        out.append((name, arm_recipe(recipe, overrides, where)))
    return out


_MISSING = object()


def _value_at(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _overrides_set(leaf: str, key: str, item: str) -> bool:
    """Whether an arm's `leaf` key replaces what the `--set` item `item` (of `key`) set: the same key, a key
    above it (a value that is not a block replaces the whole of it), or one the item's block names."""
    if leaf == key or key.startswith(leaf + "."):
        return True
    inside = leaf[len(key) + 1 :] if leaf.startswith(key + ".") else None
    return inside is not None and _value_at(parse_value(item.partition("=")[2]), inside) is not _MISSING


def set_clashes(recipe: Recipe, arms: list[tuple[str, Recipe]]) -> list[str]:
    """One line per arm key that overrides a command-line `--set` of the same key (or of a block above or below
    it) with another value: the arm's value wins (the arms are the recipe's experiment), so say so."""
    sets = recipe.source.overrides if recipe.source is not None else {}
    if not sets or not arms:
        return []
    base, lines = recipe.model_dump(mode="json"), []
    for (name, overrides, _), (_, arm) in zip(_named_overrides(recipe), arms):
        data = arm.model_dump(mode="json")
        for key, value in overrides.items():
            keys = _keys_set(key, value)
            for leaf in (k for k in keys if not any(o.startswith(k + ".") for o in keys)):
                mine = _value_at(data, leaf)
                if mine is _MISSING or mine == _value_at(base, leaf):
                    continue
                lines += [
                    f"[cai] arm '{name}': its {leaf}={_show(mine)} overrides --set {item} "
                    "(an arm's own settings win: the arms are the recipe's experiment)"
                    for s, item in sets.items()
                    if _overrides_set(leaf, s, item)
                ]
    return lines


def load_checked(path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file read and validated (cai.config.load.load_recipe) with its arms and sweep expanded, each arm
    validated as a recipe, so that a bad override is reported at the file and line that wrote it. An arm that
    sets a key a `--set` item also sets keeps its own value, with a line on stderr for each (`set_clashes`)."""
    recipe = load_recipe(path, overrides)
    try:
        arms = expand_arms(recipe)
    except UserError as exc:
        m = re.match(r"arms\.(\d+)", str(exc))
        loc = ("arms", int(m.group(1))) if m else ("sweep",) if str(exc).startswith("sweep") else ("arms",)
        if recipe.source is not None and loc[0] in recipe.source.overrides:  # written by --set, not the file
            raise UserError(f"{recipe.source.locate(loc)}: {exc}") from None
        _, lines = load_yaml(path)
        raise UserError(f"{file_line(path, line_of(lines, loc))}: {exc}") from None
    for line in set_clashes(recipe, arms) if os.environ.get("RANK", "0") == "0" else ():  # once per launch
        print(line, file=sys.stderr, flush=True)
    return recipe
