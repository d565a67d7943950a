"""Reading user files with `file:line` errors: safe YAML that remembers the line of every key, JSON Lines,
and pydantic errors turned into one-line messages."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from cai.errors import UserError, where


def load_yaml(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file with the safe loader; return (data, {key path: 1-based line})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = min(mark.line + 1, max(len(text.splitlines()), 1)) if mark else None  # not past the end
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and cmark and cmark.line + 1 != line:
            problem += f" ({context} started on line {cmark.line + 1})"
        raise UserError(f"{where(path, line)}: YAML does not parse: {problem}") from None
    lines: dict[tuple, int] = {}
    if node is not None:
        try:
            _walk(node, (), lines)
        except _DuplicateKey as dup:  # the safe loader would silently keep the last one
            loc, line, first = dup.args
            raise UserError(f"{path}:{line}: duplicate key '{dotted(loc)}' (first on line {first})") from None
    return data, lines


class _DuplicateKey(Exception):
    pass


def _walk(node, prefix: tuple, lines: dict[tuple, int]) -> None:
    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            if prefix + (k,) in lines and isinstance(key, yaml.ScalarNode) and k != "<<":
                raise _DuplicateKey(prefix + (k,), key.start_mark.line + 1, lines[prefix + (k,)])
            lines[prefix + (k,)] = key.start_mark.line + 1
            _walk(value, prefix + (k,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            _walk(item, prefix + (i,), lines)


def line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of the deepest known prefix of `loc` (a missing key points at its parent)."""
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(path, exc, lines: dict[tuple, int], model_cls=None) -> UserError:
    """Turn the first pydantic ValidationError entry into a one-line `file:line: key: problem` error."""
    errors = exc.errors()
    # A misspelt key also makes its correct name "missing": report the misspelling, with a suggestion.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind = err["type"]
    key = dotted(loc) or "(top level)"
    if kind == "extra_forbidden":
        hint = ""
        if model_cls is not None:
            fields = _fields_at(model_cls, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
        msg = f"unknown key '{key}'{hint}"
    elif kind == "missing":
        msg = f"missing key '{key}'"
    else:
        expected = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        msg = f"key '{key}': {expected} (got {shown[:60]})"
    return UserError(f"{where(path, line_of(lines, loc))}: {msg}")


def _fields_at(model_cls, loc: tuple) -> list[str]:
    """Field names of the (nested) pydantic model reached by following `loc` from `model_cls`."""

    cls = model_cls
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = _model_in(field.annotation)
    return list(getattr(cls, "model_fields", {}).keys()) if cls else []


def _model_in(annotation):
    import typing

    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def load_json(path: str | Path, what: str = "JSON file"):
    """The parsed content of a JSON file; a missing or unreadable file or bad JSON is a UserError naming the
    file (and the line, for bad JSON)."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON in the {what} ({exc.msg})") from None


def iter_jsonl(path: str | Path, what: str = "a JSON object"):
    """(line number, object) for each non-empty line of a .jsonl or .jsonl.gz file; errors name file:line."""
    import gzip
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"{path}:{n}: invalid JSON ({exc.msg}); {what} per line is expected"
                    ) from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{n}: {what} per line is expected")
                yield n, obj
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
