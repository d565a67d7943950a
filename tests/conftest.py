"""Shared fixtures: the tiny in-process model, recipes in temporary run directories, and ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: tests read the shared data beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny random Llama, built once per machine into the model cache."""
    from cai.models import prepare

    return prepare("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny model; tests must not modify the model in place."""
    from cai.models import load_model, load_tokenizer

    return load_model("tiny-random-llama"), load_tokenizer("tiny-random-llama")


@pytest.fixture
def tiny_recipe(tmp_path, tiny_dir):
    """Build a Recipe from recipes/tiny.yaml with run_dir in tmp_path; pass `--set`-style overrides."""
    from cai.config import load_recipe

    def make(*overrides: str, recipe: str = "recipes/tiny.yaml"):
        return load_recipe(ROOT / recipe, [f"run_dir={tmp_path / 'run'}", *overrides])

    old = Path.cwd()
    os.chdir(ROOT)  # recipes name constitutions relative to the repository root
    yield make
    os.chdir(old)
