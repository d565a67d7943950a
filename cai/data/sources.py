"""Prompt sources of a recipe's `prompts` block: the built-in red-team and helpful sets, HH-format transcripts,
JSONL files and `datasets` datasets, each a list of prompt rows; the train / held-out split."""

from __future__ import annotations

import gzip
import itertools
import json
import random
from pathlib import Path

from cai.data.hh import merge_same_role, parse_hh_transcript
from cai.errors import UserError
from cai.runtime.models import hub_reachable
from cai.yamlio import iter_jsonl, load_json

# --- Prompt sets from a recipe's `prompts` block -------------------------------------------------------------
# A prompt row: {"id", "messages": [{"role", "content"}, ...] ending with a user turn, "category", "source",
# "kind": "red_team" | "helpful"}.

BUILTIN_DIR = Path(__file__).resolve().parent / "prompts"
BUILTIN_FILES = {"red_team": "red_team.jsonl", "helpful": "helpful.jsonl"}
KINDS = ("red_team", "helpful")
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".gz": "json"}
# a saved dataset's or hub snapshot's own files, not data
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}


def load_prompts(cfg, seed: int) -> tuple[list[dict], list[dict]]:
    """Prompt rows from every source of a `PromptsConfig`: (train rows, held-out rows).

    Each source is loaded, filtered by category, de-duplicated (against itself and the rows earlier sources
    kept: a row a source's `limit` cut does not block a later source), shuffled with a seed of its own and cut
    to its `limit`; then each source is split into train and held out (`held_out` of it, rounded), so both
    halves keep the mix of sources. `helpful_fraction`, if set, trims the training rows to that share of
    helpful prompts.
    """
    train, held, seen_ids, seen_text = [], [], set(), set()
    stems = [_stem(Path(src.path)) if src.path else None for src in cfg.sources]
    for i, src in enumerate(cfg.sources):
        where = f"prompts.sources[{i}]"
        # files of one name in two folders (HH's harmless-base/train and helpful-base/train): their ids made
        # from the name carry the folder too
        prefix = (
            f"{Path(src.path).parent.name}/{stems[i]}" if stems[i] and stems.count(stems[i]) > 1 else None
        )
        rows, keys, ids = [], set(), set()
        for row in load_source(src, where, prefix):
            key = _conversation_key(row["messages"])
            if key in seen_text or key in keys:
                continue
            keys.add(key)
            if row["id"] in ids:
                raise UserError(f"{where}: prompt id '{row['id']}' appears twice (ids must be unique)")
            ids.add(row["id"])
            rows.append(row)
        random.Random(f"{seed}:prompts:{i}").shuffle(rows)
        if src.limit is not None:
            rows = rows[: src.limit]
        for row in rows:
            if row["id"] in seen_ids:
                raise UserError(
                    f"{where}: prompt id '{row['id']}' appears twice (ids must be unique across sources)"
                )
            seen_ids.add(row["id"])
            seen_text.add(_conversation_key(row["messages"]))
        n_held = round(len(rows) * cfg.held_out)
        held.extend(rows[:n_held])
        train.extend(rows[n_held:])
    if cfg.helpful_fraction is not None:
        train = _trim_to_fraction(train, cfg.helpful_fraction)
    if not train:
        raise UserError("prompts: no training prompts (check the sources, their limits and held_out)")
    return train, held


def load_source(
    src, where: str = "prompts.sources", prefix: str | None = None, head: bool = False
) -> list[dict]:
    """All prompt rows of one `PromptSource`, in file order, after the category filter. Rows without an id of
    their own get `<prefix>-<line>`, the prefix being the file's name without its suffixes unless given. With
    `head`, an hh or jsonl source's first row only (preflight: its format, before the category filter)."""
    if src.type == "builtin":
        rows = []
        for kind in src.kinds:
            rows.extend(_read_builtin(kind))
    elif src.type == "hh":
        rows = _read_hh(_need_file(src, where), src.kind, prefix, head)
    elif src.type == "jsonl":
        rows = _read_jsonl(_need_file(src, where), src.column, src.kind, prefix, head)
    elif src.type == "dataset":
        rows = _read_dataset(src, where, prefix)
    else:  # pragma: no cover - the schema rejects other types
        raise UserError(f"{where}.type: unknown source type '{src.type}'")
    if src.categories is not None and not head:
        wanted = set(src.categories)
        rows = [r for r in rows if r["category"] in wanted]
        if not rows:
            raise UserError(f"{where}.categories: no prompt has any of the categories {sorted(wanted)}")
    return rows


def _need_file(src, where: str) -> Path:
    if not src.path:
        raise UserError(f"{where}.path: a file is required for a '{src.type}' source")
    p = Path(src.path).expanduser()
    if not p.is_file():
        raise UserError(f"{where}.path: file not found: {src.path}")
    return p


def to_messages(value, where: str) -> list[dict]:
    """A prompt value as chat messages: a string (an HH transcript if it starts with 'Human:', else one user
    turn as written), or a message list.

    The conversation is cut after its last user turn, so an HH transcript that ends with an assistant reply
    becomes the prompt that reply answered; a transcript's consecutive turns of one role become one turn.
    """
    if isinstance(value, str):
        if value.lstrip().startswith("Human:"):
            messages = merge_same_role(parse_hh_transcript(value))
        else:
            messages = [{"role": "user", "content": value.strip()}]
    elif isinstance(value, list):
        messages = []
        for j, m in enumerate(value):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)
            ):
                raise UserError(
                    f"{where}: message {j}: {{'role': system|user|assistant, 'content': str}} is expected"
                )
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        raise UserError(
            f"{where}: a string or a list of chat messages is expected, got {type(value).__name__}"
        )
    while messages and messages[-1]["role"] != "user":
        messages.pop()
    if not messages or not messages[-1]["content"].strip():
        raise UserError(f"{where}: the prompt has no (non-empty) user turn")
    return messages


def _read_builtin(kind: str) -> list[dict]:
    path = BUILTIN_DIR / BUILTIN_FILES[kind]
    rows = []
    for n, obj in iter_jsonl(path):
        where = f"{path}:{n}"
        if "id" not in obj or "category" not in obj or ("prompt" in obj) == ("turns" in obj):
            raise UserError(f"{where}: 'id', 'category' and one of 'prompt' or 'turns' are expected")
        messages = to_messages(obj.get("prompt", obj.get("turns")), where)
        rows.append(
            {
                "id": obj["id"],
                "messages": messages,
                "category": obj["category"],
                "source": f"builtin:{kind}",
                "kind": kind,
            }
        )
    return rows


def _read_hh(path: Path, kind: str, prefix: str | None, head: bool = False) -> list[dict]:
    rows, stem = [], prefix or _stem(path)
    for n, obj in itertools.islice(iter_jsonl(path), 1 if head else None):
        text = obj.get("chosen", obj.get("prompt"))
        if not isinstance(text, str) or not isinstance(obj.get("rejected", ""), str):
            raise UserError(f"{path}:{n}: an HH transcript in 'chosen' (and 'rejected', if any) is expected")
        rows.append(
            {
                "id": f"{stem}-{n}",
                "messages": to_messages(text, f"{path}:{n}"),
                "category": "hh",
                "source": f"hh:{path.name}",
                "kind": _row_kind(obj, kind, f"{path}:{n}"),
            }
        )
    if not rows:
        raise UserError(f"{path}: no prompts (the file has no rows)")
    return rows


def _read_jsonl(path: Path, column: str, kind: str, prefix: str | None, head: bool = False) -> list[dict]:
    rows, stem = [], prefix or _stem(path)
    for n, obj in itertools.islice(iter_jsonl(path), 1 if head else None):
        if column not in obj:
            raise UserError(f"{path}:{n}: key '{column}' (prompts column) is missing")
        row_kind = _row_kind(obj, kind, f"{path}:{n}")
        for key, types in (("id", (str, int)), ("category", (str,))):
            if key in obj and (not isinstance(obj[key], types) or isinstance(obj[key], bool)):
                raise UserError(
                    f"{path}:{n}: key '{key}': a {' or '.join(t.__name__ for t in types)} is expected"
                )
        rows.append(
            {
                "id": str(obj.get("id", f"{stem}-{n}")),
                "messages": to_messages(obj[column], f"{path}:{n}"),
                "category": str(obj.get("category", "jsonl")),
                "source": f"jsonl:{path.name}",
                "kind": row_kind,
            }
        )
    if not rows:
        raise UserError(f"{path}: no prompts (the file has no rows)")
    return rows


def _row_kind(obj: dict, kind: str, where: str) -> str:
    """A row's own 'kind' if it has one (checked), else the source's."""
    row_kind = obj.get("kind", kind)
    if row_kind not in KINDS:
        raise UserError(f"{where}: key 'kind': one of {list(KINDS)} is expected, got {row_kind!r}")
    return row_kind


def _read_dataset(src, where: str, prefix: str | None) -> list[dict]:
    """A `datasets` dataset: a local folder (save_to_disk or data files), a data file, or a hub name."""
    ref = src.path or src.name
    if not ref:
        raise UserError(f"{where}: a 'dataset' source needs 'path' (local) or 'name' (hub)")
    try:
        import datasets
    except ImportError:  # pragma: no cover - a core dependency
        raise UserError(f"{where}: the 'datasets' package is not installed") from None
    try:
        ds = _open_dataset(datasets, src, where)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types; the user gets one line
        _name_bad_local_line(src)
        raise UserError(
            f"{where}: cannot load dataset '{ref}' (split '{src.split}'): {_cause(exc)}"
        ) from None
    if src.column not in ds.column_names:
        raise UserError(
            f"{where}.column: dataset '{ref}' has no column '{src.column}' (columns: {', '.join(ds.column_names)})"
        )
    label = Path(ref).name if src.path else ref
    rows = []
    for n, obj in _dataset_rows(ds, src, where, ref):
        row_kind = obj.get("kind") or src.kind
        if row_kind not in KINDS:
            raise UserError(f"{where}: dataset '{ref}' row {n + 1}: 'kind' must be one of {list(KINDS)}")
        rows.append(
            {
                "id": str(obj.get("id") or f"{prefix or label}-{n}"),
                "messages": to_messages(obj[src.column], f"{where}: dataset '{ref}' row {n + 1}"),
                "category": str(obj.get("category") or "dataset"),
                "source": f"dataset:{label}",
                "kind": row_kind,
            }
        )
    return rows


def _dataset_rows(ds, src, where: str, ref: str):
    """(index, row) for each row of a loaded dataset; a row it cannot read (text that is not UTF-8, which the
    JSON loader lets through) is a UserError naming the local file's line where it can, else the row."""
    rows = iter(ds)
    for n in itertools.count():
        try:
            obj = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow's decoding errors and others: one line
            _name_bad_local_line(src)
            raise UserError(f"{where}: cannot read dataset '{ref}' at row {n + 1}: {_cause(exc)}") from None
        yield n, obj


def _cause(exc: BaseException) -> str:
    """One line for a loader's error: the error it wraps if any (datasets' own says only "An error occurred
    while generating the dataset"), its first line and, if it has more, its last."""
    err = exc.__cause__ or exc
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _name_bad_local_line(src) -> None:
    """Raise the UserError naming the first bad line of a local dataset's text files (the file, or a folder's
    files): a byte that is not UTF-8, or JSON that does not parse; return when none has one."""
    local = Path(src.path).expanduser() if src.path else None
    files = sorted(local.rglob("*")) if local and local.is_dir() else [local] if local else []
    for f in files:
        if f.is_file() and f.suffix in (".json", ".jsonl", ".gz", ".csv") and f.name not in METADATA_FILES:
            _name_bad_line(f)


def _name_bad_line(path: Path) -> None:
    """Raise the UserError naming a data file's first line that is not UTF-8 or, for JSON, the first line
    that does not parse, the file read as one JSON document or, when it is not one and starts with an object,
    as JSON lines; return when it reads."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    byte = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
                    raise UserError(f"{path}:{n}: not UTF-8 text ({byte})") from None
        if ".csv" in path.suffixes:
            return
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
        return  # one valid document: the loader's own message says what it lacks
    except (OSError, EOFError, RecursionError):
        return  # not readable: the loader's own message says so
    except json.JSONDecodeError:
        pass
    if text.lstrip().startswith("{"):
        for _ in iter_jsonl(path):
            pass
        return  # valid JSON lines: the loader's own message says what is wrong
    load_json(path, "dataset file")


def _open_dataset(datasets, src, where: str):
    if src.path:
        p = Path(src.path).expanduser()
        if not p.exists():
            raise UserError(f"{where}.path: not found: {src.path}")
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise UserError(f"{where}.split: '{src.split}' not in {list(ds)}")
                ds = ds[src.split]
            return ds
        if p.is_dir():  # datasets would load the files of one format and leave the others out
            formats = {
                DATA_FORMATS[f.suffix]
                for f in p.rglob("*")
                if f.suffix in DATA_FORMATS and f.name not in METADATA_FILES and f.is_file()
                if not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
            }
            if len(formats) > 1:
                raise UserError(
                    f"{where}.path: the folder {src.path} holds data files of several formats "
                    f"({', '.join(sorted(formats))}); one format per folder is expected"
                )
        if p.is_file():
            fmt = DATA_FORMATS.get(p.suffix)
            if fmt is None:
                raise UserError(
                    f"{where}.path: unknown data file type '{p.suffix}' (json, jsonl, csv or parquet)"
                )
            return datasets.load_dataset(fmt, data_files=str(p), split="train")
        return datasets.load_dataset(str(p), split=src.split)

    if not hub_reachable():
        raise UserError(
            f"{where}.name: dataset '{src.name}' needs the Hugging Face hub, which cannot be reached; "
            "download it elsewhere and give a local 'path'"
        )
    return datasets.load_dataset(src.name, split=src.split)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _conversation_key(messages: list[dict]) -> str:
    return "\x00".join(m["role"] + "\x01" + " ".join(m["content"].split()) for m in messages)


def _trim_to_fraction(rows: list[dict], fraction: float) -> list[dict]:
    """Drop rows (from the end) so helpful prompts make up `fraction` of the result."""
    helpful = [r for r in rows if r["kind"] == "helpful"]
    red = [r for r in rows if r["kind"] != "helpful"]
    if fraction <= 0:
        keep_h, keep_r = 0, len(red)
    elif fraction >= 1:
        keep_h, keep_r = len(helpful), 0
    elif len(helpful) > fraction / (1 - fraction) * len(red):
        keep_h, keep_r = round(fraction / (1 - fraction) * len(red)), len(red)
    else:
        keep_h, keep_r = len(helpful), round(len(helpful) * (1 - fraction) / fraction)
    kept = {id(r) for r in helpful[:keep_h] + red[:keep_r]}
    return [r for r in rows if id(r) in kept]


def write_prompts(path, rows: list[dict]) -> None:
    """Write prompt rows as JSONL in one atomic step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
