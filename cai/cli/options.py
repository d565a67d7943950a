"""What several commands share: flags built from the schemas, once (the model flags from
cai.runtime.settings.Settings, the labeller flags from the feedback block of the recipe schema, so a flag's
name, type, choices, default and help are the schema's own), and checking every file given."""

from __future__ import annotations

import argparse
import sys
import typing

from pydantic import ValidationError

from cai.config.blocks import FeedbackConfig
from cai.errors import UserError
from cai.runtime.settings import Settings

# The feedback block's fields that configure a labeller (what `cai feedback eval` and
# `cai constitution test/effect` take as flags).
LABELLER_FIELDS = ("both_orders", "num_principles", "few_shot", "num_few_shot", "score_batch_size")


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


def add_fields(parser, model_cls, names, defaults: dict | None = None) -> None:
    """One flag per named field of a pydantic model: a bool as --x / --no-x, a Literal as choices, a number or
    text typed; the field's description is the help. `defaults` overrides a field's default."""
    for name in names:
        info = model_cls.model_fields[name]
        default = (defaults or {}).get(name, info.default)
        ann = info.annotation
        args = typing.get_args(ann)
        kwargs: dict = {"default": default, "help": f"{info.description} (default: {default})"}
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
    add_fields(parser, FeedbackConfig, [name for name in LABELLER_FIELDS if name not in skip])
    parser.set_defaults(**{name: FeedbackConfig.model_fields[name].default for name in skip})


def labeller_config(args) -> FeedbackConfig:
    """A feedback block holding the labeller flags' values (the rest at their defaults); a value the schema
    refuses (`--num-principles 0`) is a UserError naming the flag, before any model loads."""
    try:
        return FeedbackConfig(**{name: getattr(args, name) for name in LABELLER_FIELDS})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else LABELLER_FIELDS[0]
        raise UserError(f"{flag(name)}: {err['msg']} (got {err.get('input')!r})") from None


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
