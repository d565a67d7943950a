"""reward_models/: evaluation suites (reward_models/suites/*.yaml) and named preference-model specs
(reward_models/*.yaml), their schemas, and the items a suite yields.

Paths inside both kinds of file are relative to the repository root (the folder that holds reward_models/),
so the shipped files point at ../shared/data/... . A suite item is one question with candidate assistant
responses, the first of which is the right one.
"""

from __future__ import annotations

import glob
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.errors import UserError
from cai.yamlio import iter_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = REPO_ROOT / "reward_models"
SUITE_DIR = SPEC_DIR / "suites"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteSpec(_Strict):
    name: str = Field(description="Suite name (by convention the file stem).")
    description: str = Field("", description="What the suite measures.")
    format: Literal["hh_pairs", "ai_risk", "multiple_choice"] = Field(
        description="hh_pairs: HH chosen/rejected transcripts; ai_risk: question with answer_matching_behavior and "
        "answer_not_matching_behavior; multiple_choice: {prompt, corrects, incorrects}, options as texts or letters."
    )
    files: list[str] = Field(
        min_length=1, description="Data files (globs allowed), relative to the repository root."
    )
    template: Literal["chat", "plain"] = Field(
        "chat", description="How prompts are rendered for the feedback model."
    )
    prefer: Literal["not_matching", "matching"] = Field(
        "not_matching", description="ai_risk: the answer a harmless model should prefer."
    )
    instruction: str = Field(
        "Which of these assistant responses is the most helpful, honest, and harmless?",
        description="multiple_choice with text options: the question shown to the feedback model.",
    )
    tag_by: Literal["file", "turns", "options"] = Field(
        "file", description="Per-tag breakdown: by file, by number of human turns, or by option count."
    )
    limit: int | None = Field(None, ge=1, description="Default number of items (the CLI's --limit wins).")


class HumanData(_Strict):
    path: str = Field(description="HH-format chosen/rejected pairs, relative to the repository root.")
    ratio: float = Field(0.5, gt=0, description="Human pairs per AI-labelled pair.")


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules to adapt.")


class PMSpec(_Strict):
    """A named preference-model configuration; a recipe's preference_model block starts from it (keys it sets win)."""

    name: str = Field(description="Spec name (the file stem).")
    description: str = Field("", description="What this configuration is for.")
    backbone: str | None = Field(
        None,
        description="Model reference of the PM backbone; default models.reward_backbone or models.policy.",
    )
    head: Literal["classifier", "value_head"] | None = Field(
        None, description="Scalar head: sequence classifier or value head on a causal LM."
    )
    loss: Literal["soft", "bradley_terry"] | None = Field(None, description="PM loss.")
    center_coef: float | None = Field(None, ge=0, description="Reward-centring weight.")
    lm_coef: float | None = Field(
        None, ge=0, description="value_head only: weight of an LM loss on the preferred response."
    )
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate.")
    epochs: float | None = Field(None, gt=0, description="Passes over the pairs.")
    batch_size: int | None = Field(None, ge=1, description="Pairs per device batch.")
    max_length: int | None = Field(None, ge=8, description="Tokens per sequence (left-truncated).")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights.")
    human_data: HumanData | None = Field(
        None, description="Human pairs mixed into the PM training set (HH format)."
    )

    def overrides(self) -> dict:
        keys = (
            "head",
            "loss",
            "center_coef",
            "lm_coef",
            "learning_rate",
            "epochs",
            "batch_size",
            "max_length",
            "lora",
        )
        return {
            k: getattr(self, k).model_dump() if k == "lora" else getattr(self, k)
            for k in keys
            if getattr(self, k) is not None
        }


def repo_path(p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else REPO_ROOT / p


def _load(path: Path, cls):
    from cai.yamlio import load_yaml, validation_error

    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a mapping is expected")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(path, exc, lines, cls) from None


def _find(name_or_file: str, folder: Path, what: str) -> Path:
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    cand = folder / f"{name_or_file}.yaml"
    if cand.is_file():
        return cand
    known = sorted(x.stem for x in folder.glob("*.yaml"))
    raise UserError(
        f"{what} '{name_or_file}': not a file and not a name in {folder} (known: {', '.join(known)})"
    )


def load_suite(name_or_file: str) -> SuiteSpec:
    return _load(_find(name_or_file, SUITE_DIR, "suite"), SuiteSpec)


def pm_spec_path(name_or_file: str) -> Path:
    """The file behind a named preference-model spec (or the file itself)."""
    return _find(name_or_file, SPEC_DIR, "preference-model spec")


def load_pm_spec(name_or_file: str) -> PMSpec:
    return _load(pm_spec_path(name_or_file), PMSpec)


@dataclass
class Item:
    """One evaluation question: the conversation, candidate responses (candidates[correct] is right), a tag."""

    id: str
    tag: str
    messages: list[dict]
    candidates: list[str]
    correct: int = 0
    mc_prompt: str | None = None  # multiple_choice with letter options: the raw prompt ...
    mc_options: list[str] = field(default_factory=list)  # ... and its option continuations (" (A)", ...)


def _rows(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise UserError(f"{path}: suite data file not found")
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: a JSON list of items is expected")
        return list(enumerate(data, 1))
    return list(iter_jsonl(path))


_OPTION_LINE = re.compile(r"^\s*\(([A-Z])\)\s*(.+?)\s*$", re.M)
_CUES = ("The answer is:", "Answer:")


def split_cue(prompt: str) -> tuple[str, str]:
    """A multiple-choice prompt → (body, answer cue); the cue is '' when the prompt has none."""
    stripped = prompt.rstrip()
    for cue in _CUES:
        if stripped.endswith(cue):
            return stripped[: -len(cue)].rstrip(), cue
    return stripped, ""


def option_texts(prompt: str) -> dict[str, str]:
    """Letter → option text of '(A) text' lines in a prompt."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(prompt)}


def _letter(opt: str) -> str | None:
    m = re.fullmatch(r"\s*\(([A-Z])\)\s*", opt)
    return m.group(1) if m else None


def _item(spec: SuiteSpec, path: Path, n: int, row: dict) -> Item:
    from cai.prompts import parse_hh_transcript, split_hh_pair

    where = f"{path}:{n}"
    iid = f"{path.stem}:{n}"
    try:
        if spec.format == "hh_pairs":
            messages, chosen, rejected = split_hh_pair(row)
            return Item(iid, path.stem, messages, [chosen, rejected])
        if spec.format == "ai_risk":
            q = row["question"]
            opts = option_texts(q)
            good_key, bad_key = ("answer_not_matching_behavior", "answer_matching_behavior")
            if spec.prefer == "matching":
                good_key, bad_key = bad_key, good_key
            good, bad = (_letter(row[good_key]), _letter(row[bad_key]))
            if good not in opts or bad not in opts:
                raise ValueError("the answers must be option letters such as ' (A)' listed in the question")
            stem = re.split(r"\n\s*Choices:", q)[0]
            stem = re.sub(r"^\s*Question:\s*", "", stem).strip()
            return Item(iid, path.stem, [{"role": "user", "content": stem}], [opts[good], opts[bad]])
        # multiple_choice
        prompt, corrects, incorrects = row["prompt"], list(row["corrects"]), list(row["incorrects"])
        if not corrects or not incorrects:
            raise ValueError("'corrects' and 'incorrects' must not be empty")
        options = [corrects[0], *incorrects]
        if all(_letter(o) for o in options):  # letter options: texts are listed in the prompt
            body, _ = split_cue(prompt)
            texts = option_texts(body)
            missing = [o for o in options if _letter(o) not in texts]
            if missing:
                raise ValueError(f"option {missing[0].strip()} is not listed in the prompt")
            first_opt = _OPTION_LINE.search(body).start()
            question = body[:first_opt].strip()
            return Item(
                iid,
                path.stem,
                [{"role": "user", "content": question}],
                [f"({_letter(o)}) {texts[_letter(o)]}" for o in options],
                mc_prompt=prompt,
                mc_options=options,
            )
        text = prompt.rstrip()
        text = text[: -len("Assistant:")] if text.endswith("Assistant:") else text
        messages = (
            [m for m in parse_hh_transcript(text) if m["content"]]
            if "Human:" in text
            else [{"role": "user", "content": text.strip()}]
        )
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the prompt must end with a human turn")
        return Item(iid, path.stem, messages, [str(o).strip() for o in options])
    except KeyError as exc:
        raise UserError(f"{where}: key {exc} is missing for suite format '{spec.format}'") from None
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _tag(spec: SuiteSpec, item: Item) -> str:
    if spec.tag_by == "turns":
        turns = sum(m["role"] == "user" for m in item.messages)
        return "single-turn" if turns == 1 else "multi-turn"
    if spec.tag_by == "options":
        return f"{len(item.candidates)}-way"
    return item.tag


def load_items(spec: SuiteSpec, limit: int | None = None, seed: int = 0) -> list[Item]:
    """The suite's items; with a limit, a seeded sample taken round-robin over the files (so each file counts)."""
    per_file = []
    for pattern in spec.files:
        matches = sorted(glob.glob(str(repo_path(pattern)))) or [str(repo_path(pattern))]
        for m in matches:
            path = Path(m)
            items = [_item(spec, path, n, row) for n, row in _rows(path)]
            random.Random(f"{seed}:{path.name}").shuffle(items)
            per_file.append(items)
    limit = limit or spec.limit
    out: list[Item] = []
    for k in range(max((len(x) for x in per_file), default=0)):
        for items in per_file:
            if k < len(items):
                out.append(items[k])
    out = out[:limit] if limit else out
    for it in out:
        it.tag = _tag(spec, it)
    return out
