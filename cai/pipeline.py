"""`cai run`: runs a recipe's stages in order in a run directory, skipping stages whose manifest matches.

Each stage's fingerprint hashes the recipe keys it reads (file-valued keys by content) and the
fingerprints of the stages it reads. A stage reruns when its fingerprint changes, and so does
everything downstream, because their input fingerprints change with it.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from cai.config import STAGES, Recipe
from cai.errors import UserError
from cai.rundir import StageContext, hash_json, package_versions, read_manifest, sha256_file, write_json

COMMON = ["seed", "device", "dtype", "trust_remote_code"]
# recipe keys each stage reads, and the stages whose outputs it reads
DEPENDS: dict[str, tuple[list[str], list[str]]] = {
    "critique_revise": (COMMON + ["models.policy", "constitution", "prompts", "generation", "critique_revise"], []),
    "sft": (COMMON + ["models.policy", "sft"], ["critique_revise"]),
    "feedback": (
        COMMON + ["models.policy", "models.feedback", "constitution", "feedback_constitution", "generation", "feedback"],
        ["critique_revise", "sft"],
    ),
    "preference_model": (COMMON + ["models.policy", "models.reward_backbone", "preference_model"], ["feedback"]),
    "ppo": (COMMON + ["ppo"], ["critique_revise", "sft", "preference_model"]),
    "report": (COMMON + ["models", "report"], ["critique_revise", "sft", "feedback", "preference_model", "ppo"]),
}
FILE_KEYS = {"constitution", "feedback_constitution"}


def _get(recipe: Recipe, dotted: str):
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def stage_config(recipe: Recipe, stage: str) -> dict:
    """The slice of the recipe a stage reads, with file-valued keys replaced by their content hash."""
    keys, _ = DEPENDS[stage]
    view = {}
    for key in keys:
        value = _get(recipe, key)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if key in FILE_KEYS and value:
            p = Path(value)
            value = {"path": value, "sha256": sha256_file(p) if p.is_file() else None}
        view[key] = value
    return view


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


def fingerprint(recipe: Recipe, stage: str, input_fps: dict[str, str]) -> tuple[str, dict]:
    cfg = stage_config(recipe, stage)
    return hash_json({"config": cfg, "inputs": input_fps}), cfg


def run(recipe: Recipe, run_dir: str | Path | None = None, only: list[str] | None = None, start: str | None = None,
        force: list[str] | None = None) -> Path:
    """Run the selected stages; return the run directory. Stages named in `force` (and --from/--only) rerun."""
    rdir = run_dir_of(recipe, str(run_dir) if run_dir else None)
    rdir.mkdir(parents=True, exist_ok=True)
    selected = select_stages(recipe, only, start)
    forced = set(force or []) | (set(only) if only else set()) | ({start} if start else set())
    rerun_downstream = False
    timings = {}
    for stage in [s for s in STAGES if s in recipe.stages]:
        _, reads = DEPENDS[stage]
        inputs = {s: rdir / s for s in reads if (rdir / s / "manifest.json").is_file()}
        input_fps = {s: (read_manifest(d) or {}).get("fingerprint") for s, d in inputs.items()}
        fp, cfg = fingerprint(recipe, stage, input_fps)
        out_dir = rdir / stage
        old = read_manifest(out_dir)
        up_to_date = old is not None and old.get("status") == "complete" and old.get("fingerprint") == fp
        if stage not in selected:
            continue
        if up_to_date and stage not in forced and not rerun_downstream:
            print(f"[cai] {stage}: up to date, skipped ({out_dir})", flush=True)
            continue
        if old is not None and old.get("fingerprint") != fp and old.get("status") == "complete":
            print(f"[cai] {stage}: config or inputs changed, rerunning", flush=True)
            _reset_stage(out_dir)
        rerun_downstream = True
        timings[stage] = _run_stage(recipe, stage, out_dir, inputs, fp, cfg, input_fps)
    return rdir


def _reset_stage(out_dir: Path) -> None:
    """A stage whose inputs changed starts clean: stale partial outputs would otherwise be resumed."""
    import shutil

    for child in out_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _run_stage(recipe: Recipe, stage: str, out_dir: Path, inputs: dict, fp: str, cfg: dict, input_fps: dict) -> float:
    module = _load_stage(stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = read_manifest(out_dir)
    if old is not None and old.get("fingerprint") != fp:
        _reset_stage(out_dir)
    manifest = {
        "stage": stage,
        "status": "running",
        "fingerprint": fp,
        "config": cfg,
        "inputs": input_fps,
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(out_dir / "manifest.json", manifest)
    ctx = StageContext(recipe=recipe, stage=stage, out_dir=out_dir, inputs=inputs)
    print(f"[cai] {stage}: running -> {out_dir}", flush=True)
    t0 = time.time()
    try:
        module.run(ctx)
    except BaseException as exc:
        manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500], seconds=round(time.time() - t0, 2))
        write_json(out_dir / "manifest.json", manifest)
        raise
    seconds = round(time.time() - t0, 2)
    manifest.update(status="complete", ended=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=seconds, summary=ctx.summary)
    write_json(out_dir / "manifest.json", manifest)
    print(f"[cai] {stage}: done in {seconds:.1f}s", flush=True)
    return seconds
