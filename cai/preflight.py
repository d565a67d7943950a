"""Preflight: every file and model a recipe names, checked before any stage runs (`cai run`) and by
`cai recipe validate`, so a typo in `models.feedback` fails in a second, not after an hour of SL-CAI.

For each stage to run (in every arm), the recipe keys it reads (cai.config.layout.STAGES) are walked, with
their fallbacks resolved the way the stage sees them (cai.config.view), and every value the schema marks as a
reference (FileRef, ModelRef, NamedRef in cai.config.recipe) is checked: a file exists; a constitution loads;
a model is an alias whose source is there, a model folder, a .gguf file, or a hub id `org/name` that is in the
local cache or on a reachable hub (cai.runtime.models.model_problem); an evaluation suite loads and its data
files are there; a preference-model spec loads; no reference is empty, and a file is not a folder (a `dataset`
prompt source's may be); the first row of a file of HH pairs and of an hh or jsonl prompt source reads as its
stage reads it; a LoRA block's `target_modules` name modules of its model. Each problem is one line naming the
recipe file and line (or the `--set` item, or the arm) and the key.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from cai.config.arms import expand_arms
from cai.config.fields import POLICY_WORDS
from cai.config.layout import active, reads_of
from cai.config.load import field_at, ref_kind
from cai.config.lora_targets import module_names, unmatched
from cai.config.recipe import Recipe
from cai.config.view import source_key, value_of
from cai.constitution.schema import load_constitution
from cai.data.hh import check_pair_file
from cai.data.sources import load_source
from cai.errors import UserError
from cai.eval.suites import load_suite
from cai.rl.rewards import load_function
from cai.runtime import vllm_engine
from cai.runtime.models import model_problem
from cai.runtime.runlog import tracker_problem

NOT_REFS = {"settings", "name", "stages"}
REQUIRED = {"constitution", "feedback_constitution"}  # files a stage that reads them cannot do without
# "pairs": a file of HH pairs (PAIR_FILES); "prompts": an hh or jsonl prompt source's file
EXPECTED = {"file": "a file", "path": "a file or folder", "model": "a model reference", "suite": "a suite"}
EXPECTED |= {"pairs": "a file", "prompts": "a file"}
PAIR_FILES = {  # the keys that name a file of HH preference pairs (chosen/rejected transcripts)
    ("feedback", "check_set", "path"),
    ("feedback", "human_mix", "path"),
    ("preference_model", "human_data", "path"),
    ("gold", "data"),
}


def refs_of(value, info, loc: tuple) -> Iterator[tuple[tuple, str, str]]:
    """(location, kind, value) of every reference inside a value of the recipe (a block, a list, a string)."""
    if isinstance(value, BaseModel):
        for name, finfo in type(value).model_fields.items():
            yield from refs_of(getattr(value, name), finfo, loc + (name,))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from refs_of(item, info, loc + (i,))
    elif isinstance(value, str) and info is not None:  # '' too: `problem` calls it empty
        kind = ref_kind(info)
        if kind == "policy":  # 'sft'/'base' are the run's own models; anything else a model reference
            kind = None if value in POLICY_WORDS else "model"
        if kind:
            yield loc, kind, value


def _get(recipe, loc: tuple):
    node = recipe
    for part in loc:
        try:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return node


def stage_refs(recipe: Recipe, stage: str) -> Iterator[tuple[tuple, str, str | None, str]]:
    """(location of the key that sets it, kind, value, what) of every reference stage `stage` reads; a value
    that comes from a preference-model spec is located at `preference_model.spec`."""
    for key in reads_of(recipe, stage):
        if key in NOT_REFS:
            continue
        if key == "preference_model":
            yield from _pm_refs(recipe)
            continue
        src = source_key(recipe, key)
        loc = tuple(src.split("."))
        value = value_of(recipe, key)
        if src in REQUIRED:
            yield loc, "constitution", value, ""
            continue
        for where, kind, v in refs_of(value, field_at(src), loc):
            if where[:2] == ("report", "suites"):
                kind = "suite"
            elif kind == "file":
                kind = _file_kind(recipe, where)
            yield where, kind, v, ""


def _file_kind(recipe: Recipe, loc: tuple) -> str:
    """'path' for a `dataset` prompt source's local path (it may be a dataset saved to disk, a folder), 'prompts'
    for an hh or jsonl source's file, 'pairs' for a file of HH pairs, else 'file'."""
    if loc in PAIR_FILES:
        return "pairs"
    source_type = getattr(_get(recipe, loc[:-1]), "type", None) if loc[:2] == ("prompts", "sources") else None
    return {"dataset": "path", "hh": "prompts", "jsonl": "prompts"}.get(source_type, "file")


def _pm_refs(recipe: Recipe) -> Iterator[tuple[tuple, str, str | None, str]]:
    own = recipe.preference_model
    try:
        pm = value_of(recipe, "preference_model")
    except UserError as exc:
        yield ("preference_model", "spec"), "error", str(exc), ""
        return
    for loc, kind, v in refs_of(pm, None, ("preference_model",)):
        if loc == ("preference_model", "spec"):
            continue  # it loaded
        kind = "pairs" if kind == "file" and loc in PAIR_FILES else kind
        if _get(own, loc[1:]) == v:
            yield loc, kind, v, ""
        elif loc == ("preference_model", "backbone") and v == value_of(recipe, "models.reward_backbone"):
            yield tuple(source_key(recipe, "models.reward_backbone").split(".")), kind, v, ""
        else:
            yield (
                ("preference_model", "spec"),
                kind,
                v,
                f"{'.'.join(map(str, loc[1:]))} of spec '{own.spec}': ",
            )


def problem(
    kind: str, value: str | None, stage: str, block=None, trust_remote_code: bool = False
) -> str | None:
    """What is wrong with one reference, or None; `block` is the recipe block that holds it (a prompt source)."""
    if kind == "error":
        return value
    if kind == "constitution":
        if not value:
            return f"not set; stage '{stage}' needs a constitution file here"
        if not Path(value).is_file():
            return f"file not found: {value}"
        try:
            load_constitution(value)
        except UserError as exc:
            return f"the constitution does not load: {exc}"
        return None
    if kind in EXPECTED and not value:
        return f"empty; {EXPECTED[kind]} is expected"
    if kind in ("file", "pairs", "prompts") and Path(value).is_dir():
        return f"a folder, where a file is expected: {value}"
    if kind in ("file", "path", "pairs", "prompts") and not Path(value).exists():
        return f"file not found: {value}"
    if kind in ("pairs", "prompts"):  # its first row, read as the stage reads it
        try:
            if kind == "pairs":
                check_pair_file(value)
            else:
                load_source(block, head=True)
        except UserError as exc:
            return str(exc)
        return None
    if kind == "model":
        p = model_problem(value, trust_remote_code)
        return f"model '{value}': {p}" if p else None
    if kind == "suite":
        try:
            spec = load_suite(value)
        except UserError as exc:
            return str(exc)
        missing = [f for f in spec.files if not glob.glob(f)]
        return (
            f"suite '{value}': data file not found: {missing[0]} (put it there, or remove the suite)"
            if missing
            else None
        )
    return None


def check(recipe: Recipe, stages: list[str] | None = None, arms: list[str] | None = None) -> list[str]:
    """One line per problem with the references that `stages` (default: the recipe's) read, in the recipe
    and in each of its arms (`arms`: only these)."""
    lines, seen = [], set()
    # with arms, the stages run in each arm's recipe (the report in the recipe's own)
    variants = [(n, r) for n, r in expand_arms(recipe) if not arms or n in arms] or [(None, recipe)]
    chosen = stages if stages is not None else [s for s in recipe.stages if active(recipe, s)]
    for stage in chosen:
        for arm, variant in variants if stage != "report" else [(None, recipe)]:
            for loc, kind, value, what in stage_refs(variant, stage):
                own = arm if arm and _get(recipe, loc) != _get(variant, loc) else None
                here = _locate(recipe, loc, own)
                key = "".join(
                    f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc)
                )
                if (here, key, value) in seen:
                    continue
                seen.add((here, key, value))
                p = problem(kind, value, stage, _get(variant, loc[:-1]), variant.trust_remote_code)
                if p:
                    lines.append(f"{here}: {f'arm {own!r}: ' if own else ''}key '{key}': {what}{p}")
    lines += vllm_problems(recipe, chosen) + adapter_only_problems(variants, recipe, chosen)
    lines += lora_problems(variants, recipe, chosen)
    if tracker_problem(recipe.tracker):  # `cai run` refused it after writing the run folder
        lines.append(
            f"{_locate(recipe, ('tracker',), None)}: key 'tracker': {tracker_problem(recipe.tracker)}"
        )
    return lines + list(dict.fromkeys(policy_problems(variants, recipe, chosen)))


def needed_stages(recipe: Recipe, stage: str) -> dict[str, str]:
    """{upstream stage: why} of what `stage` reads in this recipe's configuration."""
    if stage == "sft":
        return {"critique_revise": "its data"}
    if stage == "feedback":
        return {"critique_revise": "its prompts"} | (
            {"sft": "feedback.policy: sft samples from it"} if recipe.feedback.policy == "sft" else {}
        )
    if stage == "preference_model":
        return {"feedback": "its labelled pairs"}
    if stage == "policy":
        need = {"critique_revise": "its prompts", "sft": "the policy to start from"}
        if recipe.ppo.reward == "pm":
            need["preference_model"] = "ppo.reward: pm"
        if recipe.policy.algorithm == "dpo" or recipe.policy.rounds > 1:
            need["feedback"] = "its pairs (dpo, online rounds)"
        return need
    return {}


def policy_problems(variants, recipe: Recipe, stages: list[str]) -> Iterator[str]:
    """What would stop a stage only after the stages before it ran: an upstream stage the recipe leaves out of
    `stages`, a reward function that does not import, online rounds without a PM reward, an RLOO or GRPO batch
    that does not hold whole groups."""
    for arm, variant in variants:
        tag = f"arm {arm!r}: " if arm else ""
        for stage in (s for s in stages if s != "report"):
            for need, why in needed_stages(variant, stage).items():
                if need not in recipe.stages:
                    yield (
                        f"{_locate(recipe, ('stages',), None)}: key 'stages': {tag}stage '{stage}' needs "
                        f"'{need}' ({why}), which the stages leave out"
                    )
        if "policy" not in stages:
            continue
        k, rows = variant.policy.samples_per_prompt, variant.ppo.rollout_batch_size
        if variant.policy.algorithm in ("rloo", "grpo") and rows % k:
            yield (
                f"{_locate(recipe, ('ppo', 'rollout_batch_size'), None)}: {tag}key 'ppo.rollout_batch_size': "
                f"{rows} is not a multiple of policy.samples_per_prompt ({k}); an update samples k responses "
                "to each of its prompts"
            )
        own = arm if arm and variant.ppo.reward != recipe.ppo.reward else None
        if variant.ppo.reward != "pm":
            try:  # imports the recipe's module, as the run would
                load_function(variant.ppo.reward)
            except UserError as exc:
                msg = str(exc).removeprefix("ppo.reward: ")
                yield f"{_locate(recipe, ('ppo', 'reward'), own)}: {tag}key 'ppo.reward': {msg}"
            if variant.policy.rounds > 1:
                yield (
                    f"{_locate(recipe, ('policy', 'rounds'), None)}: {tag}key 'policy.rounds': online rounds "
                    "train the PM further each round; they need ppo.reward: pm"
                )


def adapter_only_problems(variants, recipe: Recipe, stages: list[str]) -> list[str]:
    """A line when `sft.merge_lora: false` (an adapter-only SFT folder) meets a stage that loads the SFT model
    as a whole model: the policy stage refused it only after the stages before it had run, and the report left
    the SL-CAI model out."""
    readers = [s for s in ("policy", "report") if s in stages]
    for arm, variant in variants:
        if readers and variant.sft.lora is not None and not variant.sft.merge_lora:
            own = arm if arm and variant.sft.merge_lora != recipe.sft.merge_lora else None
            return [
                f"{_locate(recipe, ('sft', 'merge_lora'), own)}: {f'arm {own!r}: ' if own else ''}key "
                f"'sft.merge_lora': false writes an adapter-only SFT folder, which {' and '.join(readers)} "
                "load as a whole model; keep it true (the default), or run the sft stage alone"
            ]
    return []


def lora_problems(variants, recipe: Recipe, stages: list[str]) -> list[str]:
    """A line for each LoRA `target_modules` name that matches no module of the model it adapts (peft refused
    it only inside the stage, after the stages before it had run). Only a model already on this machine is
    checked, built on the meta device from its config (no weights are read)."""
    lines = []
    for arm, variant in variants:
        for loc, lora, ref, head in _lora_uses(variant, stages):
            if lora is None or not isinstance(lora.target_modules, list) or not isinstance(ref, str):
                continue
            modules = module_names(ref, head, variant.trust_remote_code)
            if modules is None:
                continue
            names, linear, tied = modules
            own = arm if arm and _get(recipe, loc) != _get(variant, loc) else None
            where = f"{_locate(recipe, loc, own)}: {f'arm {own!r}: ' if own else ''}key '{'.'.join(loc)}'"
            for target in unmatched(lora.target_modules, names):
                lines.append(
                    f"{where}: '{target}' matches no module of model '{ref}' (its linear layers: {', '.join(linear)})"
                )
            for target in [t for t in lora.target_modules if not unmatched([t], tied)]:
                lines.append(
                    f"{where}: '{target}' is tied to the input embedding in model '{ref}': merging its adapter "
                    "(when the model is saved, and when weights go to vLLM) would change the embedding too; leave "
                    "it out"
                )
    return list(dict.fromkeys(lines))


def _lora_uses(recipe: Recipe, stages: list[str]) -> Iterator[tuple[tuple, object, object, str]]:
    """(location of target_modules, LoRA block, model reference, head) of each stage to run that adapts a model
    with LoRA; the policy stage adapts the SFT model, which has the modules of models.policy."""
    if "sft" in stages:
        yield ("sft", "lora", "target_modules"), recipe.sft.lora, recipe.models.policy, "causal_lm"
    if "policy" in stages:
        block = "dpo" if recipe.policy.algorithm == "dpo" else "ppo"
        lora = getattr(recipe, block).lora
        yield (block, "lora", "target_modules"), lora, recipe.models.policy, "causal_lm"
    for stage in ("preference_model", "gold"):
        if stage not in stages:
            continue
        try:
            cfg = value_of(recipe, stage)  # with the spec merged, the backbone resolved
        except UserError:
            continue  # reported as the spec's problem
        own = getattr(recipe, stage).lora is not None or stage == "gold"
        loc = (stage, "lora", "target_modules") if own else (stage, "spec")
        yield loc, cfg.lora, cfg.backbone, "seq_cls" if cfg.head == "classifier" else "causal_lm"


def vllm_problems(recipe: Recipe, stages: list[str]) -> list[str]:
    """A line for each key that asks a stage to run on vLLM when vLLM is not installed, naming the extra, and
    for each .gguf model such a stage would start vLLM on (vLLM starts from the file's folder, which may hold
    another model)."""
    asked, models = [], []
    online = recipe.policy.rounds > 1 and "policy" in stages  # later rounds sample as the feedback stage does
    overrides = {"critique_revise": recipe.critique_revise.generation, "feedback": recipe.feedback.generation}
    for stage in ("critique_revise", "feedback", "report"):
        if stage not in stages and not (stage == "feedback" and online):
            continue
        own = getattr(overrides.get(stage), "backend", None)  # the stage's own choice, or None: the recipe's
        if (own or recipe.generation.backend) == "vllm":
            asked.append((stage, "generation", "backend") if own else ("generation", "backend"))
            models += _vllm_models(recipe, stage)
    on_policy = recipe.policy.algorithm != "dpo"
    if recipe.ppo.rollout_backend == "vllm" and on_policy and "policy" in stages:
        asked.append(("ppo", "rollout_backend"))  # its engine starts from the policy's config, not a file
    lines = [
        f"{_locate(recipe, loc, None)}: key '{'.'.join(loc)}': vLLM is not installed; install the extra: "
        f"{vllm_engine.EXTRA}"
        for loc in dict.fromkeys(asked)
        if not vllm_engine.available()
    ]
    for key in dict.fromkeys(models):
        src, value = source_key(recipe, key), value_of(recipe, key)
        if isinstance(value, str) and Path(value).suffix == ".gguf":
            where = _locate(recipe, tuple(src.split(".")), None)
            lines.append(f"{where}: key '{src}': {vllm_engine.gguf_refusal(value)}")
    return lines


def _vllm_models(recipe: Recipe, stage: str) -> list[str]:
    """The keys of the models a stage on vLLM starts its engine on (the SFT output is a folder)."""
    if stage != "feedback":
        return ["models.policy"]  # critique_revise samples from it; the report samples the initial model
    which = recipe.feedback.policy
    keys = [] if which == "sft" else ["models.policy" if which == "base" else "feedback.policy"]
    cot = ["models.feedback"] if recipe.feedback.chain_of_thought else []  # the labeller's reasoning
    return keys + cot


def _locate(recipe: Recipe, loc: tuple, arm: str | None) -> str:
    """file:line of the key (an arm's own override when the arm changed it), or the --set item."""
    src = recipe.source
    if src is None:
        return "recipe"
    if arm is not None:
        key = ".".join(str(p) for p in loc if not isinstance(p, int))
        for i, a in enumerate(recipe.arms or []):
            for k in a.set:
                if arm.startswith(a.name) and (key == k or key.startswith(k + ".")):
                    return src.locate(("arms", i, "set", k))
        for k in recipe.sweep or {}:
            if key == k or key.startswith(k + "."):
                return src.locate(("sweep", k))
    return src.locate(loc)


def preflight(recipe: Recipe, stages: list[str] | None = None, arms: list[str] | None = None) -> None:
    """A UserError listing every problem (one per line), before anything runs."""
    lines = check(recipe, stages, arms)
    if lines:
        raise UserError("\nerror: ".join(lines))
