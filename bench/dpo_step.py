"""The DPO stage's training, its sequence log-probs from one packed forward per model (cai.rl.dpo, `PACKED`)
against TRL's padded forward: same model, pairs and process, the order alternating between rounds.

    .venv/bin/python bench/dpo_step.py                  # SmolLM2-135M-Instruct, 24 HH pairs, LoRA, 3 rounds
    .venv/bin/python bench/dpo_step.py --full --rounds 5

The pairs are the first `--pairs` of HH harmless-base dev (../shared/data): the conversation up to the last
assistant turn as the prompt, the chosen and rejected replies, label 1. Each way trains a fresh copy of the model
for one epoch with the DPO settings of recipes/compare-algorithms.yaml (batch 4 pairs, max_length 384, β 0.1,
learning rate 5e-5, rank-16 LoRA whose reference is the adapters off; `--full`: a full fine-tune against a frozen
copy). TRL 1.16 runs the chosen and the rejected rows padded, the prompt twice, and scores every padded position
in vocabulary tiles; packed, each pair's prompt runs once, padding not at all, and the LM head at the completions'
positions only, for the policy and for the reference.

Printed (bench/rounds.py, `compare_trainings`): the machine's rates, each way's seconds per round of
`Trainer.train`, the per-round ratios, and the two ways' mean losses and weights after the epoch. The figures go
into docs/benchmarks.md, section "DPO: sequence log-probs from a packed forward".
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
WAYS = ("TRL padded", "packed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=positive_int, default=24)
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--full", action="store_true", help="a full fine-tune against a frozen copy, not LoRA")
    args = ap.parse_args()

    import torch

    from cai.config.fields import LoraConfig
    from cai.config.policy import DPOConfig
    from cai.data.hh import hh_pair_rows
    from cai.rl import dpo
    from cai.runtime.models import load_model, load_tokenizer
    from cai.runtime.settings import Precision

    tok = load_tokenizer(args.model, padding_side="right")
    base = load_model(args.model)
    pairs = hh_pair_rows(HH)[0][: args.pairs]
    cfg = DPOConfig(
        epochs=1,
        batch_size=4,
        learning_rate=5e-5,
        beta=0.1,
        max_length=384,
        save_steps=10_000,
        logging_steps=1,
        lora=None if args.full else LoraConfig(r=16, alpha=32),
    )

    def train(way: str, out: Path):
        """One epoch from a fresh copy of the model: (seconds, mean loss, trained weights)."""
        dpo.PACKED = way == "packed"
        model = copy.deepcopy(base)
        ref = copy.deepcopy(base).eval().requires_grad_(False) if args.full else None
        precision = Precision(compute="float32")
        trainer = dpo.build_trainer(cfg, 0, "cpu", precision, model, ref, tok, pairs, [], out, [])
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
        return seconds, float(result.training_loss), weights

    print_machine(torch)
    tokens = sum(
        len(tok.apply_chat_template(r["messages"] + [{"role": "assistant", "content": r[side]}])["input_ids"])
        for r in pairs
        for side in ("response_a", "response_b")
    )
    print(f"{len(pairs)} pairs, {tokens} tokens in both sides' transcripts, full={args.full}", flush=True)
    compare_trainings(WAYS, args.rounds, train)
    dpo.PACKED = True


if __name__ == "__main__":
    main()
