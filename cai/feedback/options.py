"""Reading a model's probabilities of answer options: " (A)" / " (B)" after a multiple-choice prompt.

Options whose token sequences part at one token are read from one forward pass (the parting tokens' next-token
probabilities); others by their summed token log-probabilities. The probabilities are normalised over the
options. Used by the feedback labeller (cai.feedback.labeller) and the feedback-model evaluations (cai.eval.measure).
"""

from __future__ import annotations

import math

from cai.runtime import distributed as dist
from cai.runtime.forward import continuation_logprob, joined_ids, position_ids

OPTION_LETTERS = "ABCDEFGHIJ"


def normalise(logps: list[float]) -> list[float]:
    """Softmax of option log-probabilities: each option's probability among the options."""
    m = max(logps)
    ex = [math.exp(x - m) for x in logps]
    s = sum(ex)
    return [x / s for x in ex]


def option_continuations(tokenizer, prompt: str, n: int = 2) -> list[str]:
    """ " (A)", " (B)", ... after a prompt ending in non-space; "(A)", ... after one ending in a space."""
    sep = "" if prompt[-1:].isspace() else " "
    return [f"{sep}({OPTION_LETTERS[i]})" for i in range(n)]


def option_token_ids(tokenizer, prompt: str, option: str) -> list[int]:
    """Token ids of prompt + option as cai.scoring.continuation_logprob splits them (the prompt's trailing spaces
    go with the option, and the tokenizer's own merge at the boundary is kept)."""

    return joined_ids(tokenizer, prompt, option)[0]


def shared_prefix(tokenizer, prompt: str, options: list[str]) -> tuple[list[int], list[int]] | None:
    """(common token prefix, the distinct next token of each option) when the options' token sequences part at
    one token (" (A)" vs " (B)" part at "A"/"B"); else None."""
    seqs = [option_token_ids(tokenizer, prompt, o) for o in options]
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    if any(len(s) <= n for s in seqs):
        return None
    nexts = [s[n] for s in seqs]
    return (seqs[0][:n], nexts) if len(set(nexts)) == len(nexts) else None


def option_probs(
    model,
    tokenizer,
    prompts: list[str],
    options: list[list[str]],
    batch_size: int = 8,
    desc: str | None = None,
    exact: bool = False,
    shard: bool = False,
) -> list[list[float]]:
    """For each prompt, the model's probabilities of its options, normalised over the options.

    Options that part at one token (" (A)" / " (B)") are read from one forward pass of the prompt and their
    common prefix: the probabilities of the parting tokens (the option letters). Other options, or every
    option with `exact`, are scored by their summed token log-probabilities (cai.scoring.continuation_logprob).
    Requests are sorted by length to pad less.

    With `shard`, a collective call under several processes (every rank passes the same prompts): rank r scores
    every W-th batch and the log-probabilities are gathered, so each rank returns what one process would, from
    the very same batches.
    """
    from tqdm.auto import tqdm

    W, rank = (dist.world_size(), dist.rank()) if shard else (1, 0)
    split = [None if exact else shared_prefix(tokenizer, p, o) for p, o in zip(prompts, options)]
    fast = [i for i, sp in enumerate(split) if sp is not None]
    flat = [(i, p, o) for i, (p, opts) in enumerate(zip(prompts, options)) if split[i] is None for o in opts]
    fast.sort(key=lambda i: -len(split[i][0]))
    order = sorted(range(len(flat)), key=lambda k: -len(flat[k][1]) - len(flat[k][2]))
    fast_batches = [fast[s : s + batch_size] for s in range(0, len(fast), batch_size)][rank::W]
    flat_batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)][rank::W]
    bar = tqdm(
        total=sum(map(len, fast_batches + flat_batches)),
        desc=desc or "score options",
        unit="seq",
        disable=desc is None or rank != 0,
        dynamic_ncols=True,
    )
    fast_logps: dict[int, list[float]] = {}  # prompt index -> option log-probs
    for chunk in fast_batches:
        rows = _next_token_logprobs(model, tokenizer, [split[i][0] for i in chunk])
        for i, row in zip(chunk, rows):
            fast_logps[i] = [float(row[t]) for t in split[i][1]]
        bar.update(len(chunk))
    scores: dict[int, float] = {}  # index into flat -> summed log-prob
    for chunk in flat_batches:
        lps = continuation_logprob(
            model, tokenizer, [flat[k][1] for k in chunk], [flat[k][2] for k in chunk], batch_size
        )
        scores.update(zip(chunk, lps))
        bar.update(len(chunk))
    bar.close()
    if W > 1:
        parts = dist.gather_objects((fast_logps, scores))
        fast_logps = {i: v for part in parts for i, v in part[0].items()}
        scores = {k: v for part in parts for k, v in part[1].items()}
    logps = dict(fast_logps)
    for k, (i, _, _) in enumerate(flat):
        logps.setdefault(i, []).append(scores[k])
    return [normalise(logps[i]) for i in range(len(prompts))]


def _next_token_logprobs(model, tokenizer, seqs: list[list[int]]):
    """log p(next token | seq) for each token sequence (left-padded batch), as a [B, V] tensor on the CPU."""
    import torch

    device = next(model.parameters()).device
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, T - len(s) :] = torch.tensor(s)
        mask[j, T - len(s) :] = 1
    kwargs = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    with torch.no_grad():
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids(mask).to(device),
            **kwargs,
        )
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (HF causal LMs do; it saves the full-vocab projection)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
