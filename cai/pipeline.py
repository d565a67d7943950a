"""`cai run`: runs a recipe's stages in order in a run directory, skipping stages whose manifest matches.

Each stage's fingerprint hashes the recipe keys it reads (file-valued keys by content) and the output
ids of the stages it reads. A stage reruns when its fingerprint changes; a rerun gives it a new output
id, so everything downstream reruns too. A stage whose manifest says `running` (killed) with the same
fingerprint resumes in place: generation from its JSONL, training from its last checkpoint.

With arms (`recipe.arms` / `recipe.sweep`), the stages before the first one whose config differs between
arms are shared in RUN/<stage>; from that stage on, each arm's stages go in RUN/arms/<arm>/<stage>.
The report is one, in RUN/report, over all arms.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from cai import distributed as dist
from cai.config import STAGES, Recipe
from cai.errors import UserError
from cai.rundir import StageContext, hash_json, package_versions, read_manifest, sha256_file, write_json

COMMON = ["seed", "device", "dtype", "trust_remote_code"]
# recipe keys each stage reads, and the stages whose outputs it reads
DEPENDS: dict[str, tuple[list[str], list[str]]] = {
    "critique_revise": (
        COMMON + ["models.policy", "constitution", "prompts", "generation", "critique_revise"],
        [],
    ),
    "sft": (COMMON + ["models.policy", "sft"], ["critique_revise"]),
    "feedback": (
        COMMON + ["models.policy", "models.feedback", "feedback_constitution", "generation", "feedback"],
        ["critique_revise", "sft"],
    ),
    "preference_model": (
        COMMON + ["models.policy", "models.reward_backbone", "preference_model"],
        ["feedback"],
    ),
    "ppo": (COMMON + ["ppo"], ["critique_revise", "sft", "preference_model"]),
    "report": (
        COMMON + ["models", "generation", "report"],
        ["critique_revise", "sft", "feedback", "preference_model", "ppo"],
    ),
}
FILE_KEYS = {"constitution", "feedback_constitution"}
# work a stage may share between arms (ctx.shared_path): the keys that decide it; the stage's inputs count too
SHARED_CACHE: dict[str, list[str]] = {
    "feedback": COMMON
    + [
        "models.policy",
        "feedback.policy",
        "feedback.responses_per_prompt",
        "feedback.generation",
        "generation",
    ],
}
RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "summary.json"


def _get(recipe: Recipe, dotted: str):
    if dotted == "feedback_constitution":  # the constitution feedback actually uses
        return recipe.feedback_constitution or recipe.constitution
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _view(recipe: Recipe, keys: list[str]) -> dict:
    view = {}
    for key in keys:
        value = _get(recipe, key)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if key in FILE_KEYS and value:
            p = Path(value)
            value = {"path": value, "sha256": sha256_file(p) if p.is_file() else None}
        if key == "preference_model" and value.get("spec"):  # a named spec's content decides the PM too
            from cai.reward_specs import pm_spec_path

            value["spec_sha256"] = sha256_file(pm_spec_path(value["spec"]))
        view[key] = value
    return view


def stage_config(recipe: Recipe, stage: str) -> dict:
    """The slice of the recipe a stage reads, with file-valued keys replaced by their content hash."""
    return _view(recipe, DEPENDS[stage][0])


def fingerprint(recipe: Recipe, stage: str, input_ids: dict[str, str | None]) -> tuple[str, dict]:
    cfg = stage_config(recipe, stage)
    return hash_json({"config": cfg, "inputs": input_ids}), cfg


def run_dir_of(recipe: Recipe, override: str | None = None) -> Path:
    return Path(override or recipe.run_dir or Path("runs") / recipe.name)


def _load_stage(stage: str):
    return importlib.import_module(f"cai.stages.{stage}")


def select_stages(recipe: Recipe, only: list[str] | None, start: str | None) -> list[str]:
    for s in (only or []) + ([start] if start else []):
        if s not in STAGES:
            raise UserError(f"unknown stage '{s}'; stages: {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in recipe.stages]
    if start:
        stages = stages[stages.index(start) :] if start in stages else []
    if only:
        stages = [s for s in stages if s in only]
    return stages


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class Unit:
    """One stage in one folder: shared (arm None) or one arm's own."""

    key: str  # "sft" or "arms/<arm>/ppo": its folder relative to the run directory
    stage: str
    dir: Path
    recipe: Recipe
    arm: str | None
    inputs: dict[str, str]  # input name (a stage id, or a unit key for the report) -> unit key
    users: list[str] = field(default_factory=list)  # arms that read it


@dataclass
class Layout:
    run_dir: Path
    recipe: Recipe
    arms: dict[str, Recipe]  # {} for a run without arms
    units: dict[str, Unit]  # in run order
    where: dict[str | None, dict[str, str]]  # arm (None: the run without arms) -> stage -> unit key

    def stage_dir(self, stage: str, arm: str | None = None) -> Path | None:
        key = self.where.get(arm if self.arms else None, {}).get(stage)
        return self.units[key].dir if key else None


def plan(recipe: Recipe, run_dir: str | Path) -> Layout:
    """Where every stage of every arm lives, and what it reads."""
    from cai.arms import expand_arms

    rdir = Path(run_dir)
    body = [s for s in STAGES if s in recipe.stages and s != "report"]
    arms = expand_arms(recipe)
    # arms share every stage before the first one whose config is not the same in all arms
    split = next(
        (i for i, s in enumerate(body) if len({hash_json(stage_config(a, s)) for _, a in arms}) > 1),
        len(body),
    )
    units: dict[str, Unit] = {}
    where: dict[str | None, dict[str, str]] = {}
    for name, arm in arms or [(None, recipe)]:
        m: dict[str, str] = {}
        for i, s in enumerate(body):
            reads = {d: m[d] for d in DEPENDS[s][1] if d in m}
            if name is not None and i >= split:
                key = f"arms/{name}/{s}"
                units[key] = Unit(key, s, rdir / key, arm, name, reads, [name])
            else:
                key = s
                units.setdefault(key, Unit(key, s, rdir / s, arm, None, reads))
                if name is not None:
                    units[key].users.append(name)
            m[s] = key
        where[name] = m
    shared = sorted((u for u in units.values() if u.arm is None), key=lambda u: STAGES.index(u.stage))
    ordered = {u.key: u for u in shared} | {k: u for k, u in units.items() if u.arm is not None}
    if "report" in recipe.stages:
        if arms:
            inputs = {k: k for k in ordered}
        else:
            inputs = {d: d for d in DEPENDS["report"][1] if d in ordered}
        ordered["report"] = Unit(
            "report", "report", rdir / "report", recipe, None, inputs, [n for n, _ in arms]
        )
        for m in where.values():
            m["report"] = "report"
    return Layout(rdir, recipe, dict(arms), ordered, where)


def load_run_recipe(run_dir: str | Path) -> Recipe:
    """The recipe a run was made with (RUN/recipe.json, written by `cai run`)."""
    import json

    p = Path(run_dir) / RECIPE_FILE
    if not p.is_file():
        raise UserError(f"{run_dir}: not a run directory ({RECIPE_FILE} is missing; `cai run` writes it)")
    try:
        return Recipe.model_validate(json.loads(p.read_text()))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"{p}: not a recipe this version can read ({type(exc).__name__})") from None


def shared_cache_dir(layout: Layout, unit: Unit, input_ids: dict[str, str | None]) -> Path | None:
    """For arms: a folder keyed by what decides the shared work (e.g. sampled responses), else None."""
    if not layout.arms or unit.stage not in SHARED_CACHE:
        return None
    key = hash_json({"config": _view(unit.recipe, SHARED_CACHE[unit.stage]), "inputs": input_ids})
    return layout.run_dir / "shared" / f"{unit.stage}-{key}"


# ------------------------------------------------------------------------------------------------ run
def run(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    only: list[str] | None = None,
    start: str | None = None,
    force: list[str] | None = None,
    arms: list[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Run the selected stages; return the run directory.

    `only` restricts to these stages and reruns them; `start` reruns that stage and runs everything after
    it; `force` reruns the named stages; `arms` restricts arm-specific stages to these arms.
    """
    from cai.runlog import Summary, make_tracker

    dist.init_from_env()  # under `accelerate launch`/torchrun: join the process group once, before any stage
    rdir = run_dir_of(recipe, str(run_dir) if run_dir else None)
    layout = plan(recipe, rdir)
    if arms:
        unknown = [a for a in arms if a not in layout.arms]
        if unknown:
            raise UserError(f"--arm {unknown[0]}: no such arm; arms: {', '.join(layout.arms) or 'none'}")
    _check_files(layout)
    selected = set(select_stages(recipe, only, start))
    forced = (
        set(force or [])
        | set(only or [])
        | ({s for s in STAGES if STAGES.index(s) >= STAGES.index(start)} if start else set())
    )
    if dist.is_main():
        rdir.mkdir(parents=True, exist_ok=True)
        write_json(rdir / RECIPE_FILE, recipe.model_dump(mode="json"))
    dist.barrier()
    tracker = make_tracker(recipe, rdir)
    summary = Summary(layout, quiet=quiet)
    outputs: dict[str, str | None] = {}  # unit key -> output id of its complete manifest
    try:
        for unit in layout.units.values():
            _step(layout, unit, outputs, selected, forced, arms, tracker, summary)
    finally:
        if tracker is not None:
            tracker.finish()
    summary.finish()
    return rdir


def _check_files(layout: Layout) -> None:
    """File-valued keys (constitutions) of every stage that will run must exist, before anything runs."""
    named = (
        [(None, layout.recipe)] if not layout.arms else [(f"arm '{n}'", r) for n, r in layout.arms.items()]
    )
    for where, r in named:
        for key in sorted(FILE_KEYS):
            if not any(key in DEPENDS[u.stage][0] for u in layout.units.values()):
                continue
            value = _get(r, key)
            if value and not Path(value).is_file():
                raise UserError(f"{where + ': ' if where else ''}{key}: file not found: {value}")


def _say(msg: str) -> None:
    if dist.is_main():
        print(f"[cai] {msg}", flush=True)


def _step(
    layout: Layout,
    unit: Unit,
    outputs: dict,
    selected: set,
    forced: set,
    arms: list[str] | None,
    tracker,
    summary,
) -> None:
    input_ids = {name: outputs.get(k) for name, k in unit.inputs.items()}
    fp, cfg = fingerprint(unit.recipe, unit.stage, input_ids)
    old = dist.broadcast_object(read_manifest(unit.dir))  # rank 0's view: every rank takes the same decision
    complete = old is not None and old.get("status") == "complete"
    wanted = unit.stage in selected and (not arms or unit.arm is None or unit.arm in arms)
    if not wanted:
        outputs[unit.key] = old.get("output") if complete else None
        if complete and old.get("fingerprint") != fp:
            summary.stale.append(unit.key)
        return
    missing = [name for name, k in unit.inputs.items() if outputs.get(k) is None and unit.stage != "report"]
    if missing:
        k = unit.inputs[missing[0]]
        raise UserError(
            f"stage '{unit.key}' needs '{k}' ({layout.units[k].dir}), which is not complete: run the earlier stages first"
        )
    for k in unit.inputs.values():
        if k in summary.stale:
            _say(
                f"warning: {unit.key} reads {k}, which is out of date with the recipe (not selected in this run)"
            )
    if complete and old.get("fingerprint") == fp and unit.stage not in forced:
        _say(f"{unit.key}: up to date, skipped ({unit.dir})")
        outputs[unit.key] = old.get("output")
        summary.add(unit, old, ran=False)
        return
    if complete:
        _say(
            f"{unit.key}: {'rerun requested' if old.get('fingerprint') == fp else 'config or inputs changed'}, rerunning"
        )
        _reset_stage(unit.dir)
    elif old is not None and old.get("fingerprint") != fp:
        _say(f"{unit.key}: partial output from a different config, starting clean")
        _reset_stage(unit.dir)
    elif old is not None:
        _say(f"{unit.key}: resuming an interrupted run (status '{old.get('status')}')")
    ctx_inputs = {name: layout.units[k].dir for name, k in unit.inputs.items()}
    cache = shared_cache_dir(layout, unit, {d: input_ids.get(d) for d in DEPENDS[unit.stage][1]})
    manifest = _run_stage(
        unit, ctx_inputs, fp, cfg, input_ids, cache, tracker, resumed=old is not None and not complete
    )
    outputs[unit.key] = manifest["output"]
    summary.add(unit, manifest, ran=True)


def _reset_stage(out_dir: Path) -> None:
    """A stage whose inputs changed starts clean: stale partial outputs would otherwise be resumed."""
    import shutil

    if not dist.is_main() or not out_dir.is_dir():
        dist.barrier()
        return
    for child in out_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    dist.barrier()


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    if dist.is_main():
        write_json(out_dir / "manifest.json", manifest)


def _run_stage(
    unit: Unit,
    inputs: dict,
    fp: str,
    cfg: dict,
    input_ids: dict,
    cache_dir: Path | None,
    tracker,
    resumed: bool = False,
) -> dict:
    from cai.runlog import StageTracker

    module = _load_stage(unit.stage)
    out_dir = unit.dir
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    manifest = {
        "stage": unit.stage,
        "arm": unit.arm,
        "status": "running",
        "fingerprint": fp,
        "config": cfg,
        "inputs": input_ids,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "resumed": resumed,
        "world_size": dist.world_size(),
        "engine": dist.engine(),
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_manifest(out_dir, manifest)
    stage_tracker = StageTracker(tracker, unit.key) if tracker is not None else None
    ctx = StageContext(
        recipe=unit.recipe,
        stage=unit.stage,
        out_dir=out_dir,
        inputs=inputs,
        cache_dir=cache_dir,
        tracker=stage_tracker,
    )
    _say(f"{unit.key}: running -> {out_dir}")
    t0 = time.time()
    try:
        module.run(ctx)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        manifest.update(
            status=status, error=f"{type(exc).__name__}: {exc}"[:500], seconds=round(time.time() - t0, 2)
        )
        _write_manifest(out_dir, manifest)
        raise
    dist.release_stage_state()  # the next stage must not inherit this one's DeepSpeed settings
    seconds = round(time.time() - t0, 2)
    if stage_tracker is not None:
        stage_tracker.replay_if_silent(out_dir / "metrics.jsonl")
    ended = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest.update(
        status="complete",
        ended=ended,
        seconds=seconds,
        summary=ctx.summary,
        output=hash_json({"fingerprint": fp, "ended": ended, "t": time.time()}),
    )
    manifest = dist.broadcast_object(manifest)  # one output id on every rank
    _write_manifest(out_dir, manifest)
    dist.barrier()
    _say(f"{unit.key}: done in {seconds:.1f}s")
    return manifest
