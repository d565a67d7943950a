"""The `cai` command line: argparse parsers and thin handlers, nothing else. `cai run`, `cai recipe` and
`cai models` are here; the constitution commands are in cai.cli.constitution, the evaluation and report
commands in cai.cli.evaluate.

Bad input raises `UserError`, printed as one line (`error: ...`) with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import PackageNotFoundError, version

from cai import pipeline
from cai.cli import constitution, evaluate
from cai.cli.options import validate_each
from cai.config.arms import load_checked
from cai.config.layout import active
from cai.config.recipe import STAGES, Recipe
from cai.errors import UserError
from cai.runtime import distributed as dist
from cai.runtime.models import list_models, load_model, load_tokenizer, prepare


def _cmd_run(a) -> int:
    recipe = load_checked(a.recipe, a.set)
    rdir = pipeline.run(recipe, run_dir=a.run_dir, only=a.only, start=a.start, arms=a.arm)
    if dist.is_main():
        print(f"[cai] run directory: {rdir}")
    dist.shutdown()  # multi-process: all ranks done, leave the process group cleanly
    return 0


def _cmd_recipe_validate(a) -> int:
    return validate_each(
        a.files, load_checked, lambda r: f"{r.name}: {', '.join(s for s in r.stages if active(r, s))}"
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
    t0 = time.time()
    path = prepare(a.name)
    t1 = time.time()
    load_tokenizer(a.name)
    load_model(a.name)
    print(f"{a.name}: ready at {path} (prepare {t1 - t0:.1f}s, load {time.time() - t1:.1f}s)")
    return 0


def cai_version() -> str:
    try:
        return version("cai")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai", description="Constitutional AI and RLHF training from recipes.")
    p.add_argument("--version", action="version", version=f"cai {cai_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = ", ".join(STAGES)

    r = sub.add_parser(
        "run", help="run a recipe's stages in a run directory (resumes, skips finished stages)"
    )
    r.add_argument("recipe", metavar="RECIPE", help="recipe YAML")
    r.add_argument("--run-dir", help="run directory (default runs/<name>)")
    r.add_argument(
        "--only", action="append", metavar="STAGE", help=f"run only this stage (repeatable): {names}"
    )
    r.add_argument("--from", dest="start", metavar="STAGE", help=f"rerun from this stage on: {names}")
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
    v = rc.add_parser("validate", help="validate recipe files; every file given is checked")
    v.add_argument("files", nargs="+", metavar="FILE", help="recipe YAML files")
    v.set_defaults(func=_cmd_recipe_validate)
    rc.add_parser("schema", help="print the recipe JSON Schema").set_defaults(func=_cmd_recipe_schema)

    m = sub.add_parser("models", help="list and prepare built-in model aliases")
    ms = m.add_subparsers(dest="sub", required=True, metavar="SUB")
    ms.add_parser("list", help="list aliases and whether they are cached").set_defaults(func=_cmd_models_list)
    pr = ms.add_parser("prepare", help="convert/cache an alias once (e.g. smollm2-135m-instruct)")
    pr.add_argument("name", metavar="ALIAS", help="a built-in model alias (see `cai models list`)")
    pr.set_defaults(func=_cmd_models_prepare)

    constitution.register(sub)
    evaluate.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
