"""Rollout helpers for the PPO loop: the batch record, which prompts each process takes, stop-string
truncation, statistics over all processes, and the log of sampled responses (samples.jsonl)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.hashing import derive_seed
from cai.runtime import distributed as dist
from cai.runtime.decode import text_before_stop
from cai.runtime.generate import Generated, Sampling


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


def encode_prompt(tokenizer, messages: list[dict], max_prompt_length: int) -> list[int]:
    """A prompt's token ids as every rollout samples it: the chat template with the assistant's turn opened, cut
    to its last `max_prompt_length` tokens (the on-policy trainers, DPO's probe, the report's KL)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_length:]


def seed_of(*parts) -> int:
    """A 32-bit seed derived from any values (the same on every machine)."""
    return derive_seed(repr(parts))


def row_seeds(seed: int, update: int, n: int) -> list[int]:
    """The sampling seeds of this process's `n` rollout rows in an update: each from the row's place in the
    global batch (rank r holds places r·n to r·n + n - 1), the same whatever the number of processes."""
    return [seed_of(seed, "sample", update, dist.rank() * n + j) for j in range(n)]


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


def sample(backend, prompts: list[list[int]], cfg, seeds, *, with_logits: bool, autocast, device):
    """Sample responses to `prompts` (token ids) as a ppo block says, in generate calls of
    `generation_batch_size` rows. `seeds`: one seed per prompt (`row_seeds`): each row samples from its own seed,
    so its text does not depend on which rows share its generate call, nor on the number of processes. Returns
    (generation, decoded texts, response mask [B, R] (float), finished [B], input ids and attention mask of
    prompt + response [B, P + R])."""
    sampling = Sampling(
        max_new_tokens=cfg.response_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop_strings=(cfg.stop_string,) if cfg.stop_string else (),
    )
    size = cfg.generation_batch_size or cfg.rollout_batch_size
    parts = [
        backend.generate_ids(
            prompts[s : s + size], sampling, seeds[s : s + size], with_logits=with_logits, autocast=autocast
        )
        for s in range(0, len(prompts), size)
    ]
    gen = parts[0] if len(parts) == 1 else Generated.concat(parts, backend.tokenizer.pad_token_id)
    texts, mask, finished = cut_at_stop(backend.tokenizer, gen, cfg.stop_string)
    R = max(int(mask.sum(1).max()), 1)
    resp, mask = gen.response_ids[:, :R].to(device), mask[:, :R].to(device).float()
    input_ids = torch.cat([gen.prompt_ids.to(device), resp], 1)
    attn = torch.cat([gen.prompt_mask.to(device), mask.long()], 1)
    return gen, texts, mask, finished, input_ids, attn


def cut_at_stop(tokenizer, gen, stop: str | None):
    """(decoded texts, response mask, finished flags) of a cai.generate.Generated batch, truncated at `stop`:
    the tokens up to the one that completes the stop string are kept, and such a response counts as finished.
    The stop string is looked for as the engine's backends look for it (cai.runtime.decode.text_before_stop)."""
    mask, finished = gen.response_mask.clone(), gen.finished.clone()
    texts = []
    for j in range(mask.shape[0]):
        n = int(mask[j].sum())
        text, k = text_before_stop(tokenizer, gen.response_ids[j, :n].tolist(), (stop,) if stop else ())
        if k is not None:
            mask[j, k:] = 0
            finished[j] = True
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
