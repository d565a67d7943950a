"""What several commands share: flags built from the schemas, once (the model flags from
cai.runtime.settings.Settings, the labeller flags from the feedback block of the recipe schema, so a flag's
name, type, choices, default and help are the schema's own), checking every file given, and output paths."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from cai.config.blocks import FeedbackConfig
from cai.constitution.fewshot import load_feedback_few_shot
from cai.errors import UserError
from cai.runtime.settings import Settings

# The feedback block's fields that configure a labeller (what `cai feedback eval` and
# `cai constitution test/effect` take as flags).
LABELLER_FIELDS = ("both_orders", "num_principles", "few_shot", "num_few_shot", "score_batch_size")
# The one rule for --few-shot, in its help: the file is checked whenever it is given, used only with a count.
FEW_SHOT_RULE = "Read and checked whenever given; its examples are used only with --num-few-shot N > 0."


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': a whole number expected") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: at least {low} expected")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (a negative --limit would slice items off the end)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of a count that may be 0 (how many items to show)."""
    return _int_at_least(text, 0)


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """argparse type of a number in an interval: `number_in(0, 0.5, high_open=True)` is 0 <= x < 0.5 (NaN
    and infinities are refused, as every comparison with them fails)."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}': a number expected") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"{text}: a number in {shown} expected")
        return value

    return parse


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_fields(parser, model_cls, names, defaults: dict | None = None, notes: dict | None = None) -> None:
    """One flag per named field of a pydantic model: a bool as --x / --no-x, a Literal as choices, a number or
    text typed; the field's description (and its `notes` entry) is the help. `defaults` overrides a field's
    default."""
    for name in names:
        info = model_cls.model_fields[name]
        default = (defaults or {}).get(name, info.default)
        ann = info.annotation
        args = typing.get_args(ann)
        note = f" {notes[name]}" if name in (notes or {}) else ""
        kwargs: dict = {"default": default, "help": f"{info.description}{note} (default: {default})"}
        if ann is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(ann) is typing.Literal:
            kwargs["choices"] = list(args)
        elif ann in (int, float, str):
            kwargs["type"] = ann
        else:  # `X | None`: the flag takes an X
            kinds = [a for a in args if a is not type(None)]
            kwargs["type"] = kinds[0] if kinds and kinds[0] in (int, float, str) else str
        parser.add_argument(flag(name), dest=name, **kwargs)


def add_model_flags(parser) -> None:
    """--device, --dtype, --trust-remote-code/--no-trust-remote-code, --seed: every command that loads a model."""
    add_fields(parser, Settings, ("device", "dtype", "trust_remote_code", "seed"))


def settings_of(args) -> Settings:
    """The model flags as Settings; a value the schema refuses (`--seed -1`) is a UserError naming the flag."""
    try:
        return Settings(
            device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code, seed=args.seed
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "seed"
        raise UserError(f"{flag(name)}: {err['msg']} (got {err.get('input')!r})") from None


def add_labeller_flags(parser, skip: tuple[str, ...] = ()) -> None:
    """The labeller fields of the feedback block, as flags; a `skip`ped field is not offered (a command that
    cannot honour it) and keeps the schema's default."""
    names = [name for name in LABELLER_FIELDS if name not in skip]
    add_fields(parser, FeedbackConfig, names, notes={"few_shot": FEW_SHOT_RULE})
    parser.set_defaults(**{name: FeedbackConfig.model_fields[name].default for name in skip})


def labeller_config(args) -> FeedbackConfig:
    """A feedback block holding the labeller flags' values (the rest at their defaults); a value the schema
    refuses (`--num-principles 0`) is a UserError naming the flag, before any model loads. A --few-shot file
    is read and checked even when --num-few-shot is 0 (FEW_SHOT_RULE)."""
    try:
        cfg = FeedbackConfig(**{name: getattr(args, name) for name in LABELLER_FIELDS})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else LABELLER_FIELDS[0]
        raise UserError(f"{flag(name)}: {err['msg']} (got {err.get('input')!r})") from None
    if cfg.few_shot:
        try:
            load_feedback_few_shot(cfg.few_shot)
        except UserError as exc:
            raise UserError(f"--few-shot {exc}") from None
    return cfg


def out_path(path: str | Path, flag: str, folder: bool = True) -> Path:
    """`path` checked before any work: a folder (`folder`) or a file to write, not blocked by a file or folder
    in the way nor in a folder this user cannot write (a UserError naming the flag)."""
    path = Path(path)
    want = "a folder to write the results into" if folder else "a file path to write"
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{flag} {path}: an existing {'file' if folder else 'folder'}; {want} is expected")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{flag} {path}: {above} is a file, not a folder; {want} is expected")
    nearest = path if path.is_dir() else above
    if nearest is not None and not os.access(nearest, os.W_OK):
        raise UserError(f"{flag} {path}: {nearest} is not writable; {want} is expected")
    return path


def validate_each(files: list[str], load, describe) -> int:
    """Load every file (a bad one does not stop the others); 'ok  FILE  (what)' or the one-line error of
    each; exit code 2 when any failed."""
    failed = 0
    for f in files:
        try:
            print(f"ok  {f}  ({describe(load(f))})")
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0
