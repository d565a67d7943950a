"""Seconds per PPO update with vLLM rollouts (`ppo.rollout_backend: vllm`) against HF rollouts, and whether a vLLM
engine in the process slows training, one run.

    .venv/bin/python bench/ppo_vllm.py [--rounds 2] [--updates 2] [--threads 2]
    .venv/bin/python bench/ppo_vllm.py --overhead [--rounds 4] [--steps 6]   # training steps with/without vLLM

Settings: the quickstart's PPO block (SmolLM2-135M-Instruct policy with LoRA r=16 alpha=32, a separate critic
with its own adapters, batch 8, response length 48, 2 PPO epochs, lr 1e-4, temperature 0.7), fp32 on the CPU.
The reward is a function (share of ASCII letters), the same on every side, so that only generation and training
differ. Three kinds of process, alternated in each round so that load on a shared machine hits them all:
- `hf`: HF rollouts, vLLM never imported;
- `hf+vllm`: HF rollouts, but vLLM imported and an engine started in the process first (does its OpenMP runtime
  or thread handling slow the training step?);
- `vllm`: vLLM rollouts from an engine colocated in the process, synced after every update.
Each process runs one warm-up update (it includes the vLLM engine's start) and `--updates` timed ones. Reported:
medians of seconds per update, of `time/generate` and of `time/train` (the forward, backward and optimizer steps
of the update), and the ratios of each side to `hf` in the same round (the median over rounds).
`--overhead`: processes that only time LoRA training steps of the policy (8 x 128 tokens), without and with a vLLM
engine started first, alternated; the median ratio, and which OpenMP libraries each process had loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rounds import positive_int

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("hf", "hf+vllm", "vllm")
STEP_KINDS = (
    "steps",
    "steps+vllm",
)  # --overhead: training steps alone, without and with an engine in the process


def worker(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    if args.threads:
        torch.set_num_threads(args.threads)
    from cai.config.fields import LoraConfig
    from cai.config.policy import PPOConfig
    from cai.rl.modules import PolicyModel, ValueModel
    from cai.rl.rewards import FunctionReward
    from cai.rl.trainer import PPOTrainer
    from cai.runtime.models import load_model, load_tokenizer, resolve, wrap_lora

    sys.path.insert(0, str(ROOT / "bench"))
    from generation import bench_prompts

    started = 0.0
    if args.worker == "hf+vllm":
        from cai.runtime import vllm_engine

        t0 = time.perf_counter()
        vllm_engine.start(resolve(args.model).path, dtype="float32")
        started = time.perf_counter() - t0
    cfg = PPOConfig(
        updates=10**4,
        rollout_batch_size=8,
        response_length=48,
        ppo_epochs=2,
        learning_rate=1e-4,
        temperature=0.7,
        save_every=10**6,
        lora=LoraConfig(r=16, alpha=32),
        rollout_backend="vllm" if args.worker == "vllm" else "hf",
    )
    tok = load_tokenizer(args.model)
    torch.manual_seed(0)
    lm = wrap_lora(load_model(args.model), cfg.lora)
    seq = load_model(args.model, kind="seq_cls")
    seq.model = wrap_lora(seq.model, cfg.lora, task_type="FEATURE_EXTRACTION")
    trainer = PPOTrainer(
        cfg,
        policy=PolicyModel(lm),
        critic=ValueModel(seq),
        tokenizer=tok,
        reward=FunctionReward(
            lambda p, r, **k: [sum(c.isascii() and c.isalpha() for c in x) / 48 for x in r]
        ),
        prompts=[{"messages": m} for m in bench_prompts(32)],
        out_dir=tempfile.mkdtemp(prefix="cai-ppo-vllm-"),
        show_progress=False,
    )
    rows = []
    for _ in range(args.updates + 1):
        rows.append(trainer.train(until=trainer.step + 1)[0])
    keep = ("time/update", "time/generate", "time/train", "response/length")
    return {
        "warmup": {k: rows[0][k] for k in keep},
        "updates": [{k: r[k] for k in keep} for r in rows[1:]],
        "engine_start_s": started,
        "threads": torch.get_num_threads(),
    }


def steps_worker(args) -> dict:
    """Median seconds of a LoRA training step (forward, backward, AdamW) of the policy on a fixed batch of 8 x 128
    tokens, with or without a vLLM engine started in the process first."""
    import torch

    sys.path.insert(0, str(ROOT))
    if args.threads:
        torch.set_num_threads(args.threads)
    from cai.config.fields import LoraConfig
    from cai.runtime.models import load_model, resolve, wrap_lora

    if args.worker == "steps+vllm":
        from cai.runtime import vllm_engine

        vllm_engine.start(resolve(args.model).path, dtype="float32")
    torch.manual_seed(0)
    lm = wrap_lora(load_model(args.model), LoraConfig(r=16, alpha=32))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(100, 20000, (8, 128), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    maps = Path("/proc/self/maps").read_text().splitlines()
    omp = sorted({ln.rsplit("/", 1)[-1] for ln in maps if "omp" in ln.rsplit("/", 1)[-1]})
    return {"step_s": statistics.median(times[1:]), "openmp": omp, "threads": torch.get_num_threads()}


def run_worker(kind: str, args) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--updates", str(args.updates)]
    cmd += ["--model", args.model, "--steps", str(args.steps)] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"[bench] worker {kind} failed (exit {proc.returncode})")
    out = json.loads(lines[-1][len("RESULT ") :])
    if kind in STEP_KINDS:
        print(f"[bench] {kind}: {out['step_s']:.2f} s per step, OpenMP {out['openmp']}", flush=True)
        return out
    ups = ", ".join(f"{u['time/update']:.1f} (gen {u['time/generate']:.1f})" for u in out["updates"])
    print(f"[bench] {kind}: updates {ups} s; warm-up {out['warmup']['time/update']:.1f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=KINDS + STEP_KINDS)
    p.add_argument(
        "--overhead", action="store_true", help="training steps without and with vLLM in the process"
    )
    p.add_argument("--steps", type=positive_int, default=6)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--updates", type=positive_int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write every process's figures here")
    args = p.parse_args()
    if args.worker:
        out = steps_worker(args) if args.worker in STEP_KINDS else worker(args)
        print("RESULT " + json.dumps(out), flush=True)
        return
    if args.overhead:
        pairs = [[run_worker(k, args)["step_s"] for k in STEP_KINDS] for _ in range(args.rounds)]
        ratios = [b / a for a, b in pairs]
        print(
            f"step with vLLM / without: {statistics.median(ratios):.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)})"
        )
        return
    results = {k: [] for k in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            results[kind].append(run_worker(kind, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    med = {
        k: {m: statistics.median(u[m] for r in runs for u in r["updates"]) for m in runs[0]["updates"][0]}
        for k, runs in results.items()
    }
    print("| rollouts | s/update | time/generate | time/train | n |\n|---|---:|---:|---:|---:|")
    for k, m in med.items():
        n = sum(len(r["updates"]) for r in results[k])
        print(f"| {k} | {m['time/update']:.1f} | {m['time/generate']:.1f} | {m['time/train']:.1f} | {n} |")
    for k in ("hf+vllm", "vllm"):
        for m in ("time/update", "time/generate", "time/train"):
            ratios = [
                statistics.median(u[m] for u in a["updates"]) / statistics.median(u[m] for u in b["updates"])
                for a, b in zip(results[k], results["hf"])
            ]
            print(
                f"{k} / hf, {m}: {statistics.median(ratios):.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)})"
            )
    print(f"vLLM engine start in hf+vllm: {[round(r['engine_start_s'], 1) for r in results['hf+vllm']]} s")


if __name__ == "__main__":
    main()
