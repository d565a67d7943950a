"""The `cai` command line. Each subcommand is a thin call into a library function.

Bad input raises `UserError`, printed as one line (`error: ...`) with exit code 2 and no traceback.
Areas that own their commands (evaluation, analysis, report, constitution tools) add them through a
`register(subparsers)` function in their own module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from cai.errors import UserError

# modules that add their own subcommands: (module, parent command or None for top level)
EXTENSIONS = [
    ("cai.evaluation", None),  # cai pm eval, cai feedback eval
    ("cai.analysis", None),  # cai analyze kl-reward
    ("cai.stages.report", None),  # cai report RUN_DIR
    ("cai.constitution_tools", "constitution"),  # cai constitution test / lint / effect
]


def _cmd_run(a) -> int:
    from cai import pipeline
    from cai.config import load_recipe

    recipe = load_recipe(a.recipe, a.set)
    rdir = pipeline.run(recipe, run_dir=a.run_dir, only=a.only, start=a.start, arms=a.arm)
    from cai import distributed as dist

    if dist.is_main():
        print(f"[cai] run directory: {rdir}")
    dist.shutdown()  # multi-process: all ranks done, leave the process group cleanly
    return 0


def _cmd_recipe_validate(a) -> int:
    from cai.config import load_recipe

    failed = 0
    for f in a.files:
        try:
            r = load_recipe(f)
            print(f"ok  {f}  ({r.name}: {', '.join(r.stages)})")
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def _cmd_recipe_schema(a) -> int:
    from cai.config import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def _cmd_const_validate(a) -> int:
    from cai.constitution import load_constitution

    failed = 0
    for f in a.files:
        try:
            c = load_constitution(f)
            print(f"ok  {f}  ({c.name}, {c.kind}, {len(c.principles)} principles)")
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def _cmd_const_show(a) -> int:
    from cai.constitution import load_constitution, show

    print(show(load_constitution(a.file)))
    return 0


def _cmd_const_diff(a) -> int:
    from cai.constitution import format_diff, load_constitution

    print(format_diff(load_constitution(a.old), load_constitution(a.new)))
    return 0


def _cmd_const_import(a) -> int:
    from pathlib import Path

    from cai.constitution import import_paper, to_yaml

    name = a.name or Path(a.out).stem
    c = import_paper(a.critique_json, a.feedback, name)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(to_yaml(c), encoding="utf-8")
    print(f"wrote {a.out}: {len(c.principles)} principles")
    return 0


def _cmd_const_schema(a) -> int:
    from cai.constitution import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_models_list(a) -> int:
    from cai.models import list_models

    for row in list_models():
        mark = "cached" if row["cached"] else "not cached"
        print(f"{row['name']:24s} {mark:11s} {row['what']}")
    return 0


def _cmd_models_prepare(a) -> int:
    import time

    from cai.models import load_model, load_tokenizer, prepare

    t0 = time.time()
    path = prepare(a.name)
    t1 = time.time()
    load_tokenizer(a.name)
    load_model(a.name)
    print(f"{a.name}: ready at {path} (prepare {t1 - t0:.1f}s, load {time.time() - t1:.1f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai", description="Constitutional AI and RLHF training from recipes.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe's stages in a run directory (resumes, skips finished stages)")
    r.add_argument("recipe", help="recipe YAML")
    r.add_argument("--run-dir", help="run directory (default runs/<name>)")
    r.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    r.add_argument("--from", dest="start", metavar="STAGE", help="rerun from this stage on")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. ppo.kl_coef=0.1")
    r.add_argument("--arm", action="append", metavar="ARM", help="run only this arm's own stages (repeatable)")
    r.set_defaults(func=_cmd_run)

    rc = sub.add_parser("recipe", help="check recipes").add_subparsers(dest="sub", required=True, metavar="SUB")
    v = rc.add_parser("validate", help="validate recipe files; exit 2 on the first error in each")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=_cmd_recipe_validate)
    rc.add_parser("schema", help="print the recipe JSON Schema").set_defaults(func=_cmd_recipe_schema)

    c = sub.add_parser("constitution", help="write, check and compare constitutions")
    cs = c.add_subparsers(dest="sub", required=True, metavar="SUB")
    v = cs.add_parser("validate", help="validate constitution files; errors name file:line and key")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=_cmd_const_validate)
    s = cs.add_parser("show", help="print a readable summary")
    s.add_argument("file")
    s.set_defaults(func=_cmd_const_show)
    d = cs.add_parser("diff", help="principles added, removed and changed, with a word diff")
    d.add_argument("old")
    d.add_argument("new")
    d.set_defaults(func=_cmd_const_diff)
    i = cs.add_parser("import", help="convert the CAI paper's JSON format into a constitution YAML")
    i.add_argument("critique_json", help="critique/revision JSON ({name: {prompt, edit_request}})")
    i.add_argument("--feedback", help="feedback instructions JSON (a list, paired by position)")
    i.add_argument("-o", "--out", required=True, help="output YAML")
    i.add_argument("--name", help="constitution name (default: output file stem)")
    i.set_defaults(func=_cmd_const_import)
    cs.add_parser("schema", help="print the constitution JSON Schema (for editors)").set_defaults(func=_cmd_const_schema)

    m = sub.add_parser("models", help="list and prepare built-in model aliases").add_subparsers(dest="sub", required=True, metavar="SUB")
    m.add_parser("list", help="list aliases and whether they are cached").set_defaults(func=_cmd_models_list)
    pr = m.add_parser("prepare", help="convert/cache an alias once (e.g. smollm2-135m-instruct)")
    pr.add_argument("name")
    pr.set_defaults(func=_cmd_models_prepare)

    parents = {"constitution": cs}
    for module_name, parent in EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(parents[parent] if parent else sub)
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
