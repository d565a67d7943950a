"""The GPU check: every training stage in bf16 on CUDA with a randomly initialised ~0.5B model built in-process
(Llama-shaped, no hub), asserting the precision policy's invariants, with peak memory and tokens/s per phase.

    python bench/gpu_smoke.py                 # one GPU, bf16, ~0.5B parameters (a few minutes on an H200)
    python bench/gpu_smoke.py --tiny          # the same phases on the CPU with a tiny model (checks the script)

Phases, each with its invariants (an AssertionError names the phase and what failed):
- sft: a few SFTTrainer steps on fp32 master weights under bf16 autocast; every trained tensor changes;
- pm-classifier, pm-value-head: a few preference-model steps; weights change, scores are fp32;
- ppo-{full,lora}-{separate,value_head}: PPO updates at lr 1e-5; at least 90% of the trained tensors change
  (LoRA: every B matrix), the first step of each update starts at ratio 1 within the bf16 tolerance, values fp32;
- forward-256-{padded,batched,loop}: one policy forward over 256 rows (the batch size of GPU rollouts): the padded
  batch, packed with one attention call per layer, packed with one call per row (the fallback); the packed
  log-probs match the padded ones.
- generate-hf, generate-vllm: the same chat prompts through the Engine on each backend (greedy, `--gen-tokens` new
  tokens each), tokens/s; the vLLM phase also prints how many greedy responses equal HF's (near-ties of a random
  model's flat logits can flip in bf16, so that share is shown, not asserted). It needs vLLM installed (`cai[vllm]`);
  without it the phase says so and is skipped.
Not part of CI (no GPU there); run it whenever a GPU is available and copy the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rounds import positive_int  # noqa: E402

SHAPES = {  # Llama-shaped; the byte-level tokenizer's vocabulary padded to a realistic LM-head size
    "0.5b": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab=32768,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab=512,
    ),
    "tiny-head64": dict(  # the generation phases' tiny model: vLLM's CPU attention needs head_dim >= 32
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab=512,
    ),
}


def build_model(folder: Path, shape: dict) -> Path:
    """A random Llama of `shape` with cai's byte-level tokenizer, saved as safetensors (the loader's path)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cai.runtime.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    shape = dict(shape)
    cfg = LlamaConfig(
        vocab_size=max(shape.pop("vocab"), len(tok)),
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


class Phases:
    """Times each phase, its tokens/s and peak memory, and records whether its checks passed."""

    def __init__(self, device: str):
        self.device, self.rows = device, []

    def run(self, name: str, fn):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = fn()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.startswith("cuda") else float("nan")
        self.rows.append(
            {
                "phase": name,
                "seconds": round(secs, 2),
                "tokens_per_s": round(tokens / secs, 1),
                "peak_gib": round(peak, 2),
                "checks": "ok",
            }
        )
        print(json.dumps(self.rows[-1]), flush=True)


def changed(before: dict, model, only=None) -> tuple[int, int]:
    import torch

    now = {n: p for n, p in model.named_parameters() if n in before}
    names = [n for n in now if only is None or only(n)]
    return sum(not torch.equal(before[n], now[n].detach().to(before[n].device)) for n in names), len(names)


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def chat_examples(n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = "alpha delta kilo oscar tango zulu yes no maybe please thanks".split()
    say = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    return [
        {
            "prompt": [{"role": "user", "content": say(words)}],
            "completion": [{"role": "assistant", "content": say(words)}],
        }
        for _ in range(n)
    ]


def sft_phase(model_dir, settings, work, a):
    import torch

    from cai.config.blocks import SFTConfig
    from cai.runtime.models import load_model, load_tokenizer
    from cai.runtime.settings import Precision
    from cai.stages.sft import build_trainer

    model = load_model(str(model_dir), Precision.of(settings).trainable(settings))
    tok = load_tokenizer(str(model_dir), settings, padding_side="right")
    cfg = SFTConfig(max_steps=a.steps, batch_size=a.batch, learning_rate=1e-5, max_length=2 * a.length)
    examples = chat_examples(a.steps * a.batch, max(2, a.length // 16))
    before = snapshot(model)
    trainer = build_trainer(cfg, settings, model, tok, examples, work / "sft")
    trainer.train()
    n, total = changed(before, trainer.model)
    assert n == total, f"sft: {n} of {total} trained tensors changed"
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}, "sft: masters not fp32"
    return a.steps * a.batch * a.length


def pm_phase(model_dir, settings, work, a, head: str):
    import torch

    from cai.config.blocks import PreferenceModelConfig
    from cai.pm.build import build_trainer, fresh_pm
    from cai.pm.scoring import sequence_scores

    cfg = PreferenceModelConfig(
        head=head,
        backbone=str(model_dir),
        max_steps=a.steps,
        batch_size=a.batch,
        learning_rate=1e-5,
        max_length=a.length,
        save_steps=10**6,
    )
    model, tok = fresh_pm(cfg.backbone, cfg.head, settings)
    rows = [
        {
            "id": f"p{i}",
            "prompt_id": f"p{i}",
            "messages": e["prompt"],
            "p_a": 0.9,
            "response_a": e["completion"][0]["content"],
            "response_b": e["prompt"][0]["content"],
        }
        for i, e in enumerate(chat_examples(a.steps * a.batch, a.length // 8))
    ]
    before = snapshot(model)
    trainer = build_trainer(cfg, settings, model, tok, rows, work / f"pm-{head}", callbacks=[], loss=cfg.loss)
    trainer.train()
    n, total = changed(before, trainer.model)
    assert n >= 0.9 * total, f"pm-{head}: {n} of {total} trained tensors changed"
    ids = torch.tensor([tok("alpha yes")["input_ids"]], device=next(model.parameters()).device)
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16):
        scores = sequence_scores(trainer.model, ids, torch.ones_like(ids))
    assert scores.dtype == torch.float32, f"pm-{head}: scores are {scores.dtype}"
    return a.steps * a.batch * 2 * a.length


def ppo_phase(model_dir, settings, work, a, lora: bool, critic: str):
    import torch
    from accelerate import Accelerator

    from cai.config.fields import LoraConfig
    from cai.config.policy import PPOConfig
    from cai.rl.rewards import FunctionReward
    from cai.rl.trainer import PPOTrainer
    from cai.runtime.settings import Precision
    from cai.stages.policy import build_models

    cfg = PPOConfig(
        updates=a.updates,
        rollout_batch_size=a.batch,
        response_length=a.length // 2,
        ppo_epochs=2,
        learning_rate=1e-5,
        temperature=1.0,
        critic=critic,
        save_every=10**6,
        lora=LoraConfig(r=16, alpha=32) if lora else None,
    )
    device = settings.torch_device()
    policy, ref, value, tok = build_models(cfg, settings, str(model_dir), device)
    prompts = [{"messages": e["prompt"]} for e in chat_examples(4 * a.batch, a.length // 8)]
    # the share of distinct characters: it differs between any two unlike responses, so a rollout's rewards are
    # never all alike (a vowel count was 0 for every row of one, leaving nothing to learn from)
    reward = FunctionReward(lambda p, r, **k: [len(set(x)) / max(len(x), 1) for x in r])
    precision = Precision.of(settings)
    trainer = PPOTrainer(
        cfg,
        policy=policy,
        critic=value,
        ref_model=ref,
        tokenizer=tok,
        reward=reward,
        prompts=prompts,
        out_dir=work / f"ppo-{lora}-{critic}",
        seed=0,
        show_progress=False,
        precision=precision,
        accelerator=Accelerator(mixed_precision=precision.mixed, cpu=device == "cpu"),
    )
    trained = {n: p for n, p in trainer.policy.named_parameters() if p.requires_grad and "v_head" not in n}
    if lora:
        trained = {n: p for n, p in trained.items() if "lora_B" in n}
    before = {n: p.detach().clone() for n, p in trained.items()}
    rows = trainer.train()
    n = sum(not torch.equal(before[k], p.detach()) for k, p in trained.items())
    name = f"ppo-{'lora' if lora else 'full'}-{critic}"
    assert n >= 0.9 * len(trained), f"{name}: {n} of {len(trained)} trained tensors changed"
    for r in rows:
        kl = r["policy/first_step_approx_kl"]
        assert kl <= trainer.first_step_tolerance, f"{name}: first-step approx-KL {kl} over tolerance"
    return sum(r["response/length"] * a.batch for r in rows)


def packed_forward_phase(model_dir, settings, a, mode: str, seen: dict):
    """One policy forward over `a.packed_rows` left-padded rows: packed with one attention call per layer
    ('batched'), packed with one call per row ('loop', the fallback), or the padded batch ('padded'). The
    packed log-probs must match the padded ones (bf16 tolerance)."""
    import torch

    from cai.rl.modules import PolicyModel
    from cai.runtime import packing
    from cai.runtime.models import load_model

    device = settings.torch_device()
    model = PolicyModel(load_model(str(model_dir), settings)).eval()
    model.varlen = mode != "padded"
    rows, width = a.packed_rows, a.length
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=g)
    ids = torch.randint(5, 200, (rows, width), generator=g)
    mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()  # left padding
    old, packing.BATCHED_ATTENTION = packing.BATCHED_ATTENTION, mode != "loop"
    try:
        with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            out = model(ids.to(device), mask.to(device), width // 4, logprobs=True)
    finally:
        packing.BATCHED_ATTENTION = old
    lp = out["logprobs"].float().cpu()
    assert torch.isfinite(lp).all(), f"{mode} forward: non-finite log-probs"
    seen[mode] = lp
    if "padded" in seen and mode != "padded":
        gap = float((lp - seen["padded"]).abs().max())
        assert gap < 0.25, f"{mode} forward: log-probs differ from the padded ones by {gap:.3f}"
    return int(mask.sum())


def generation_phases(phases, model_dir, settings, a) -> None:
    """HF against vLLM on the same prompts through the one Engine (cai.runtime.generate); callable on its own."""
    from cai.runtime import vllm_engine
    from cai.runtime.generate import Engine, Sampling
    from cai.runtime.models import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    requests = [
        {"id": str(i), "messages": e["prompt"]} for i, e in enumerate(chat_examples(a.gen_prompts, 24))
    ]
    sampling = Sampling(max_new_tokens=a.gen_tokens, temperature=0.0)
    out = {}

    def run(backend: str, model):
        engine = Engine(model, tok, sampling, batch_size=a.gen_prompts, backend=backend, settings=settings)
        rows = engine.run(requests, show=False)
        assert all(r["new_tokens"] > 0 for r in rows), f"generate-{backend}: an empty response"
        out[backend] = rows
        return sum(r["new_tokens"] for r in rows)

    model = load_model(str(model_dir), settings).eval()
    phases.run("generate-hf", lambda: run("hf", model))
    model = None  # free the HF copy before vLLM starts
    if not vllm_engine.available():
        print("generate-vllm: skipped, vLLM is not installed (pip install -e '.[vllm]')", flush=True)
        return
    vllm_engine.start_for(str(model_dir), settings)  # engine start outside the timed phase (printed by vLLM)
    phases.run("generate-vllm", lambda: run("vllm", str(model_dir)))
    same = sum(x["text"] == y["text"] for x, y in zip(out["hf"], out["vllm"]))
    print(f"generate-vllm: {same} of {len(requests)} greedy responses equal HF's", flush=True)
    vllm_engine.release()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tiny", action="store_true", help="a tiny model on the CPU (checks the script, not a GPU)"
    )
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--updates", type=positive_int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--packed-rows", type=int, default=256)
    p.add_argument("--gen-prompts", type=int, default=256, help="prompts of the generation phases")
    p.add_argument(
        "--gen-tokens", type=int, default=128, help="new tokens per prompt in the generation phases"
    )
    p.add_argument("--out", help="write the table as JSON here")
    a = p.parse_args()
    import torch

    from cai.runtime.settings import Settings

    if a.tiny:
        a.steps, a.updates, a.batch, a.length, a.packed_rows = 2, 1, 4, 32, 16
        a.gen_prompts, a.gen_tokens = 8, 16
        settings = Settings(device="cpu", dtype="bfloat16")
    else:
        if not torch.cuda.is_available():
            print("no GPU: run with --tiny to check the script on the CPU", file=sys.stderr)
            return 2
        settings = Settings(device="cuda", dtype="bfloat16")
    phases = Phases(settings.torch_device())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model", SHAPES["tiny" if a.tiny else "0.5b"])
        phases.run("sft", lambda: sft_phase(model_dir, settings, work, a))
        for head in ("classifier", "value_head"):
            phases.run(f"pm-{head}", lambda h=head: pm_phase(model_dir, settings, work, a, h))
        for lora in (False, True):
            for critic in ("separate", "value_head"):
                name = f"ppo-{'lora' if lora else 'full'}-{critic}"
                phases.run(name, lambda lo=lora, c=critic: ppo_phase(model_dir, settings, work, a, lo, c))
        seen = {}
        for mode in ("padded", "batched", "loop"):
            phases.run(
                f"forward-{a.packed_rows}-{mode}",
                lambda m=mode: packed_forward_phase(model_dir, settings, a, m, seen),
            )
        if a.tiny:
            model_dir = build_model(work / "model-head64", SHAPES["tiny-head64"])
        generation_phases(phases, model_dir, settings, a)
    print("| phase | s | tokens/s | peak GiB | checks |\n|---|---:|---:|---:|---|")
    for r in phases.rows:
        print(f"| {r['phase']} | {r['seconds']} | {r['tokens_per_s']} | {r['peak_gib']} | {r['checks']} |")
    if a.out:
        Path(a.out).write_text(json.dumps(phases.rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
