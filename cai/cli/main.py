"""The `cai` command line: argparse parsers and thin handlers, nothing else. `cai run`, `cai recipe` and
`cai models` are here; the constitution commands are in cai.cli.constitution, the evaluation and report
commands in cai.cli.evaluate.

Bad input raises `UserError`, printed as one line (`error: ...`) with exit code 2 and no traceback; so is an
OSError (a folder that cannot be made, a full disk).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cai import pipeline
from cai.cli import constitution, evaluate
from cai.cli.options import add_model_flags, settings_of, validate_each
from cai.config.arms import load_checked
from cai.config.layout import active
from cai.config.recipe import STAGES, Recipe
from cai.errors import UserError
from cai.preflight import preflight
from cai.runtime import distributed as dist
from cai.runtime.models import list_models, load_model, load_tokenizer, prepare
from cai.runtime.rundir import code_version


def _cmd_run(a) -> int:
    recipe = load_checked(a.recipe, a.set)
    rdir = pipeline.run(recipe, run_dir=a.run_dir, only=a.only, start=a.start, force=a.force, arms=a.arm)
    if dist.is_main():
        print(f"[cai] run directory: {rdir}")
    dist.shutdown()  # multi-process: all ranks done, leave the process group cleanly
    return 0


def _checked_recipe(path: str) -> Recipe:
    """A recipe that loads and whose files and models are all there (the preflight of `cai run`)."""
    recipe = load_checked(path)
    preflight(recipe)
    return recipe


def _cmd_recipe_validate(a) -> int:
    return validate_each(
        a.files, _checked_recipe, lambda r: f"{r.name}: {', '.join(s for s in r.stages if active(r, s))}"
    )


def _cmd_recipe_schema(a) -> int:
    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def _cmd_models_list(a) -> int:
    for row in list_models():
        mark = "cached" if row["cached"] else "not cached"
        print(f"{row['name']:24s} {mark:11s} {row['what']}")
    return 0


def _cmd_models_prepare(a) -> int:
    if any(row["name"] == a.name and row["cached"] for row in list_models()):
        # converted and checked before (the cache marks a finished conversion): a run loads it anyway
        print(f"{a.name}: ready at {prepare(a.name)} (already prepared)")
        return 0
    t0 = time.time()
    path = prepare(a.name)
    t1 = time.time()
    load_tokenizer(a.name, settings_of(a))
    load_model(a.name, settings_of(a))
    print(f"{a.name}: ready at {path} (prepare {t1 - t0:.1f}s, load {time.time() - t1:.1f}s)")
    return 0


def cai_version() -> str:
    """'0.1.0', with the commit when cai runs from a git checkout ('0.1.0 (commit 1a2b3c4d, modified)')."""
    v = code_version()
    if not v["commit"]:
        return v["version"]
    return f"{v['version']} (commit {v['commit'][:8]}{', modified' if v['modified'] else ''})"


class _Version(argparse.Action):
    """--version, worked out only when asked (it may run git)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"cai {cai_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai", description="Constitutional AI and RLHF training from recipes.")
    p.add_argument("--version", action=_Version, help="print cai's version (and commit) and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = ", ".join(STAGES)

    r = sub.add_parser(
        "run", help="run a recipe's stages in a run directory (resumes, skips finished stages)"
    )
    r.add_argument("recipe", metavar="RECIPE", help="recipe YAML")
    r.add_argument("--run-dir", help="run directory (default runs/<name>)")
    r.add_argument(
        "--only",
        action="append",
        metavar="STAGE",
        help=f"run only this stage when it is out of date (repeatable): {names}",
    )
    r.add_argument(
        "--from",
        dest="start",
        metavar="STAGE",
        help=f"run this stage and the later ones that are out of date: {names}",
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="rerun the selected stages (all, or --only/--from) even when up to date",
    )
    r.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. ppo.kl_coef=0.1"
    )
    r.add_argument(
        "--arm", action="append", metavar="ARM", help="run only this arm's own stages (repeatable)"
    )
    r.set_defaults(func=_cmd_run)

    rc = sub.add_parser("recipe", help="check recipes").add_subparsers(
        dest="sub", required=True, metavar="SUB"
    )
    v = rc.add_parser(
        "validate",
        help="check recipe files: the schema, and every file and model they name (as `cai run` does first)",
    )
    v.add_argument("files", nargs="+", metavar="FILE", help="recipe YAML files")
    v.set_defaults(func=_cmd_recipe_validate)
    rc.add_parser("schema", help="print the recipe JSON Schema").set_defaults(func=_cmd_recipe_schema)

    m = sub.add_parser("models", help="list and prepare built-in model aliases")
    ms = m.add_subparsers(dest="sub", required=True, metavar="SUB")
    ms.add_parser("list", help="list aliases and whether they are cached").set_defaults(func=_cmd_models_list)
    pr = ms.add_parser("prepare", help="convert/cache an alias once (e.g. smollm2-135m-instruct)")
    pr.add_argument("name", metavar="ALIAS", help="a built-in model alias (see `cai models list`)")
    add_model_flags(pr)
    pr.set_defaults(func=_cmd_models_prepare)

    constitution.register(sub)
    evaluate.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; a closed stdout pipe (`cai ... | head`) ends it quietly with exit code 0. A process that
    has been in a process group (a launch by accelerate or torchrun) ends itself here: `dist.end_process`."""
    code = _quietly(argv)
    if dist.was_in_group():
        dist.end_process(code)
    return code


def _quietly(argv: list[str] | None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here at the latest, not as a message at exit
    except BrokenPipeError:
        try:  # what is still buffered goes nowhere, so the interpreter's last flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except OSError as exc:  # a folder that cannot be made, a disk full, a permission: one line, no traceback
        where = f"{exc.filename}: " if exc.filename is not None else ""
        what = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: {where}{what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
