"""Rollout helpers for the PPO loop: the batch record, which prompts each process takes, stop-string
truncation, statistics over all processes, and the log of sampled responses (samples.jsonl)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cai.runtime import distributed as dist
from cai.runtime.hashing import derive_seed
from cai.runtime.rundir import append_jsonl

SAMPLES = "samples.jsonl"


@dataclass
class Rollout:
    """One process's batch: token tensors [B, P+R], per-token tensors [B, R] and per-sequence tensors [B]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor  # response tokens (float)
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict


def seed_of(*parts) -> int:
    """A 32-bit seed derived from any values (the same on every machine)."""
    return derive_seed(repr(parts))


def prompt_indices(n_prompts: int, batch: int, update: int, seed: int) -> list[int]:
    """This process's prompt indices for an update: the global stream runs through seeded permutations of the
    prompts (one per epoch); each update takes `batch` × world size of it, and each rank its own slice."""
    W = dist.world_size()
    start = update * batch * W + dist.rank() * batch
    out = []
    for k in range(start, start + batch):
        epoch, pos = divmod(k, n_prompts)
        g = torch.Generator().manual_seed(seed_of(seed, "prompts", epoch))
        out.append(int(torch.randperm(n_prompts, generator=g)[pos]))
    return out


def cut_at_stop(tokenizer, gen, stop: str | None):
    """(decoded texts, response mask, finished flags) of a cai.generate.Generated batch, truncated at `stop`:
    the tokens up to the one that completes the stop string are kept, and such a response counts as finished."""
    mask, finished = gen.response_mask.clone(), gen.finished.clone()
    texts = []
    for j in range(mask.shape[0]):
        n = int(mask[j].sum())
        ids = gen.response_ids[j, :n].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if stop and stop in text:
            k = next(
                k for k in range(1, n + 1) if stop in tokenizer.decode(ids[:k], skip_special_tokens=True)
            )
            mask[j, k:] = 0
            finished[j] = True
            text = text[: text.index(stop)]
        texts.append(text.strip())
    return texts, mask, finished


def global_stats(x: torch.Tensor, mask: torch.Tensor):
    """(mean, unbiased variance) of the masked entries over all processes (for whitening)."""
    m = mask.to(x.dtype)
    s = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()
    s = dist.all_reduce_sum(s)
    n = s[2].clamp(min=1)
    mean = s[0] / n
    var = (s[1] / n - mean**2).clamp(min=0) * n / (n - 1).clamp(min=1)
    return mean.to(x.dtype), var.to(x.dtype)


def write_samples(out_dir, update: int, prompt_ids: list[str], texts: list[str], raw) -> None:
    """Append an update's sampled responses with their raw scores to out_dir/samples.jsonl, one row each
    {i (its place in the update's batch), update (as metrics.jsonl counts it), prompt_id, response, score}: every
    process's rows, written by the main one. The report checks them for length and scores them with the gold
    judge."""
    rows = [
        {"update": update + 1, "prompt_id": p, "response": t, "score": float(s)}
        for p, t, s in zip(prompt_ids, texts, raw.tolist())
    ]
    rows = [{"i": i, **r} for i, r in enumerate(r for part in dist.gather_objects(rows) for r in part)]
    if dist.is_main():
        append_jsonl(Path(out_dir) / SAMPLES, rows)
