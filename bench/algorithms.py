"""CPU seconds and peak memory per 1,000 policy tokens for PPO, RLOO, GRPO and soft-label DPO on SmolLM2-135M,
one run, each algorithm in its own process.

    .venv/bin/python bench/algorithms.py [--updates 2] [--threads 1] [--out bench-algorithms.json]

Settings (as the quickstart and recipes/compare-algorithms.yaml): SmolLM2-135M-Instruct (`smollm2-135m-instruct`)
as the policy being optimised and the reference, LoRA r 16 (reference = adapters off), fp32 on CPU.
- PPO, RLOO, GRPO (cai.rl.trainer, cai.rl.group): 8 responses per update (PPO: 8 prompts; RLOO/GRPO: 2 prompts
  x k = 4), response length 48, temperature 0.7, 2 epochs, 1 minibatch, learning rate 1e-4; the reward is a PM
  (SmolLM2 with a seeded sequence-classification head, as bench/ppo_vs_trl.py makes it); PPO's critic is a
  separate LoRA value model on the same weights. Policy tokens: the sampled response tokens.
- DPO (cai.rl.dpo): pairs made once by this script (`make_pairs`): SmolLM2's own responses to the 8 bench prompts
  (the PPO prompts: the first 8 built-in red-team prompts), 3 per prompt (48 new tokens, temperature 0.7), paired
  as the feedback stage pairs them (cai.feedback.pairs.form_pairs: up to 3 per prompt, identical ones skipped,
  so up to 24 pairs), each with a seeded soft label (p_a drawn from 0.5-1 or 0-0.5 by a seeded coin); batches of
  4 pairs (8 sequences, as the on-policy updates hold 8 responses), max length 512, beta 0.1, learning rate
  5e-5, LoRA r 16. Policy tokens: the response tokens of both sides of every pair (what it trains on).
Each process runs one warm-up update (step) and then `--updates` timed ones (DPO: 2x as many steps);
reported: process CPU seconds and wall seconds per 1,000 policy tokens over the timed ones, and the peak
resident memory of the process (all its models loaded; not a per-token quantity).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from rounds import positive_int  # noqa: E402

ALGORITHMS = ["ppo", "rloo", "grpo", "dpo"]


def on_policy(kind: str, model: str, reward_dir: str, prompts: list[dict], updates: int) -> dict:
    import torch

    from cai.config.fields import LoraConfig
    from cai.config.policy import PPOConfig
    from cai.rl.group import GroupTrainer
    from cai.rl.modules import PolicyModel, ValueModel
    from cai.rl.rewards import PreferenceModelReward
    from cai.rl.trainer import PPOTrainer
    from cai.runtime.models import load_model, load_tokenizer, wrap_lora
    from cai.runtime.rundir import MetricsLog

    lora = LoraConfig(r=16, alpha=32)
    cfg = PPOConfig(
        updates=10**4,  # no final checkpoint inside the timing
        rollout_batch_size=8,
        response_length=48,
        ppo_epochs=2,
        learning_rate=1e-4,
        temperature=0.7,
        save_every=10**6,
        lora=lora,
    )
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix=f"cai-{kind}-"))
    common = dict(
        policy=PolicyModel(wrap_lora(load_model(model), lora)),
        tokenizer=load_tokenizer(model, padding_side="left"),
        reward=PreferenceModelReward(reward_dir),
        prompts=prompts,
        out_dir=out,
        metrics=MetricsLog(out / "metrics.jsonl"),
        show_progress=False,
    )
    if kind == "ppo":
        seq = load_model(reward_dir, kind="seq_cls")
        seq.model = wrap_lora(seq.model, lora, task_type="FEATURE_EXTRACTION")
        trainer = PPOTrainer(cfg, critic=ValueModel(seq), **common)
    else:
        trainer = GroupTrainer(cfg, algorithm=kind, samples_per_prompt=4, **common)
    rows = []
    for _ in range(updates + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        (row,) = trainer.train(until=trainer.step + 1)
        rows.append(
            {
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
                "tokens": row["tokens_per_s"] * row["time/update"],
                "score": row["objective/score"],
                "sqrt_kl": row["objective/sqrt_kl"],
            }
        )
    return {"timed": rows[1:], "warmup": rows[0]}


def make_pairs(model: str, prompts_file: str, out: Path) -> str:
    """Feedback-style pairs of SmolLM2's own responses to the bench prompts, with seeded soft labels."""
    import random

    from cai.config.fields import GenerationConfig
    from cai.feedback.pairs import form_pairs, sample_responses
    from cai.runtime.settings import Settings

    path = out / "pairs.json"
    if path.is_file():
        return str(path)
    rows = json.loads(Path(prompts_file).read_text())["messages"]
    prompts = [{"id": f"p{i}", **r} for i, r in enumerate(rows)]
    gen = GenerationConfig(batch_size=8, max_new_tokens=48, temperature=0.7)
    responses = sample_responses(
        model, Settings(device="cpu"), gen, prompts, 3, out / "responses.jsonl", "bench"
    )
    pairs, _ = form_pairs(prompts, responses, 3, 3, random.Random(0))
    rng = random.Random(1)
    for p in pairs:
        p["p_a"] = rng.uniform(0.5, 1.0) if rng.random() < 0.5 else rng.uniform(0.0, 0.5)
    path.write_text(json.dumps(pairs))
    return str(path)


def dpo(model: str, pairs_file: str, updates: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from cai.config.fields import LoraConfig
    from cai.config.policy import DPOConfig
    from cai.rl.dpo import build_trainer
    from cai.runtime.models import load_model, load_tokenizer
    from cai.runtime.settings import Precision

    pairs = json.loads(Path(pairs_file).read_text())
    steps = min(2 * updates + 1, len(pairs) // 4)
    cfg = DPOConfig(
        max_steps=steps,
        batch_size=4,
        learning_rate=5e-5,
        beta=0.1,
        max_length=512,
        save_steps=10**6,
        logging_steps=10**6,  # the token counter is reset at each log: log only at the end
        lora=LoraConfig(r=16, alpha=32),
    )
    rows, clock = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.update(t=time.perf_counter(), c=time.process_time(), tokens=trainer._tokens)

        def on_step_end(self, args, state, control, **kwargs):
            rows.append(
                {
                    "seconds": time.perf_counter() - clock["t"],
                    "cpu_seconds": time.process_time() - clock["c"],
                    "tokens": trainer._tokens - clock["tokens"] if trainer._tokens >= clock["tokens"] else 0,
                }
            )

    torch.manual_seed(0)
    tok = load_tokenizer(model, padding_side="left")
    args = (cfg, 0, "cpu", Precision(compute="float32"), load_model(model), None, tok, pairs, [])
    trainer = build_trainer(*args, Path(tempfile.mkdtemp(prefix="cai-dpo-")), [Timer()])
    trainer.train()
    return {"timed": rows[1:], "warmup": rows[0]}


def worker(args) -> None:
    import torch

    from cai.runtime.runlog import peak_memory, reset_peak_memory

    torch.set_num_threads(args.threads)
    reset_peak_memory()
    if args.worker == "dpo":
        out = dpo(args.model, args.prompts, args.updates)
    else:
        prompts = json.loads(Path(args.prompts).read_text())["messages"]
        out = on_policy(args.worker, args.model, args.reward, prompts, args.updates)
    out["peak_memory"] = peak_memory()
    print("RESULT " + json.dumps(out), flush=True)


def summarize(kind: str, out: dict) -> dict:
    timed = out["timed"]
    tokens = sum(r["tokens"] for r in timed)
    return {
        "algorithm": kind,
        "timed": len(timed),
        "policy_tokens": round(tokens),
        "cpu_s_per_1k_tokens": 1000 * sum(r["cpu_seconds"] for r in timed) / tokens,
        "wall_s_per_1k_tokens": 1000 * sum(r["seconds"] for r in timed) / tokens,
        "peak_rss_mib": out["peak_memory"]["rss_mib"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=positive_int, default=2, help="timed updates per on-policy algorithm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench-algorithms.json")
    ap.add_argument("--only", nargs="*", choices=ALGORITHMS, default=ALGORITHMS)
    ap.add_argument("--worker", choices=ALGORITHMS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--reward", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from ppo_vs_trl import prepare_inputs

    work = Path(tempfile.mkdtemp(prefix="cai-bench-algorithms-"))
    model, reward, prompts = prepare_inputs(work)
    pairs = make_pairs(model, prompts, work)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    results = []
    for kind in args.only:
        cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--reward", reward]
        data = pairs if kind == "dpo" else prompts
        cmd += ["--prompts", data, "--updates", str(args.updates), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"[bench] {kind} failed (exit {proc.returncode})")
        raw = json.loads(lines[-1][len("RESULT ") :])
        results.append({**summarize(kind, raw), "raw": raw})
        print(f"[bench] {json.dumps({k: v for k, v in results[-1].items() if k != 'raw'})}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| algorithm | policy tokens (timed) | CPU s / 1k tokens | wall s / 1k tokens | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['algorithm']} | {r['policy_tokens']} | {r['cpu_s_per_1k_tokens']:.1f} | "
            f"{r['wall_s_per_1k_tokens']:.1f} | {r['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
