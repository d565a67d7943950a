"""What several commands share: flags built from the schemas, once (the model flags from
cai.runtime.settings.Settings, the labeller flags from the feedback block of the recipe schema, so a flag's
name, type, choices, default and help are the schema's own), and checking every file given."""

from __future__ import annotations

import argparse
import sys
import typing

from cai.config.blocks import FeedbackConfig
from cai.errors import UserError
from cai.runtime.settings import Settings

# The feedback block's fields that configure a labeller (what `cai feedback eval` and
# `cai constitution test/effect` take as flags).
LABELLER_FIELDS = ("both_orders", "num_principles", "few_shot", "num_few_shot", "score_batch_size")


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (a negative --limit would slice items off the end)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': a whole number expected") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 expected")
    return value


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
    return Settings(
        device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code, seed=args.seed
    )


def add_labeller_flags(parser) -> None:
    """The labeller fields of the feedback block, as flags."""
    add_fields(parser, FeedbackConfig, LABELLER_FIELDS)


def labeller_config(args) -> FeedbackConfig:
    """A feedback block holding the labeller flags' values (the rest at their defaults)."""
    return FeedbackConfig(**{name: getattr(args, name) for name in LABELLER_FIELDS})


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
