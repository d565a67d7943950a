"""Preference pairs for the preference model: the seeded train / held-out split by prompt, tokenisation of both
sides of a pair through the chat template, and the held-out evaluation (accuracy, margin, soft loss; for a
value-head PM the LM loss on the preferred responses)."""

from __future__ import annotations

import random

from cai.pm.loss import pair_accuracy, pair_credit, preference_loss
from cai.pm.scoring import can_pack, conversation_ids, pair_scores, sequence_scores
from cai.runtime.forward import pad
from cai.stats import clustered_ci


def split_pairs(
    rows: list[dict], eval_fraction: float, seed: int, before: dict | None = None
) -> tuple[list[dict], list[dict]]:
    """Train/held-out split by prompt (all pairs of a prompt on one side), seeded. `before` is the split of the
    PM this one continues from (`pm_split.json`: its train and held-out prompt ids): its prompts keep their side,
    so nothing it trained on is held out now, and only prompts new to this split fill the held-out share."""
    ids = {r.get("prompt_id", r["id"]) for r in rows}
    n_eval = int(round(len(ids) * eval_fraction))
    if eval_fraction > 0 and n_eval == 0 and len(ids) > 1:
        n_eval = 1
    was_held = set(before["held_out_prompts"]) & ids if before else set()
    seen = (set(before["train_prompts"]) | was_held) if before else set()
    fresh = sorted(ids - seen)
    random.Random(f"{seed}:pm-split").shuffle(fresh)
    held = was_held | set(fresh[: max(n_eval - len(was_held), 0)])
    return [r for r in rows if r.get("prompt_id", r["id"]) not in held], [
        r for r in rows if r.get("prompt_id", r["id"]) in held
    ]


def split_record(train_rows: list[dict], held_rows: list[dict]) -> dict:
    """A PM's split as `pm_split.json` holds it: the prompt ids it trained on and those it held out."""
    return {
        "train_prompts": sorted({r.get("prompt_id", r["id"]) for r in train_rows}),
        "held_out_prompts": sorted({r.get("prompt_id", r["id"]) for r in held_rows}),
    }


def response_token_count(tokenizer, messages: list[dict], full_ids: list[int]) -> int:
    """How many of a conversation's final tokens are the assistant response (its header included): the tokens
    after the longest common prefix with the prompt rendered with the generation prompt."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(p_ids), len(full_ids)) and p_ids[n] == full_ids[n]:
        n += 1
    return len(full_ids) - n


def tokenise_pairs(tokenizer, rows: list[dict], max_length: int, response_len: bool = False) -> list[dict]:
    """Token ids of each pair's two conversations (left-truncated to max_length) and p_a; with `response_len`,
    also how many final tokens of each are the response (for the value-head PM's LM loss)."""
    out = []
    for r in rows:
        row = {"p_a": float(r["p_a"])}
        for side, key in (("a", "chosen"), ("b", "rejected")):
            conv = r["messages"] + [{"role": "assistant", "content": r[f"response_{side}"]}]
            full = conversation_ids(tokenizer, conv)
            ids = full[-max_length:]
            row[f"{key}_ids"] = ids
            if response_len:
                row[f"{key}_response_len"] = min(
                    response_token_count(tokenizer, r["messages"], full), len(ids)
                )
        out.append(row)
    return out


def held_out_eval(model, tokenizer, rows: list[dict], max_length: int, batch_size: int) -> dict:
    """Pair accuracy (against p_a > 0.5, over the `n_scored` of `n` pairs whose label is not 0.5) with its 95%
    interval clustered by prompt (`clusters`: the prompts of those pairs), mean margin and soft loss of a PM on
    pairs; for a value-head PM also `lm_loss`, the preferred responses' mean next-token NLL summed and divided by
    the number of pairs, a tie adding 0 (as the training loss has it), and `lm_tokens`."""
    import torch

    from cai.pm.value_head import ValueHeadPM, pair_lm_loss, preferred_rows, response_lm_labels

    if not rows:
        return {"n": 0}
    vh = isinstance(model, ValueHeadPM)
    toks = tokenise_pairs(tokenizer, rows, max_length, response_len=vh)
    was = model.training
    model.eval()
    seqs = [t["chosen_ids"] for t in toks] + [t["rejected_ids"] for t in toks]
    p_a = torch.tensor([t["p_a"] for t in toks])
    if vh:
        resp = torch.tensor(
            [t["chosen_response_len"] for t in toks] + [t["rejected_response_len"] for t in toks]
        )
        keep = preferred_rows(p_a)
    scores = torch.zeros(len(seqs))
    nll, n_tok = torch.zeros(len(seqs)), 0
    device = next(model.parameters()).device
    n = len(toks)
    packed = not vh and can_pack(model)
    with torch.no_grad():
        per = max(1, batch_size // 2)
        for s in range(0, n, per) if packed else ():  # each pair's conversation once (pair_scores)
            a, b = slice(s, min(s + per, n)), slice(n + s, n + min(s + per, n))
            ids, mask = pad(seqs[a] + seqs[b], tokenizer.pad_token_id, side="right")
            scores[a], scores[b] = pair_scores(model, ids.to(device), mask.to(device)).float().cpu().chunk(2)
        for s in range(0, len(seqs), batch_size) if not packed else ():
            chunk = seqs[s : s + batch_size]
            ids, mask = pad(chunk, tokenizer.pad_token_id, side="right")
            kwargs = {}
            if vh:
                sl = slice(s, s + len(chunk))
                kwargs["lm_labels"] = response_lm_labels(ids, mask, resp[sl], keep[sl]).to(device)
            out_scores, out = sequence_scores(
                model, ids.to(device), mask.to(device), return_output=True, **kwargs
            )
            scores[s : s + len(chunk)] = out_scores.float().cpu()
            if vh:
                nll[s : s + len(chunk)] = out.lm_nll.float().cpu()
                n_tok += int(out.lm_tokens.sum())
    model.train(was)
    r_a, r_b = scores[:n], scores[n:]
    scored = [i for i, p in enumerate(p_a.tolist()) if p != 0.5]  # those `accuracy` counts: 0.5 has no side
    credit = pair_credit(r_a, r_b, p_a).tolist()
    prompts = [rows[i].get("prompt_id", rows[i]["id"]) for i in scored]
    result = {
        "n": n,
        "n_scored": len(scored),
        "accuracy": pair_accuracy(r_a, r_b, p_a),
        # pairs of one prompt are not independent: the interval is clustered by prompt
        "ci95": list(clustered_ci([credit[i] for i in scored], prompts)) if scored else None,
        "clusters": len(set(prompts)),
        "mean_margin": float(((r_a - r_b) * torch.sign(p_a - 0.5)).mean()),
        "soft_loss": float(preference_loss(r_a, r_b, p_a)),
        "scores": scores.tolist(),
    }
    if vh:
        # as in training (pair_lm_loss): over every pair, a tie adding 0
        result.update(lm_loss=float(pair_lm_loss(nll, n)) if bool(keep.any()) else None, lm_tokens=n_tok)
    return result
