"""`cai run`: runs a recipe's stages in order in a run directory, skipping stages whose manifest matches.

What each stage reads and where each stage of each arm lives is decided in cai.config.layout; this module runs
the plan. A stage reruns when its fingerprint changes. Its output id is the hash of the content of the outputs
it declares (cai.config.layout.STAGES), so a rerun that writes the same files leaves everything downstream up
to date, and one that writes different files makes it rerun. `--only` and `--from` select stages; a selected
stage that is up to date is skipped unless forced. A stage whose manifest says `running` (killed) with the
same fingerprint resumes in place: generation from its JSONL, training from its last checkpoint; its manifest
keeps every attempt's time. A stage that starts clean (changed, forced, or files without a manifest, which the
pipeline writes first) is reset atomically (_reset_stage). Every stage gets a read-only view of the recipe
keys it declares (cai.config.view), its own folder, and the folders of the stages it reads.
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path

from cai.config.layout import (
    STAGES,
    Layout,
    Unit,
    fingerprint,
    inputs_of,
    plan,
    run_dir_of,
    select_stages,
    shared_cache_dir,
    stage_view,
)
from cai.config.load import RECIPE_FILE
from cai.config.recipe import Recipe
from cai.errors import UserError
from cai.hashing import hash_outputs, sha256_file
from cai.preflight import preflight
from cai.runtime import distributed as dist
from cai.runtime import vllm_engine
from cai.runtime.rundir import (
    StageContext,
    check_resettable,
    check_run_dir,
    code_version,
    package_versions,
    read_manifest,
    run_lock,
    run_token,
    update_run_info,
    write_json,
)
from cai.runtime.runlog import StageTracker, Summary, make_tracker, peak_memory, reset_peak_memory
from cai.stages import critique_revise, feedback, gold, policy, preference_model, report, sft

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # a manifest's `started` and `ended`, local time

STAGE_MODULES = {
    "gold": gold,
    "critique_revise": critique_revise,
    "sft": sft,
    "feedback": feedback,
    "preference_model": preference_model,
    "policy": policy,
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
    force: bool = False,
    arms: list[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Run the selected stages that are out of date; return the run directory.

    `only` restricts to these stages; `start` selects that stage and everything after it; `force` reruns the
    selected stages even when they are up to date; `arms` restricts arm-specific stages to these arms.
    """
    dist.init_from_env(recipe.device)  # under `accelerate launch`/torchrun: join the process group once
    rdir = run_dir_of(recipe, str(run_dir) if run_dir else None)
    selected = set(select_stages(recipe, only, start))
    forced = selected if force else set()
    preflight(recipe, [s for s in recipe.stages if s in selected], arms)
    layout = plan(recipe, rdir)
    check_run_dir(rdir, recipe, bool(run_dir), layout.units.values())
    if arms:
        unknown = [a for a in arms if a not in layout.arms]
        if unknown:
            raise UserError(f"--arm {unknown[0]}: no such arm; arms: {', '.join(layout.arms) or 'none'}")
    invocation = None
    with run_lock(rdir):  # RUN/.lock on the main process: a second `cai run` on RUN stops
        if dist.is_main():
            rdir.mkdir(parents=True, exist_ok=True)
            write_json(rdir / RECIPE_FILE, recipe.model_dump(mode="json", exclude_unset=True))
            invocation = invocation_of(update_run_info(rdir, run_info(recipe, layout)))
            run_token(rdir)
            for trash in [_trash_of(u.dir) for u in layout.units.values() if _trash_of(u.dir).is_dir()]:
                shutil.rmtree(trash, ignore_errors=True)  # what a kill during a reset left
        dist.barrier()
        token = dist.broadcast_object(run_token(rdir) if dist.is_main() else None)
        tracker = make_tracker(recipe, rdir)
        summary = Summary(layout, quiet=quiet)
        outputs: dict[str, str | None] = {}  # unit key -> output id of its complete manifest
        explicit = bool(only or start)
        try:
            for u in layout.units.values():
                _step(
                    layout, u, outputs, selected, forced, arms, tracker, summary, explicit, token, invocation
                )
        finally:
            if tracker is not None:
                tracker.finish()
        summary.finish()
    return rdir


def run_info(recipe: Recipe, layout: Layout) -> dict:
    """What this `cai run` runs with, for RUN/run.json (the report shows it): the recipe file and its hash, the
    `--set` items, the constitutions (of every arm) and their hashes, the seed, cai's version and commit, and
    the package versions."""
    src = recipe.source
    constitutions: dict[str, str] = {}
    for r in [recipe, *layout.arms.values()]:
        for path in (r.constitution, r.feedback_constitution):
            if path and Path(path).is_file():
                constitutions.setdefault(str(Path(path).resolve()), sha256_file(path))
    info = {
        "constitutions": constitutions,
        "seed": recipe.seed,
        "cai": code_version(),
        "packages": package_versions(),
        "started": time.strftime(TIME_FORMAT),
        "invocation": secrets.token_hex(6),  # this `cai run`'s id (in each manifest it writes)
    }
    seeds = {name: r.seed for name, r in layout.arms.items()}
    if len(set(seeds.values())) > 1:  # a seed sweep: each arm's own seed
        info["arm_seeds"] = seeds
    if src is not None and Path(src.path).is_file():  # a recipe rebuilt from RUN/recipe.json keeps the entry
        info["recipe"] = {
            "file": str(src.path.resolve()),
            "sha256": sha256_file(src.path),
            "set": list(src.overrides.values()),
        }
    return info


def invocation_of(info: dict) -> dict:
    """What a stage's manifest records of the `cai run` that made it (RUN/run.json holds only the latest one's):
    its id and start, the `--set` items, the seed and cai's commit."""
    cai = info.get("cai") or {}
    return {
        "id": info.get("invocation"),
        "started": info.get("started"),
        "set": (info.get("recipe") or {}).get("set") or [],
        "seed": info.get("seed"),
        "commit": cai.get("commit"),
        "modified": cai.get("modified"),
    }


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
    explicit: bool = False,
    token: str | None = None,
    invocation: dict | None = None,
) -> None:
    input_ids = {name: outputs.get(k) for name, k in unit.inputs.items()}
    fp, cfg = fingerprint(unit.recipe, unit.stage, input_ids)
    # rank 0's view: every rank takes the same decision
    old, files = dist.broadcast_object(
        (read_manifest(unit.dir), unit.dir.is_dir() and any(unit.dir.iterdir()))
    )
    complete = old is not None and old.get("status") == "complete"
    wanted = unit.stage in selected and (not arms or unit.arm is None or unit.arm in arms)
    if not wanted:
        outputs[unit.key] = old.get("output") if complete else None
        reads_stale = any(k in summary.stale for k in unit.inputs.values())  # a stage whose config changed
        if complete and (old.get("fingerprint") != fp or reads_stale):
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
    # with --arm, --force reruns those arms' own stages and the report; shared stages run when out of date
    force_this = unit.stage in forced and (not arms or unit.arm in arms or unit.stage == "report")
    if complete and old.get("fingerprint") == fp and not force_this:
        _say(f"{unit.key}: up to date, skipped ({unit.dir}){'; --force reruns it' if explicit else ''}")
        outputs[unit.key] = old.get("output")
        summary.add(unit, old, ran=False)
        return
    if complete:
        why = "rerun requested" if old.get("fingerprint") == fp else "config or inputs changed"
        _say(f"{unit.key}: {why}, rerunning")
    elif old is not None and old.get("fingerprint") != fp:
        _say(f"{unit.key}: partial output from a different config, starting clean")
    elif old is not None and force_this:
        _say(f"{unit.key}: --force: discarding the interrupted run's output, starting clean")
    elif old is not None:
        _say(f"{unit.key}: resuming an interrupted run (status '{old.get('status')}')")
    elif files:
        _say(f"{unit.key}: files without a manifest (not this pipeline's, or a killed reset), starting clean")
    resume = old is not None and not complete and old.get("fingerprint") == fp and not force_this
    if not resume:
        _reset_stage(unit.dir, layout.run_dir)
    ctx_inputs = {name: layout.units[k].dir for name, k in unit.inputs.items()}
    cache = shared_cache_dir(layout, unit, {d: input_ids.get(d) for d in inputs_of(unit.recipe, unit.stage)})
    manifest = _run_stage(
        unit,
        ctx_inputs,
        fp,
        cfg,
        input_ids,
        cache,
        tracker,
        resumed=resume,
        arms=list(layout.arms),
        token=token,
        earlier=_earlier_attempts(old, unit.dir) if resume and dist.is_main() else [],
        invocation=invocation,
    )
    outputs[unit.key] = manifest["output"]
    summary.add(unit, manifest, ran=True)


def _output_id(out_dir: Path, stage: str, fp: str) -> str:
    """The content hash of what the stage writes for later stages; a stage that declares no outputs (the
    report) gets its fingerprint."""
    names = STAGES[stage].outputs
    return hash_outputs(out_dir, names) if names else fp


def _trash_of(out_dir: Path) -> Path:
    """Where a stage folder goes while it is deleted (a hidden sibling)."""
    return out_dir.with_name(f".{out_dir.name}.trash")


def _reset_stage(out_dir: Path, run_dir: Path) -> None:
    """A stage that starts clean loses its old files at once: the folder is renamed aside (one atomic step: a
    kill leaves the old folder whole, manifest and all, or no folder), a fresh one made, and the old one
    deleted; a kill during the deletion leaves the trash, which the next run removes. Only a folder cai wrote
    (check_resettable: a manifest, or inside a cai run directory) is deleted."""
    check_resettable(out_dir, run_dir)
    if dist.is_main() and out_dir.is_dir():
        trash = _trash_of(out_dir)
        if trash.exists():
            shutil.rmtree(trash)
        out_dir.rename(trash)
        out_dir.mkdir()
        shutil.rmtree(trash, ignore_errors=True)
    dist.barrier()


def _earlier_attempts(old: dict | None, out_dir: Path) -> list[dict]:
    """The attempts of a stage before this one, from the manifest it resumes: one killed while its manifest
    said `running` lasted from its start to the newest file in its folder."""
    if old is None:
        return []
    keys = ("started", "seconds", "status", "peak_memory")
    attempts = [dict(a) for a in old.get("attempts") or [{k: old.get(k) for k in keys}]]
    last = attempts[-1]
    if last.get("status") == "running":
        last.update(status="killed", seconds=_killed_seconds(last.get("started"), out_dir))
    return attempts


def _killed_seconds(started: str | None, out_dir: Path) -> float | None:
    try:
        t0 = time.mktime(time.strptime(str(started), TIME_FORMAT))
    except ValueError:
        return None
    stamps = [p.stat().st_mtime for p in out_dir.rglob("*") if p.is_file()]
    return round(max(0.0, max(stamps, default=t0) - t0), 2)


def _end_attempt(manifest: dict, status: str, seconds: float, measured: dict | None = None) -> None:
    """Close this attempt (the manifest's last): its status, time and peak memory (`measured`, else this
    process's); and the manifest's: `seconds` is this attempt's, `seconds_total` every attempt's, `peak_memory` the
    highest."""
    attempts = manifest["attempts"]
    attempts[-1].update(status=status, seconds=seconds, peak_memory=measured or peak_memory())
    peak: dict = {}
    for p in [a["peak_memory"] for a in attempts if a.get("peak_memory")]:
        for k, v in p.items():
            if isinstance(v, (int, float)):
                peak[k] = max(peak.get(k, v), v)
            else:  # rss_since: 'process' when any attempt's is
                peak[k] = v if peak.get(k, v) == v else "process"
    total = round(sum(a["seconds"] for a in attempts if a.get("seconds") is not None), 2)
    manifest.update(status=status, seconds=seconds, seconds_total=total, peak_memory=peak or None)


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
    token: str | None = None,
    earlier: list[dict] | None = None,
    invocation: dict | None = None,
) -> dict:
    module = _load_stage(unit.stage)
    out_dir = unit.dir
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    started = time.strftime(TIME_FORMAT)
    manifest = {
        "stage": unit.stage,
        "arm": unit.arm,
        "status": "running",
        "fingerprint": fp,
        "config": cfg,
        "inputs": input_ids,
        "cache_dir": str(cache_dir) if cache_dir else None,
        "resumed": resumed,
        "run_token": token,
        "invocation": invocation and {**invocation, "seed": unit.recipe.seed},
        "world_size": dist.world_size(),
        "engine": dist.engine(),
        "versions": package_versions(),
        "started": started,
        "attempts": [*(earlier or []), {"started": started, "seconds": None, "status": "running"}],
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
        run_token=token,
    )
    _say(f"{unit.key}: running -> {out_dir}")
    t0 = time.time()
    reset_peak_memory()
    try:
        module.run(ctx)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        _end_attempt(manifest, status, round(time.time() - t0, 2))
        manifest["error"] = f"{type(exc).__name__}: {exc}"[:500]
        _write_manifest(out_dir, manifest)
        raise
    vllm_engine.release()  # a stage's vLLM engine must not hold memory while the next stage trains
    dist.release_stage_state()  # the next stage must not inherit this one's DeepSpeed settings
    seconds = round(time.time() - t0, 2)
    if stage_tracker is not None:
        stage_tracker.replay_if_silent(out_dir / "metrics.jsonl")
    _end_attempt(manifest, "complete", seconds, peak_memory(all_ranks=True))  # every rank is here
    manifest.update(
        ended=time.strftime(TIME_FORMAT),
        summary=ctx.summary,
        output=_output_id(out_dir, unit.stage, fp) if dist.is_main() else None,
    )
    manifest = dist.broadcast_object(manifest)  # one output id on every rank
    _write_manifest(out_dir, manifest)
    dist.barrier()
    _say(f"{unit.key}: done in {seconds:.1f}s")
    return manifest
