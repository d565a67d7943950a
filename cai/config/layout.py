"""The run layout, pure: what each stage reads, where each stage of each arm lives, and the fingerprints that
decide what reruns.

`STAGES` is the one declaration of what a stage reads: recipe keys (dotted; 'settings' is device, dtype,
trust_remote_code and seed) and upstream stages; a stage whose keys depend on the recipe (the policy stage reads
`dpo` only for DPO, and the feedback and PM settings only with online rounds) adds them through `more`
(`reads_of`). A stage's fingerprint hashes exactly the values of those keys
(file references by content) and the output ids of those stages, and the stage gets a read-only view of exactly
those keys (cai.config.view): reading another key raises. Within the policy stage's blocks, the keys its
algorithm and number of rounds do not read (cai.config.policy.unread_settings) are in the view at their defaults,
so that an arm does not rerun for a setting only another arm reads.

With arms (`recipe.arms` / `recipe.sweep`), a stage whose configuration is the same in every arm and whose
every input is itself shared is shared, in RUN/<stage>; each arm's other stages go in RUN/arms/<arm>/<stage>.
The report is one, in RUN/report, over all arms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cai.config.arms import expand_arms
from cai.config.policy import unread_settings
from cai.config.recipe import LEGACY_STAGES, Recipe
from cai.config.recipe import STAGES as ORDER
from cai.config.view import RecipeView, view_of
from cai.errors import UserError
from cai.hashing import hash_json


@dataclass(frozen=True)
class StageSpec:
    """What a stage reads: recipe keys, upstream stages, and the keys that decide the work it may share between
    arms (with the upstream outputs it reads); and what it writes for later stages: the files and folders whose
    content is its output id (logs, checkpoints and plots are not part of it)."""

    reads: tuple[str, ...]
    inputs: tuple[str, ...]
    shared: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    more: Callable[[Recipe], tuple[str, ...]] | None = None  # keys read only in some configurations
    saves_models: bool = True  # False: settings.save_dtype is not its to read (nor in its fingerprint)
    unread: Callable[[Recipe], tuple[str, ...]] | None = None  # inputs not read in some configurations


# what an online round reads besides the policy stage's own blocks: the labeller and the PM's training settings
ONLINE_READS = ("models.feedback", "feedback_constitution", "generation", "feedback", "preference_model")


def _policy_reads(recipe: Recipe) -> tuple[str, ...]:
    p = recipe.policy
    return (("dpo",) if p.algorithm == "dpo" else ()) + (ONLINE_READS if p.rounds > 1 else ())


def _policy_unread(recipe: Recipe) -> tuple[str, ...]:
    """The PM only scores with `ppo.reward: pm` (PPO, RLOO, GRPO, and DPO's probes; online rounds need it); the
    feedback pairs are read by DPO and online rounds only."""
    p = recipe.policy
    pm = ("preference_model",) if recipe.ppo.reward != "pm" else ()
    return pm + (("feedback",) if p.algorithm != "dpo" and p.rounds == 1 else ())


STAGES: dict[str, StageSpec] = {
    "gold": StageSpec(("settings", "gold"), (), outputs=("model", "eval.json")),
    "critique_revise": StageSpec(
        ("settings", "models.policy", "constitution", "prompts", "generation", "critique_revise"),
        (),
        saves_models=False,
        outputs=("prompts.jsonl", "held_out.jsonl", "data.jsonl", "stats.json"),
    ),
    "sft": StageSpec(("settings", "models.policy", "sft"), ("critique_revise",), outputs=("model",)),
    "feedback": StageSpec(
        ("settings", "models.policy", "models.feedback", "feedback_constitution", "generation", "feedback"),
        ("critique_revise", "sft"),
        shared=(
            "settings",
            "models.policy",
            "feedback.policy",
            "feedback.responses_per_prompt",
            "feedback.generation",
            "generation",
        ),
        # the later stages read the pairs (the PM also the responses, for its reward normalisation); the report,
        # which reads check.json too, reads the feedback block
        outputs=("pairs.jsonl", "responses.jsonl"),
        saves_models=False,
        unread=lambda r: () if r.feedback.policy == "sft" else ("sft",),  # it samples from another model
    ),
    "preference_model": StageSpec(("settings", "preference_model"), ("feedback",), outputs=("model",)),
    "policy": StageSpec(
        ("settings", "policy", "ppo"),
        ("critique_revise", "sft", "feedback", "preference_model"),
        outputs=("policy",),
        more=_policy_reads,
        unread=_policy_unread,
    ),
    "report": StageSpec(
        (
            "settings",
            "name",
            "stages",
            "models.policy",
            "models.feedback",
            "models.judge",
            "generation",
            "feedback",
            "report",
        ),
        ("gold", "critique_revise", "sft", "feedback", "preference_model", "policy"),
        saves_models=False,
    ),
}


def reads_of(recipe: Recipe, stage: str) -> tuple[str, ...]:
    """The recipe keys `stage` reads in this recipe: its declared ones and those its configuration adds."""
    spec = STAGES[stage]
    return spec.reads + (spec.more(recipe) if spec.more else ())


def inputs_of(recipe: Recipe, stage: str) -> tuple[str, ...]:
    """The upstream stages `stage` reads in this recipe: its declared ones less those its configuration leaves
    unread, so that a new output of an unread stage does not rerun it."""
    spec = STAGES[stage]
    unread = spec.unread(recipe) if spec.unread else ()
    return tuple(d for d in spec.inputs if d not in unread)


def active(recipe: Recipe, stage: str) -> bool:
    """Whether a stage the recipe lists runs: the optional gold judge only with `gold.enabled`."""
    return stage != "gold" or recipe.gold.enabled


def stage_view(recipe: Recipe, stage: str) -> RecipeView:
    """The read-only view of the recipe that `stage` gets: its declared keys only, those its configuration does
    not read at their defaults (the policy stage: cai.config.policy.unread_settings). The policy stage's
    `settings.seed` is policy.seed when that is set."""
    unread = unread_settings(recipe.policy, recipe.ppo) if stage == "policy" else ()
    if stage == "policy" and recipe.policy.seed is not None:
        recipe = recipe.model_copy(update={"seed": recipe.policy.seed})
    return view_of(recipe, reads_of(recipe, stage), stage, STAGES[stage].saves_models, unread)


def stage_config(recipe: Recipe, stage: str) -> dict:
    """What a stage's fingerprint hashes of the recipe: its declared keys, file references by content."""
    return stage_view(recipe, stage).fingerprint_dict()


def fingerprint(recipe: Recipe, stage: str, input_ids: dict[str, str | None]) -> tuple[str, dict]:
    cfg = stage_config(recipe, stage)
    return hash_json({"config": cfg, "inputs": input_ids}), cfg


def run_dir_of(recipe: Recipe, override: str | None = None) -> Path:
    """The run directory (--run-dir, else the recipe's run_dir, else runs/<name>); an error when it, or a folder
    above it, is a file."""
    rdir = Path(override or recipe.run_dir or Path("runs") / recipe.name)
    for p in (rdir, *rdir.parents):
        if p.exists() and not p.is_dir():
            where = "--run-dir" if override else "run_dir" if recipe.run_dir else "the run directory"
            raise UserError(f"{where} {rdir}: {p} is a file, not a directory")
    return rdir


def select_stages(recipe: Recipe, only: list[str] | None, start: str | None) -> list[str]:
    """The stages `--only` and `--from` select, in pipeline order; a selection that names an unknown stage, a
    stage the recipe does not run, or `--only` stages before `--from` (nothing would run) is an error. A former
    stage name ('ppo') selects the stage it became."""
    only = [LEGACY_STAGES.get(s, s) for s in only] if only else only
    start = LEGACY_STAGES.get(start, start) if start else start
    for flag, s in [("--only", s) for s in only or []] + ([("--from", start)] if start else []):
        if s not in ORDER:
            raise UserError(f"{flag} {s}: unknown stage '{s}'; stages: {', '.join(ORDER)}")
        if s not in recipe.stages:
            raise UserError(
                f"{flag} {s}: stage '{s}' is not in this recipe's stages ({', '.join(recipe.stages)})"
            )
    for flag, s in [("--only", s) for s in only or []] + ([("--from", start)] if start else []):
        if not active(recipe, s):
            raise UserError(f"{flag} {s}: the stage is off; set {s}.enabled: true")
    stages = [s for s in ORDER if s in recipe.stages and active(recipe, s)]
    if start:
        before = [s for s in only or [] if ORDER.index(s) < ORDER.index(start)]
        if before:
            raise UserError(
                f"--only {before[0]} and --from {start} contradict each other: {before[0]} comes before {start}, "
                "so nothing would run; give one of them"
            )
        stages = stages[stages.index(start) :]
    if only:
        stages = [s for s in stages if s in only]
    return stages


@dataclass
class Unit:
    """One stage in one folder: shared (arm None) or one arm's own."""

    key: str  # "sft" or "arms/<arm>/policy": its folder relative to the run directory
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

    def run_index(self) -> dict[str | None, dict[str, Path]]:
        """{arm (None without arms): {stage: folder}} for every stage but the report."""
        return {
            arm: {s: self.units[k].dir for s, k in m.items() if s != "report"}
            for arm, m in self.where.items()
        }


def plan(recipe: Recipe, run_dir: str | Path) -> Layout:
    """Where every stage of every arm lives, and what it reads."""
    rdir = Path(run_dir)
    body = [s for s in ORDER if s in recipe.stages and s != "report" and active(recipe, s)]
    arms = expand_arms(recipe)
    # arms share a stage whose config is the same in all arms and whose every input is itself shared (so a
    # feedback stage that samples the base model is shared by a sweep over SFT settings)
    shared_stages: set[str] = set()
    for s in body:
        same = len({hash_json(stage_config(a, s)) for _, a in arms}) <= 1
        if same and all(d in shared_stages for _, a in arms for d in inputs_of(a, s) if d in body):
            shared_stages.add(s)
    units: dict[str, Unit] = {}
    where: dict[str | None, dict[str, str]] = {}
    for name, arm in arms or [(None, recipe)]:
        m: dict[str, str] = {}
        for s in body:
            reads = {d: m[d] for d in inputs_of(arm, s) if d in m}
            if name is not None and s not in shared_stages:
                key = f"arms/{name}/{s}"
                units[key] = Unit(key, s, rdir / key, arm, name, reads, [name])
            else:
                key = s
                units.setdefault(key, Unit(key, s, rdir / s, arm, None, reads))
                if name is not None:
                    units[key].users.append(name)
            m[s] = key
        where[name] = m
    shared = sorted((u for u in units.values() if u.arm is None), key=lambda u: ORDER.index(u.stage))
    ordered = {u.key: u for u in shared} | {k: u for k, u in units.items() if u.arm is not None}
    if "report" in recipe.stages:
        if arms:
            inputs = {k: k for k in ordered}
        else:
            inputs = {d: d for d in STAGES["report"].inputs if d in ordered}
        ordered["report"] = Unit(
            "report", "report", rdir / "report", recipe, None, inputs, [n for n, _ in arms]
        )
        for m in where.values():
            m["report"] = "report"
    return Layout(rdir, recipe, dict(arms), ordered, where)


def shared_cache_dir(layout: Layout, unit: Unit, input_ids: dict[str, str | None]) -> Path | None:
    """For arms: a folder keyed by what decides the shared work (e.g. sampled responses), else None."""
    keys = STAGES[unit.stage].shared
    if not layout.arms or not keys:
        return None
    view = view_of(unit.recipe, keys, unit.stage, STAGES[unit.stage].saves_models)
    key = hash_json({"config": view.fingerprint_dict(), "inputs": input_ids})
    return layout.run_dir / "shared" / f"{unit.stage}-{key}"
