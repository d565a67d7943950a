"""Seconds per PPO update: TRL 1.12.0's PPOTrainer against ours (cai.rl.trainer), same settings, one run.

    .venv/bin/python bench/ppo_vs_trl.py [--rounds 3] [--updates 2]

Settings (both sides): SmolLM2-135M-Instruct as policy, reference, value and reward model (a sequence-classifier
head on the same weights), full fine-tune, a separate value model, batch 8, response length 48, 4 PPO epochs,
1 minibatch, temperature 0.7, no gradient checkpointing, fp32 on CPU. The same 8 prompts every update.
Also timed: our default configuration (LoRA policy with the reference = adapters off, the critic a value head
on the policy's trunk: `critic: value_head`, the LoRA default since 2026-12-06), with `--separate-rounds N` the same
with a separate LoRA critic (`critic: separate`, the LoRA default before), and TRL
in a process started with glibc's malloc keeping freed memory (MALLOC_MMAP_MAX_=0, no trimming), which our
trainer sets for itself on a CPU (cai.runtime.settings.keep_freed_memory): its speed-up line says how much of
ours is that setting.

TRL 1.12.0 runs in its own virtualenv, made by this script on first use (`--venv`, default
~/.cache/cai/bench/trl112: `pip install torch==V` at this interpreter's torch version, then trl==1.12.0 and this
interpreter's transformers, accelerate and datasets, each pinned to the version installed here), and remade where
any of the five differs. Each worker records the versions it ran with, and the report prints both sides'. Each round starts one process per configuration, alternating, so that load on a
shared machine hits every side; each process runs one warm-up update and then `--updates` timed ones.
Reported: the median seconds per update over all timed updates, the median of each phase, and the peak RSS
of the processes. The compute floor (bench/floor.py): the FLOPs of an update from the model's shapes and the
token counts, at the fp32 matmul rate and copy rate measured by this process at the start of each round; a
configuration's share of a floor = floor seconds / its seconds per update. Two floors per configuration: the
settings' floor (every prompt's tokens in every trunk pass, the rollout's critic forward of its own: the work of
a padded batch, which is what TRL runs, so TRL's own floor is this one), and its own floor, the work the trainer
itself must do: ours computes the 8 prompts' shared opening once per trunk pass (packed forwards, generation's
shared prefix) and, at one minibatch, takes the rollout's values from epoch 0's forward (cai.rl.trainer).
The LoRA rows count the adapters' products (r from LORA) and the frozen weights' input gradients. The last line is `speedup X.XX` =
TRL's seconds per update / ours at equal settings, the median over rounds of the ratio of the two back-to-back
processes (robust to load that changes between rounds); the line before gives it with the distribution-free
interval of that median (75% with 3 rounds, 95% needs 6). `--summarize [FILE ...]` prints the summary again from
saved per-process results, pooling the rounds of several files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from floor import decoder_shapes, floor_seconds, machine_rates, update_work
from rounds import positive_int

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(
    batch=8, response_length=48, epochs=4, minibatches=1, temperature=0.7, lr=1e-5, kl_coef=0.05, seed=0
)
# the environment of the "trl-kept" processes: glibc's malloc without mmap and without trimming
KEPT_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(10**12)}
TRL_VERSION = "1.12.0"
# pinned in TRL's virtualenv to the versions this interpreter runs (ensure_venv)
PINNED = ("torch", "transformers", "accelerate", "datasets")
LORA = dict(r=16, alpha=32)  # our default configuration's adapters
WORK = Path.home() / ".cache" / "cai" / "bench" / "ppo"
NAMES = {  # the configurations, as the table names them
    "trl": "TRL 1.12.0 PPOTrainer",
    "ours": "ours, equal settings (full FT)",
    "ours-lora": "ours, default (LoRA r=16, critic as a value head)",
    "ours-lora-separate": "ours, LoRA r=16, separate LoRA critic (--separate-rounds)",
    "trl-kept": "TRL 1.12.0, freed memory kept",
}
PHASES = ["generate", "ref", "value", "reward", "train_forward", "backward", "optimizer"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Clock:
    """Adds the wall time of wrapped calls to named phases."""

    def __init__(self):
        self.total = defaultdict(float)

    def wrap(self, fn, name):
        def timed(*args, **kwargs):
            key = name(*args, **kwargs) if callable(name) else name
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[key] += time.perf_counter() - t0

        return timed

    def snapshot(self) -> dict:
        return dict(self.total)


def installed_versions(names) -> dict:
    """The installed version of each package in `names`, in this interpreter."""
    from importlib.metadata import version

    return {n: version(n) for n in names}


def diff(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def make_reward_dir(model_dir: str, out: Path) -> Path:
    """The reward model: SmolLM2 with a seeded sequence-classification head, saved once (both sides load it)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(1234)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


# ---------------------------------------------------------------- TRL 1.12 worker (runs in its own venv)
def worker_trl(args) -> dict:
    import torch
    import trl.experimental.ppo.ppo_trainer as T
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = SETTINGS
    prompts = json.loads(Path(args.prompts).read_text())["input_ids"]
    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    torch.manual_seed(s["seed"])
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(args.model, **load)
    ref = AutoModelForCausalLM.from_pretrained(args.model, **load)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **load)
    n = args.updates + 1
    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"),
        per_device_train_batch_size=s["batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=s["minibatches"],
        num_ppo_epochs=s["epochs"],
        response_length=s["response_length"],
        temperature=s["temperature"],
        learning_rate=s["lr"],
        kl_coef=s["kl_coef"],
        total_episodes=s["batch"] * n,
        local_rollout_forward_batch_size=s["batch"],
        stop_token="eos",
        num_sample_generations=0,
        report_to=[],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        seed=s["seed"],
        use_cpu=True,
        disable_tqdm=True,
    )
    data = Dataset.from_dict({"input_ids": prompts})
    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=data,
        value_model=value,
        eval_dataset=data,
    )
    clock = Clock()
    T.batch_generation = clock.wrap(T.batch_generation, "generate")
    T.forward = clock.wrap(T.forward, lambda *a, **k: "train_forward" if torch.is_grad_enabled() else "ref")
    T.get_reward = clock.wrap(
        T.get_reward, lambda m, *a, **k: "reward" if m is trainer.reward_model else "value"
    )
    trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "backward")
    trainer.optimizer.step = clock.wrap(trainer.optimizer.step, "optimizer")
    marks = []

    class Mark(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append((time.perf_counter(), time.process_time(), clock.snapshot()))

    trainer.add_callback(Mark())
    marks.append((time.perf_counter(), time.process_time(), clock.snapshot()))
    trainer.train()
    updates = [
        {"seconds": t1 - t0, "cpu_seconds": c1 - c0, **diff(p0, p1)}
        for (t0, c0, p0), (t1, c1, p1) in zip(marks, marks[1:])
    ]
    return {
        "updates": updates[1:],
        "warmup": updates[0],
        "peak_rss_mb": peak_rss_mb(),
        "versions": installed_versions((*PINNED, "trl")),
    }


# ---------------------------------------------------------------- our worker (project venv)
def worker_ours(args, lora: bool, value_head: bool = False) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from cai.config.fields import LoraConfig
    from cai.config.policy import PPOConfig
    from cai.rl import trainer as tr
    from cai.rl.modules import PolicyModel, ValueModel
    from cai.rl.rewards import PreferenceModelReward
    from cai.runtime.models import load_model, load_tokenizer, wrap_lora

    s = SETTINGS
    rows = json.loads(Path(args.prompts).read_text())["messages"]
    tok = load_tokenizer(args.model, padding_side="left")
    torch.manual_seed(s["seed"])
    n_updates = args.updates + 1
    cfg = PPOConfig(
        updates=10**4,
        rollout_batch_size=s["batch"],
        response_length=s["response_length"],
        ppo_epochs=s["epochs"],
        num_minibatches=s["minibatches"],
        temperature=s["temperature"],
        learning_rate=s["lr"],
        kl_coef=s["kl_coef"],
        save_every=10**6,
        lora=LoraConfig(**LORA) if lora else None,
        critic="value_head" if value_head else "separate",
    )
    lm = load_model(args.model)
    ref = None
    if lora:
        lm = wrap_lora(lm, cfg.lora)
    else:
        ref = load_model(args.model)
    critic = None
    if not value_head:
        seq = load_model(args.reward, kind="seq_cls")
        if lora:
            seq.model = wrap_lora(seq.model, cfg.lora, task_type="FEATURE_EXTRACTION")
        critic = ValueModel(seq)
    reward = PreferenceModelReward(args.reward)
    clock = Clock()
    trainer = tr.PPOTrainer(
        cfg,
        policy=PolicyModel(lm, value_head=value_head),
        tokenizer=tok,
        reward=reward,
        prompts=rows,
        out_dir=tempfile.mkdtemp(prefix="cai-ppo-"),
        critic=critic,
        ref_model=ref,
        show_progress=False,
    )
    import cai.runtime.generate as G

    G.HFBackend.generate_ids = clock.wrap(G.HFBackend.generate_ids, "generate")
    # policy-shaped forwards without grad are the reference's (old log-probs come from the sampling logits)
    PolicyModel.forward = clock.wrap(
        PolicyModel.forward, lambda *a, **k: "train_forward" if torch.is_grad_enabled() else "ref"
    )
    ValueModel.forward = clock.wrap(
        ValueModel.forward, lambda *a, **k: "train_forward" if torch.is_grad_enabled() else "value"
    )
    trainer.reward = clock.wrap(trainer.reward, "reward")
    trainer.acc.backward = clock.wrap(trainer.acc.backward, "backward")
    trainer.opt.step = clock.wrap(trainer.opt.step, "optimizer")  # one optimizer: policy and critic groups
    updates = []
    for _ in range(
        n_updates
    ):  # cfg.updates is large so that no final checkpoint is written inside the timing
        p0, t0, c0 = clock.snapshot(), time.perf_counter(), time.process_time()
        trainer.train(until=trainer.step + 1)
        updates.append(
            {
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
                **diff(p0, clock.snapshot()),
            }
        )
    return {
        "updates": updates[1:],
        "warmup": updates[0],
        "peak_rss_mb": peak_rss_mb(),
        "versions": installed_versions((*PINNED, "peft")),
    }


# ---------------------------------------------------------------- driver
VERSIONS = (
    "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
)


def venv_versions(py: Path, names: list[str]) -> dict | None:
    """The versions of `names` installed in the virtualenv of `py`; None where one is missing."""
    proc = subprocess.run([str(py), "-c", VERSIONS, *names], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def ensure_venv(venv: Path) -> Path:
    """TRL 1.12.0's virtualenv with this interpreter's torch, transformers, accelerate and datasets: made on first
    use, and reinstalled where any of the five versions differs."""
    want = {"trl": TRL_VERSION, **installed_versions(PINNED)}
    py = venv / "bin" / "python"
    have = venv_versions(py, list(want)) if py.is_file() else None
    if have == want:
        return py
    pins = ", ".join(f"{k} {v}" for k, v in want.items())
    if have is None:
        print(f"[bench] creating the TRL virtualenv in {venv} ({pins}; once, ~2 min)", flush=True)
    else:
        old = ", ".join(f"{k} {have[k]}" for k in want if have[k] != want[k])
        print(f"[bench] the TRL virtualenv in {venv} has {old}: installing {pins}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch alone and first, at this interpreter's exact version (its local label too, e.g. 2.13.0+cpu: the local
    # CPU wheel), so that no other requirement pulls a CUDA build
    subprocess.run(pip + [f"torch=={want['torch']}"], check=True)
    subprocess.run(pip + [f"{k}=={v}" for k, v in want.items() if k != "torch"], check=True)
    have = venv_versions(py, list(want))
    if have != want:
        raise SystemExit(f"[bench] the TRL virtualenv in {venv} has {have} after installing, not {want}")
    return py


def prepare_inputs(work: Path) -> tuple[str, str, str]:
    sys.path.insert(0, str(ROOT))
    from cai.data.sources import BUILTIN_DIR
    from cai.runtime.models import load_tokenizer, prepare
    from cai.runtime.rundir import read_jsonl

    model = str(prepare("smollm2-135m-instruct"))
    tok = load_tokenizer(model)
    rows = [r for r in read_jsonl(BUILTIN_DIR / "red_team.jsonl") if isinstance(r.get("prompt"), str)][
        : SETTINGS["batch"]
    ]
    messages = [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    ids = [
        tok(
            tok.apply_chat_template(m["messages"], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for m in messages
    ]
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps({"messages": messages, "input_ids": ids}))
    reward = make_reward_dir(model, work / "reward-model")
    return model, str(reward), str(prompts)


def run_worker(python: str, kind: str, args, common: list[str]) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if kind == "trl-kept":
        env.update(KEPT_ENV)
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, *common]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"[bench] worker {kind} failed (exit {proc.returncode})")
    out = json.loads(lines[-1][len("RESULT ") :])
    secs = ", ".join(f"{u['seconds']:.1f} (cpu {u['cpu_seconds']:.1f})" for u in out["updates"])
    print(
        f"[bench] {kind}: updates {secs} s (warm-up {out['warmup']['seconds']:.1f} s), peak RSS {out['peak_rss_mb']:.0f} MB, process {time.time() - t0:.0f} s",
        flush=True,
    )
    return out


def round_ratios(slow: list[dict], fast: list[dict]) -> list[float]:
    """Per round that timed both, the median seconds of one configuration's timed updates over another's (all
    of them, with `--updates` above 1); rounds are matched by their "round" key, so a configuration timed in
    fewer rounds (`--lora-rounds`) or results pooled from several files pair up right."""

    def median_seconds(r: dict) -> float:
        return statistics.median(u["seconds"] for u in r["updates"])

    by_round = {f["round"]: f for f in fast}
    return [median_seconds(s) / median_seconds(by_round[s["round"]]) for s in slow if s["round"] in by_round]


def with_interval(ratios: list[float]) -> str:
    """The median of per-round ratios with its distribution-free interval (cai.stats.median_interval), e.g.
    `1.69 (97% interval 1.48-1.86 over 6 rounds)`: the rounds are independent draws of the same ratio."""
    from cai.stats import median_interval  # not at the top: TRL's worker runs this file in a venv without cai

    lo, hi, coverage = median_interval(ratios)
    return f"{statistics.median(ratios):.2f} ({coverage:.0%} interval {lo:.2f}-{hi:.2f} over {len(ratios)} rounds)"


def load_results(paths: list[str], error=None) -> dict[str, list[dict]]:
    """The per-process rows of one or more results files, by configuration ("rates": each round's measured
    rates); with several files the rounds are renamed file.round so that they stay apart when pooled. Each file
    must exist and hold rows of TRL and of ours (a run that timed one round at least): else `error(message)`
    (the parser's error: one line, exit 2)."""
    error = error or (lambda msg: sys.exit(msg))
    results: dict[str, list[dict]] = defaultdict(list)
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            error(f"--summarize: {path}: no such file")
        kinds = set()
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                kinds.add(row["kind"])
                if row["kind"] != "rates" and not row["updates"]:
                    raise KeyError("updates")
            except (ValueError, KeyError, TypeError) as e:
                error(
                    f"--summarize: {path}:{n}: not a row of this benchmark's results ({type(e).__name__}: {e})"
                )
            if len(paths) > 1:
                row["round"] = f"{i}.{row['round']}"
            results[row["kind"]].append(row)
        missing = [k for k in ("trl", "ours") if k not in kinds]
        if missing:
            error(f"--summarize: {path} holds no rows of {' and '.join(missing)} (an interrupted run?)")
    return results


def summarize(results: dict[str, list[dict]]) -> dict:
    out = {}
    for kind, runs in results.items():
        ups = [u for r in runs for u in r["updates"]]
        row = {
            "seconds": statistics.median(u["seconds"] for u in ups),
            "n": len(ups),
            "cpu_seconds": statistics.median(u["cpu_seconds"] for u in ups),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        }
        for p in PHASES:
            row[p] = statistics.median(u.get(p, 0.0) for u in ups)
        row["other"] = row["seconds"] - sum(row[p] for p in PHASES)
        out[kind] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="alternating rounds (one process per configuration each)",
    )
    ap.add_argument(
        "--updates", type=positive_int, default=1, help="timed updates per process, after one warm-up update"
    )
    ap.add_argument("--venv", default=str(Path.home() / ".cache" / "cai" / "bench" / "trl112"))
    ap.add_argument(
        "--lora-rounds",
        type=int,
        default=None,
        help="time our LoRA configuration in the first N rounds only (default: all)",
    )
    ap.add_argument(
        "--kept-rounds",
        type=int,
        default=None,
        help="time TRL with freed memory kept in the first N rounds only (default: all)",
    )
    ap.add_argument(
        "--results",
        default=str(WORK / "results.jsonl"),
        help="each worker's result is appended here (a fresh file per run)",
    )
    ap.add_argument(
        "--summarize",
        nargs="*",
        metavar="RESULTS",
        help="only print the summary of these results files (default: --results), their rounds pooled",
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads in every worker (0: torch's default)"
    )
    ap.add_argument("--json", help="also write the summary here")
    ap.add_argument(
        "--separate-rounds",
        type=int,
        default=0,
        help="also time our LoRA configuration with a separate LoRA critic (critic: separate) in the first N "
        "rounds (default: none)",
    )
    ap.add_argument("--worker", choices=[*NAMES], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--reward", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        fn = {
            "trl": worker_trl,
            "trl-kept": worker_trl,
            "ours": lambda a: worker_ours(a, False),
            "ours-lora": lambda a: worker_ours(a, True, value_head=True),
            "ours-lora-separate": lambda a: worker_ours(a, True),
        }[args.worker]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return

    if args.summarize is not None:
        report(load_results(args.summarize or [args.results], ap.error), args)
        return
    for name in ("lora_rounds", "kept_rounds", "separate_rounds"):
        if (getattr(args, name) or 0) < 0:
            ap.error(f"--{name.replace('_', '-')}: a count of rounds (0 or more) is expected")
    trl_python = str(ensure_venv(Path(args.venv)))
    WORK.mkdir(parents=True, exist_ok=True)
    model, reward, prompts = prepare_inputs(WORK)
    common = [
        "--model",
        model,
        "--reward",
        reward,
        "--prompts",
        prompts,
        "--updates",
        str(args.updates),
        "--threads",
        str(args.threads),
    ]
    kinds = [
        ("trl", trl_python),
        ("ours", sys.executable),
        ("ours-lora", sys.executable),
        ("ours-lora-separate", sys.executable),
        ("trl-kept", trl_python),
    ]
    lora_rounds = args.rounds if args.lora_rounds is None else args.lora_rounds
    kept_rounds = args.rounds if args.kept_rounds is None else args.kept_rounds
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).unlink(missing_ok=True)
    print(
        f"[bench] load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch threads: {args.threads or 'default'}",
        flush=True,
    )
    results: dict[str, list[dict]] = defaultdict(list)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for r in range(args.rounds):
        rates = machine_rates()
        results["rates"].append({"round": r, **rates, "count": count_inputs(model, prompts)})
        print(
            f"[bench] round {r}: matmul {rates['matmul_flops'] / 1e9:.0f} GFLOP/s, copy "
            f"{rates['copy_bytes'] / 1e9:.1f} GB/s",
            flush=True,
        )
        with open(args.results, "a") as f:
            f.write(json.dumps({"kind": "rates", **results["rates"][-1]}) + "\n")
        order = kinds if r % 2 == 0 else kinds[::-1]  # alternate which side goes first
        for kind, py in order:
            skip = {
                "ours-lora": lora_rounds,
                "trl-kept": kept_rounds,
                "ours-lora-separate": args.separate_rounds,
            }
            if r >= skip.get(kind, args.rounds):
                continue
            out = run_worker(py, kind, args, common)
            out.update(round=r, load=os.getloadavg()[0])  # the load after this process, as the file keeps it
            results[kind].append(out)
            with open(args.results, "a") as f:
                f.write(json.dumps({"kind": kind, **out}) + "\n")
    print(f"[bench] load average after: {os.getloadavg()[0]:.1f}", flush=True)
    report(results, args)


def count_inputs(model_dir: str, prompts: str) -> dict:
    """What the floors are counted from (kept with each round's rates): the model's shapes, the prompts' token
    counts, the tokens every prompt begins with as cai's packed forwards share them (cai.runtime.packing's
    common_prefix; generation's prefill shares the same) and the rank of our LoRA configuration."""
    from cai.runtime.packing import common_prefix  # not at the top: TRL's worker runs this file without cai

    ids = json.loads(Path(prompts).read_text())["input_ids"]
    return {
        "shapes": decoder_shapes(json.loads((Path(model_dir) / "config.json").read_text())),
        "prompt_lens": [len(x) for x in ids],
        "shared_prefix": common_prefix(ids),
        "lora_r": LORA["r"],
    }


def stored_count() -> dict:
    """`count_inputs` of the model and prompts a run leaves in WORK, for results files kept before the rounds
    stored their counts."""
    from cai.runtime.models import alias_dir

    model, prompts = alias_dir("smollm2-135m-instruct"), WORK / "prompts.json"
    if not (model / "config.json").is_file() or not prompts.is_file():
        raise SystemExit(f"[bench] the results hold no token counts and {prompts} or {model} is missing")
    print(f"[bench] the results hold no token counts: counted from {prompts} and {model}", flush=True)
    return count_inputs(str(model), str(prompts))


def floor_works(count: dict) -> dict:
    """Per configuration, (the settings' work, its own work) of one update (bench/floor.py). The settings': every
    prompt's tokens in every trunk pass and the rollout's critic forward of its own, the work of a padded batch;
    TRL's own is that one. Ours: the prompts' shared opening once per trunk pass, no pass over a row's last token
    but the reward's and, at one minibatch, the rollout's values from epoch 0's forward of the critic or, with a
    value head, of the policy's trunk (cai.rl.trainer's reuse_graphs)."""
    args = (count["shapes"], count["prompt_lens"], SETTINGS["response_length"], SETTINGS["epochs"])
    packed = dict(shared_prefix=count["shared_prefix"], last_token=False)
    own = dict(packed, rollout_value=SETTINGS["minibatches"] != 1)
    r = count["lora_r"]
    full, lora = update_work(*args), update_work(*args, lora_r=r)
    return {
        "trl": (full, full),
        "trl-kept": (full, full),
        "ours": (full, update_work(*args, **own)),
        # one trunk for policy and critic
        "ours-lora": (
            update_work(*args, lora_r=r, critic=False),
            update_work(*args, lora_r=r, critic=False, **own),
        ),
        "ours-lora-separate": (lora, update_work(*args, lora_r=r, **own)),
    }


def floor_shares(results: dict) -> dict:
    """Per configuration: (settings' floor s, share of it, own floor s, share of it), the medians over the
    rounds, each round's processes against the rates measured at its start."""
    rates = {r["round"]: r for r in results.get("rates", [])}
    fallback = None
    out = {}
    for kind in NAMES:
        cols = [[], [], [], []]
        for run in results.get(kind, []):
            r = rates.get(run.get("round"))
            if r is None:
                continue
            if "count" not in r and fallback is None:
                fallback = stored_count()
            seconds = statistics.median(u["seconds"] for u in run["updates"])
            for i, work in enumerate(floor_works(r.get("count") or fallback)[kind]):
                f = floor_seconds(work, r)
                cols[2 * i].append(f)
                cols[2 * i + 1].append(f / seconds)
        if cols[0]:
            out[kind] = tuple(statistics.median(c) for c in cols)
    return out


def versions_line(results: dict) -> str:
    """Both sides' package versions as their workers recorded them, and which of the pinned ones differ."""
    sides = {}
    for side, kinds in (("TRL", ("trl", "trl-kept")), ("ours", ("ours", "ours-lora", "ours-lora-separate"))):
        seen = {json.dumps(r["versions"]) for k in kinds for r in results.get(k, []) if "versions" in r}
        sides[side] = [json.loads(v) for v in sorted(seen)]
    if not all(sides.values()):
        return "versions: not recorded (results from before the workers kept them)"
    text = "; ".join(
        f"{side} " + " / ".join(", ".join(f"{k} {v}" for k, v in vs.items()) for vs in sets)
        for side, sets in sides.items()
    )
    differ = sorted({p for a in sides["TRL"] for b in sides["ours"] for p in PINNED if a.get(p) != b.get(p)})
    return f"versions: {text}" + (f" -- DIFFERENT on the two sides: {', '.join(differ)}" if differ else "")


def report(results: dict, args) -> None:
    shares = floor_shares(results)
    results = {k: v for k, v in results.items() if k != "rates"}
    summary = summarize(results)
    names = NAMES
    cols = PHASES + ["other"]
    print(
        "\n| configuration | s/update | CPU s/update | "
        + " | ".join(cols)
        + " | peak RSS MB | n | settings' floor s | share | own floor s | share of own floor |"
    )
    print("|---|---:|---:|" + "---:|" * len(cols) + "---:|---:|---:|---:|---:|---:|")
    for kind, row in summary.items():
        f_set, s_set, f_own, s_own = shares.get(kind, (float("nan"),) * 4)
        print(
            f"| {names[kind]} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | "
            + " | ".join(f"{row[c]:.1f}" for c in cols)
            + f" | {row['peak_rss_mb']:.0f} | {row['n']} | {f_set:.1f} | {s_set:.0%} | {f_own:.1f} | {s_own:.0%} |"
        )
    print("\n" + versions_line(results))

    trl_s, trl_c = summary["trl"]["seconds"], summary["trl"]["cpu_seconds"]
    paired = round_ratios(results["trl"], results["ours"])
    print(
        "\nper-round ratios TRL/ours (wall): "
        + ", ".join(f"{x:.2f}" for x in paired)
        + f"; load averages: {', '.join(str(round(r.get('load', float('nan')), 1)) for r in results['ours'])}"
    )
    print(
        "share of its own compute floor (floor s / s per update, median over rounds; of the settings' floor): "
        + ", ".join(f"{names[k]} {v[3]:.2f} ({v[1]:.2f})" for k, v in shares.items())
    )
    print(f"ratio of the medians TRL/ours (wall): {trl_s / summary['ours']['seconds']:.2f}")
    print(f"CPU-time ratio TRL/ours (equal settings): {trl_c / summary['ours']['cpu_seconds']:.2f}")
    if "ours-lora" in summary:
        lora = round_ratios(results["trl"], results["ours-lora"])
        print(f"speedup of our LoRA default over TRL (full FT), same rounds: {with_interval(lora)}")
    if "ours-lora-separate" in summary:
        sep = round_ratios(results["trl"], results["ours-lora-separate"])
        print(
            f"speedup of our LoRA with a separate critic over TRL (full FT), same rounds: {with_interval(sep)}"
        )
    if "trl-kept" in results:
        kept = round_ratios(results["trl-kept"], results["ours"])
        print(f"speedup at equal settings over TRL with freed memory kept too: {with_interval(kept)}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    # the speedup: the median of the per-round ratios (each round's TRL and our processes ran back to back, so a
    # change of load between rounds cancels out; the ratio of the medians is printed above for reference), its
    # interval on the line before, the bare figure last
    print(f"speedup at equal settings: {with_interval(paired)}")
    print(f"speedup {statistics.median(paired):.2f}")


if __name__ == "__main__":
    main()
