"""The SFT stage's training, its loss from one packed forward (cai.stages.sft.packed_loss) against TRL's own loss:
same model, examples and process, the order alternating between rounds.

    .venv/bin/python bench/sft_step.py                  # SmolLM2-135M-Instruct, 24 HH conversations, 3 rounds
    .venv/bin/python bench/sft_step.py --lora --rounds 5

The examples are the first `--examples` conversations of HH harmless-base dev (../shared/data): the conversation
up to the last assistant turn as the prompt, the chosen reply as the completion, as the SFT stage trains on
critique_revise's revisions. Each way trains a fresh copy of the model for one epoch with the quickstart's SFT
settings (batch 8, max_length 512, learning rate 5e-5; `--lora`: rank 16). TRL 1.16's loss scores every padded
position in vocabulary tiles and computes their entropy with its gradient's share; the packed loss runs each row
without padding, the rows' shared system prompt once, and the LM head at the completion's positions only.

Printed: the machine's rates, each way's seconds per round (`Trainer.train`, the whole epoch), the median and range
of the per-round ratios (TRL's over packed: above 1, packed is faster), and the checks that both ways trained
alike: the same mean loss and the largest weight difference after the epoch, relative to the largest weight.
The figures go into docs/benchmarks.md, section "SFT: the loss from a packed forward".
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rounds import compare_trainings, positive_int, print_machine  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
WAYS = ("TRL loss", "packed")


def examples(n: int) -> list[dict]:
    from cai.data.hh import hh_pair_rows

    rows, _ = hh_pair_rows(HH)
    return [
        {"prompt": r["messages"], "completion": [{"role": "assistant", "content": r["response_a"]}]}
        for r in rows[:n]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=positive_int, default=24)
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--lora", action="store_true", help="rank-16 LoRA instead of a full fine-tune")
    args = ap.parse_args()

    import torch

    from cai.config.blocks import SFTConfig
    from cai.config.fields import LoraConfig
    from cai.runtime.models import load_model, load_tokenizer
    from cai.runtime.settings import Settings
    from cai.stages import sft

    tok = load_tokenizer(args.model, padding_side="right")
    base = load_model(args.model)
    data = examples(args.examples)
    cfg = SFTConfig(
        epochs=1,
        batch_size=8,
        learning_rate=5e-5,
        max_length=512,
        save_steps=10_000,
        logging_steps=1,
        lora=LoraConfig() if args.lora else None,
    )
    own_packed_loss = sft.packed_loss

    def train(way: str, out: Path):
        """One epoch from a fresh copy of the model: (seconds, mean loss, trained weights)."""
        sft.packed_loss = own_packed_loss if way == "packed" else (lambda trainer: trainer)
        try:
            trainer = sft.build_trainer(cfg, Settings(), copy.deepcopy(base), tok, data, out)
        finally:
            sft.packed_loss = own_packed_loss
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
        return seconds, float(result.training_loss), weights

    print_machine(torch)
    lengths = [
        len(tok.apply_chat_template(e["prompt"] + e["completion"], return_dict=True)["input_ids"])
        for e in data
    ]
    print(
        f"{len(data)} examples, {sum(lengths)} tokens (longest {max(lengths)}), lora={args.lora}", flush=True
    )
    compare_trainings(WAYS, args.rounds, train)


if __name__ == "__main__":
    main()
