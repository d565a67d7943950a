"""`cai run`: runs a recipe's stages in order in a run directory, skipping stages whose manifest matches.

What each stage reads and where each stage of each arm lives is decided in cai.config.layout; this module
runs the plan. A stage reruns when its fingerprint changes; a rerun gives it a new output id, so everything
downstream reruns too. A stage whose manifest says `running` (killed) with the same fingerprint resumes in
place: generation from its JSONL, training from its last checkpoint. Every stage gets a read-only view of
the recipe keys it declares (cai.config.view), its own folder, and the folders of the stages it reads.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from cai.config.layout import (
    STAGES,
    Layout,
    Unit,
    fingerprint,
    plan,
    run_dir_of,
    select_stages,
    shared_cache_dir,
    stage_view,
)
from cai.config.load import RECIPE_FILE, field_at, ref_kind
from cai.config.recipe import STAGES as ORDER
from cai.config.recipe import Recipe
from cai.errors import UserError
from cai.runtime import distributed as dist
from cai.runtime.hashing import hash_json
from cai.runtime.rundir import StageContext, package_versions, read_manifest, write_json
from cai.runtime.runlog import StageTracker, Summary, make_tracker
from cai.stages import critique_revise, feedback, gold, ppo, preference_model, report, sft

STAGE_MODULES = {
    "gold": gold,
    "critique_revise": critique_revise,
    "sft": sft,
    "feedback": feedback,
    "preference_model": preference_model,
    "ppo": ppo,
    "report": report,
}


def _load_stage(stage: str):
    return STAGE_MODULES[stage]


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
        | ({s for s in ORDER if ORDER.index(s) >= ORDER.index(start)} if start else set())
    )
    if dist.is_main():
        rdir.mkdir(parents=True, exist_ok=True)
        write_json(rdir / RECIPE_FILE, recipe.model_dump(mode="json", exclude_unset=True))
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
    """Files named by the top-level keys the stages read (constitutions) must exist, before anything runs."""
    for unit in layout.units.values():
        where = f"arm '{unit.arm}': " if unit.arm else ""
        view = stage_view(unit.recipe, unit.stage)
        for key in view.keys():
            info = field_at(key) if key != "settings" else None
            value = getattr(view, key)
            if info is None or ref_kind(info) != "file":
                continue
            if not value:
                raise UserError(f"{where}{key}: not set; stage '{unit.stage}' needs a file here")
            if not Path(value).is_file():
                raise UserError(f"{where}{key}: file not found: {value}")


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
    cache = shared_cache_dir(layout, unit, {d: input_ids.get(d) for d in STAGES[unit.stage].inputs})
    manifest = _run_stage(
        unit,
        ctx_inputs,
        fp,
        cfg,
        input_ids,
        cache,
        tracker,
        resumed=old is not None and not complete,
        arms=list(layout.arms),
    )
    outputs[unit.key] = manifest["output"]
    summary.add(unit, manifest, ran=True)


def _reset_stage(out_dir: Path) -> None:
    """A stage whose inputs changed starts clean: stale partial outputs would otherwise be resumed."""
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
    arms: list[str] | None = None,
) -> dict:
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
        config=stage_view(unit.recipe, unit.stage),
        stage=unit.stage,
        out_dir=out_dir,
        inputs=inputs,
        cache_dir=cache_dir,
        tracker=stage_tracker,
        arms=list(arms or []),
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
