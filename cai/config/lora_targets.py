"""The module names of a model on this machine, without reading its weights: what preflight checks a LoRA
block's `target_modules` against (peft refused a name that matches no module only inside the stage)."""

from __future__ import annotations

import functools
from pathlib import Path

from cai.runtime.models import ALIASES, HUB_ID, alias_dir, hub_cached


def local_model_dir(ref: str) -> Path | None:
    """The folder of a model reference that is on this machine (an alias already built, a model folder, a hub
    model in the local cache), or None."""
    if ref in ALIASES:
        path = alias_dir(ref)
    elif Path(ref).expanduser().is_dir():
        path = Path(ref).expanduser()
    else:
        cached = hub_cached(ref) if HUB_ID.match(ref) else None
        path = Path(cached) if cached else None
    return path if path is not None and (path / "config.json").is_file() else None


@functools.lru_cache(maxsize=16)
def module_names(
    ref: str, head: str, trust_remote_code: bool
) -> tuple[list[str], list[str], list[str]] | None:
    """(every module name, the distinct last parts of its linear layers' names, the names of modules whose weight
    is tied to another's) of the model `ref` with `head` ('causal_lm' or 'seq_cls'), built from its config on
    the meta device; None when the model is not on this machine or its config does not build."""
    path = local_model_dir(ref)
    if path is None:
        return None
    try:
        from accelerate import init_empty_weights
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, num_labels=1)
        cls = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
        with init_empty_weights():
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - custom code, an unknown architecture: the stage's own load will say
        return None
    names = [n for n, _ in model.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    tied = []
    if head == "causal_lm" and getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        tied = [n for n, m in model.named_modules() if n and m in (out, inp)]
    return names, linear, tied


def unmatched(targets: list[str], names: list[str]) -> list[str]:
    """The target names that match no module as peft matches a list: the name itself or its last parts."""
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
