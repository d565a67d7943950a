"""Reading a model's probabilities of answer options: " (A)" / " (B)" after a multiple-choice prompt.

Options whose token sequences part at one token are read from one forward pass (the parting tokens' next-token
probabilities); others by their summed token log-probabilities. The probabilities are normalised over the
options. Used by the feedback labeller (cai.feedback.labeller) and the feedback-model evaluations (cai.eval.measure).
"""

from __future__ import annotations

import math

from cai.runtime import distributed as dist
from cai.runtime.forward import pad, position_ids, selected_logprobs
from cai.runtime.packing import (
    base_of,
    chunk_groups,
    keeps_logits,
    pack,
    takes_logits_to_keep,
    varlen_attention,
)

OPTION_LETTERS = "ABCDEFGHIJ"
PACKED = (
    True  # packed one-pass reads where the model allows; the benchmark turns it off to time the padded ones
)


def normalise(logps: list[float]) -> list[float]:
    """Softmax of option log-probabilities: each option's probability among the options."""
    m = max(logps)
    ex = [math.exp(x - m) for x in logps]
    s = sum(ex)
    return [x / s for x in ex]


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0):
    """log p(token_t | tokens_<t) for t = 1..T-1, shape [B, T-1]; logits are divided by `temperature`."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    # every position's logits as they are (no copy of a [B, T-1, V] slice); the last position predicts a stand-in
    # token and is dropped (its gradient is zero)
    nxt = input_ids.roll(-1, dims=1)
    return selected_logprobs(out.logits.float(), nxt, temperature)[:, :-1]


def joined_ids(tokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """(token ids of prompt + continuation, index of the continuation's first token), as the tokenizer splits
    the joined text: the continuation's tokens are the suffix after tokenize(prompt) when that is a prefix, else
    tokenize(continuation) appended to tokenize(prompt)."""
    # A prompt's trailing spaces belong to the continuation's first token in BPE vocabularies (" (A)"), so
    # "...is: " + "(A)" is split as "...is:" + " (A)".
    core = prompt.rstrip(" ")
    if core != prompt and continuation and not continuation[0].isspace():
        prompt, continuation = core, prompt[len(core) :] + continuation
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
        full = p_ids + tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return full, len(p_ids)


def continuation_logprob(model, tokenizer, prompts: list[str], continuations: list[str], batch_size: int = 8):
    """Sum of log p(continuation | prompt) for each (prompt, continuation), robust to tokenizer merges at the
    boundary: the continuation's tokens are the suffix of tokenize(prompt + continuation) after tokenize(prompt)
    when that is a prefix, else tokenize(continuation) appended to tokenize(prompt)."""
    import torch

    device = next(model.parameters()).device
    seqs, starts = [], []
    for p, c in zip(prompts, continuations):
        full, start = joined_ids(tokenizer, p, c)
        seqs.append(full)
        starts.append(start)
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk, st = seqs[i : i + batch_size], starts[i : i + batch_size]
            T = max(len(s) for s in chunk)
            ids, mask = pad(chunk, tokenizer.pad_token_id)
            lp = token_logprobs(model, ids.to(device), mask.to(device))
            for j, s in enumerate(chunk):
                offset = T - len(s)
                # token k of the sequence (k >= start) is predicted at logprob index offset + k - 1
                out.append(float(lp[j, offset + st[j] - 1 : offset + len(s) - 1].sum()))
    return out


def option_continuations(tokenizer, prompt: str, n: int = 2) -> list[str]:
    """ " (A)", " (B)", ... after a prompt ending in non-space; "(A)", ... after one ending in a space."""
    sep = "" if prompt[-1:].isspace() else " "
    return [f"{sep}({OPTION_LETTERS[i]})" for i in range(n)]


def option_token_ids(tokenizer, prompt: str, option: str) -> list[int]:
    """Token ids of prompt + option as `continuation_logprob` splits them (the prompt's trailing spaces
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
    groups: list[list[int]] | None = None,
) -> list[list[float]]:
    """For each prompt, the model's probabilities of its options, normalised over the options.

    Options that part at one token (" (A)" / " (B)") are read from one forward pass of the prompt and their
    common prefix: the probabilities of the parting tokens (the option letters). Other options, or every
    option with `exact`, are scored by their summed token log-probabilities (`continuation_logprob`).
    Where the model allows, the one-pass reads are packed (cai.runtime.packing): no padding, and prompts named
    together in `groups` (lists of prompt indices: one pair's option orders and principles) compute their
    shared beginning once. Otherwise requests are sorted by length to pad less.

    With `shard`, a collective call under several processes (every rank passes the same prompts): rank r scores
    every W-th batch and the log-probabilities are gathered, so each rank returns what one process would, from
    the very same batches.
    """
    from tqdm.auto import tqdm

    W, rank = (dist.world_size(), dist.rank()) if shard else (1, 0)
    split = [None if exact else shared_prefix(tokenizer, p, o) for p, o in zip(prompts, options)]
    fast = [i for i, sp in enumerate(split) if sp is not None]
    flat = [(i, p, o) for i, (p, opts) in enumerate(zip(prompts, options)) if split[i] is None for o in opts]
    order = sorted(range(len(flat)), key=lambda k: -len(flat[k][1]) - len(flat[k][2]))
    fast_batches = _fast_batches(model, split, fast, groups, batch_size)[rank::W]
    flat_batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)][rank::W]
    bar = tqdm(
        total=sum(len(g) for c in fast_batches for g in c) + sum(map(len, flat_batches)),
        desc=desc or "score options",
        unit="seq",
        disable=desc is None or rank != 0,
        dynamic_ncols=True,
    )
    fast_logps: dict[int, list[float]] = {}  # prompt index -> option log-probs
    for chunk in fast_batches:
        rows = _next_token_logprobs(model, tokenizer, [[split[i][0] for i in g] for g in chunk])
        flat_chunk = [i for g in chunk for i in g]
        for i, row in zip(flat_chunk, rows):
            fast_logps[i] = [float(row[t]) for t in split[i][1]]
        bar.update(len(flat_chunk))
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


def _fast_batches(model, split, fast: list[int], groups, batch_size: int) -> list[list[list[int]]]:
    """Batches of groups of one-pass prompts: packed, the groups as given (the rest alone); padded, one prompt
    per group, longest first."""
    if not packable(model):
        fast = sorted(fast, key=lambda i: -len(split[i][0]))
        return [[[i] for i in fast[s : s + batch_size]] for s in range(0, len(fast), batch_size)]
    todo = set(fast)
    given = [[i for i in g if i in todo] for g in groups or []]
    seen = {i for g in given for i in g}
    given = [g for g in given if g] + [[i] for i in fast if i not in seen]
    given.sort(key=lambda g: -max(len(split[i][0]) for i in g))  # longest first: chunks alike in length
    return list(chunk_groups(given, batch_size))


def packable(model) -> bool:
    """Whether next-token reads may run packed: a plain decoder whose forward keeps chosen logits
    (cai.runtime.packing)."""
    return PACKED and keeps_logits(model)


def _next_token_logprobs(model, tokenizer, groups: list[list[list[int]]]):
    """log p(next token | seq) for each token sequence, in group order, as a [B, V] tensor on the CPU: one
    packed forward (each group's shared beginning once), or a left-padded batch."""
    import torch

    device = next(model.parameters()).device
    if packable(model):  # the model's own forward on the packed row, logits at each sequence's end only
        packed = pack(groups, device)
        last = torch.tensor([int(w[-1]) for w in packed.where], device=device)
        with torch.no_grad(), varlen_attention(model):
            out = base_of(model)(
                input_ids=packed.ids,
                position_ids=packed.positions,
                use_cache=False,
                cai_packing=packed.packing,
                logits_to_keep=last,
            )
        return torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
    seqs = [s for g in groups for s in g]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, T - len(s) :] = torch.tensor(s)
        mask[j, T - len(s) :] = 1
    kwargs = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    with torch.no_grad():
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids(mask).to(device),
            **kwargs,
        )
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
