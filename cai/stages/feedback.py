"""Stage `feedback` (RL-CAI): sample k responses per training prompt, pair them, and label each pair with the
feedback model's soft preference (cai.labels). Before labelling, a labeller check measures the feedback model's
agreement with human labels on an HH check set, so a run shows whether its labels carry any signal.

Outputs (RUN/feedback/): responses.jsonl, pairs.jsonl, check.json, stats.json. Both JSONL files are written
batch by batch and a rerun continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

from cai import distributed as dist
from cai.errors import UserError
from cai.rundir import append_jsonl, read_jsonl, repair_jsonl, write_json
from cai.yamlio import iter_jsonl

LABEL_CHUNK = 32  # pairs labelled (and appended to pairs.jsonl) at a time


def read_hh(path: str | Path) -> list[dict]:
    """HH preference rows ({"chosen", "rejected"}) from a .jsonl or .jsonl.gz file; errors name file:line."""
    rows = []
    for n, row in iter_jsonl(path, "an object with 'chosen' and 'rejected' transcripts"):
        if "chosen" not in row or "rejected" not in row:
            raise UserError(f"{path}:{n}: an object with 'chosen' and 'rejected' transcripts is expected")
        rows.append(row)
    return rows


def policy_ref(ctx) -> str:
    which = ctx.recipe.feedback.policy
    if which == "sft":
        return str(ctx.input_dir("sft") / "model")
    if which == "base":
        return ctx.recipe.models.policy
    return which


def feedback_constitution(recipe):
    from cai.constitution import load_constitution

    return load_constitution(recipe.feedback_constitution or recipe.constitution)


def few_shot_examples(recipe, constitution) -> list[dict]:
    from cai.labels import load_feedback_few_shot

    cfg = recipe.feedback
    path = cfg.few_shot or constitution.few_shot.feedback
    if not path or cfg.num_few_shot == 0:
        return []
    return load_feedback_few_shot(path)[: cfg.num_few_shot]


def sample_responses(ctx, prompts: list[dict]) -> list[dict]:
    """k responses per prompt from the policy through the one Engine, streamed to the shared responses file."""
    from cai.config import merged_generation
    from cai.generate import Engine, Sampling
    from cai.models import load_for_inference

    r, cfg = ctx.recipe, ctx.recipe.feedback
    ref = policy_ref(ctx)
    gen = merged_generation(r.generation, cfg.generation)
    model, tok = load_for_inference(ref, r)
    engine = Engine(
        model, tok, Sampling.from_config(gen), batch_size=gen.batch_size, seed=r.seed, backend=gen.backend
    )
    requests = [
        {
            "id": f"{p['id']}#{j}",
            "messages": p["messages"],
            "meta": {"prompt_id": p["id"], "policy": cfg.policy},
        }
        for p in prompts
        for j in range(cfg.responses_per_prompt)
    ]
    rows = engine.run(requests, out_path=ctx.shared_path("responses.jsonl"), desc="feedback: sample")
    local = ctx.out_dir / "responses.jsonl"
    if ctx.shared_path("responses.jsonl") != local and dist.is_main():
        local.unlink(missing_ok=True)
        append_jsonl(local, rows)
    return rows


def form_pairs(
    prompts: list[dict], responses: list[dict], k: int, max_pairs: int, rng: random.Random
) -> tuple[list[dict], int]:
    """Up to `max_pairs` pairs per prompt from its k responses; identical responses are skipped (returned count)."""
    by_id = {row["id"]: row for row in responses}
    pairs, identical = [], 0
    for p in prompts:
        texts = [by_id[f"{p['id']}#{j}"]["text"] for j in range(k)]
        combos = list(itertools.combinations(range(k), 2))
        rng.shuffle(combos)
        kept = 0
        for i, j in combos:
            if kept == max_pairs:
                break
            if texts[i].strip() == texts[j].strip():
                identical += 1
                continue
            if rng.random() < 0.5:
                i, j = j, i
            pairs.append(
                {
                    "id": f"{p['id']}:{i}-{j}",
                    "prompt_id": p["id"],
                    "kind": p.get("kind"),
                    "category": p.get("category"),
                    "messages": p["messages"],
                    "response_a": texts[i],
                    "response_b": texts[j],
                }
            )
            kept += 1
    return pairs, identical


def run_check(ctx, labeller, sample_principles) -> dict | None:
    """The labeller check on the recipe's HH check set; writes check.json and prints a plain warning if needed."""
    from cai.labels import check_warning, hh_check

    cs = ctx.recipe.feedback.check_set
    if cs is None:
        return None
    path = ctx.out_dir / "check.json"
    if path.is_file():
        check = json.loads(path.read_text())
    else:
        rows = read_hh(cs.path)
        rng = random.Random(f"{ctx.recipe.seed}:check")
        rows = rng.sample(rows, min(cs.limit, len(rows)))
        t0 = time.time()
        # every rank takes part and scores its share; rank 0 writes the (one-process) result
        check = hh_check(labeller, rows, sample_principles, rng, desc="feedback: labeller check", shard=True)
        check.update(path=cs.path, seconds=round(time.time() - t0, 1))
        check["warning"] = check_warning(check)
        if dist.is_main():
            write_json(path, check)
    if check.get("warning") and dist.is_main():
        print(f"[cai] feedback: WARNING: {check['warning']}", flush=True)
    return check


def human_pairs(path, ratio: float, n_ai: int, seed: int) -> list[dict]:
    """round(ratio·n_ai) human pairs from an HH file, chosen reply as response_a with p_a = 1.0."""
    from cai.prompts import split_hh_pair

    rows = read_hh(path)
    rng = random.Random(f"{seed}:human_mix")
    rng.shuffle(rows)
    out = []
    for n, row in enumerate(rows):
        if len(out) >= round(ratio * n_ai):
            break
        try:
            messages, chosen, rejected = split_hh_pair(row)
        except ValueError:
            continue
        out.append(
            {
                "id": f"human-{n}",
                "prompt_id": f"human-{n}",
                "kind": "human",
                "messages": messages,
                "response_a": chosen,
                "response_b": rejected,
                "p_a": 1.0,
                "source": "human",
            }
        )
    return out


def run(ctx) -> Path:
    from cai.labels import Labeller, PairToLabel
    from cai.models import load_for_inference

    r, cfg = ctx.recipe, ctx.recipe.feedback
    t0 = time.time()
    prompts = read_jsonl(ctx.input_dir("critique_revise") / "prompts.jsonl")
    if not prompts:
        raise UserError(f"{ctx.input_dir('critique_revise') / 'prompts.jsonl'}: no training prompts")
    responses = sample_responses(ctx, prompts)
    constitution = feedback_constitution(r)
    pairs, identical = form_pairs(
        prompts,
        responses,
        cfg.responses_per_prompt,
        cfg.max_pairs_per_prompt,
        random.Random(f"{r.seed}:pairs"),
    )
    prin_rng = random.Random(f"{r.seed}:principles")
    principles = [constitution.sample(prin_rng, cfg.num_principles) for _ in pairs]  # fixed before resuming

    ref = r.models.feedback or r.models.policy
    model, tok = load_for_inference(ref, r)
    engine = None
    if cfg.chain_of_thought:
        from cai.config import merged_generation
        from cai.generate import Engine, Sampling

        gen = merged_generation(r.generation, cfg.generation)
        engine = Engine(
            model,
            tok,
            Sampling(max_new_tokens=gen.max_new_tokens, temperature=0.0),
            batch_size=cfg.score_batch_size,
            seed=r.seed,
            backend=gen.backend,
        )
    labeller = Labeller(
        model,
        tok,
        both_orders=cfg.both_orders,
        chain_of_thought=cfg.chain_of_thought,
        cot_clamp=tuple(cfg.cot_clamp),
        few_shot=few_shot_examples(r, constitution),
        batch_size=cfg.score_batch_size,
        seed=r.seed,
        engine=engine,
    )

    check_rng = random.Random(f"{r.seed}:check-principles")
    check = run_check(ctx, labeller, lambda: constitution.sample(check_rng, cfg.num_principles))

    out = ctx.out_dir / "pairs.jsonl"
    repair_jsonl(out)
    done = {row["id"] for row in read_jsonl(out)}
    todo = [i for i, p in enumerate(pairs) if p["id"] not in done]
    chunks = [todo[s : s + LABEL_CHUNK] for s in range(0, len(todo), LABEL_CHUNK)]
    for n, chunk in enumerate(chunks):  # all ranks label each chunk together (sharded); rank 0 appends it
        results = labeller.label(
            [
                PairToLabel(
                    pairs[i]["id"], pairs[i]["messages"], pairs[i]["response_a"], pairs[i]["response_b"]
                )
                for i in chunk
            ],
            [principles[i] for i in chunk],
            desc=f"feedback: label {n + 1}/{len(chunks)}",
            shard=True,
        )
        if dist.is_main():
            append_jsonl(
                out, [{**pairs[i], **res.to_dict(), "source": "ai"} for i, res in zip(chunk, results)]
            )
    if (
        cfg.human_mix is not None
        and dist.is_main()
        and not any(row.get("source") == "human" for row in read_jsonl(out))
    ):
        append_jsonl(out, human_pairs(cfg.human_mix.path, cfg.human_mix.ratio, len(pairs), r.seed))

    stats = pair_stats(
        read_jsonl(out), n_prompts=len(prompts), n_responses=len(responses), identical=identical
    )
    stats.update(seconds=round(time.time() - t0, 1), feedback_model=ref, policy=cfg.policy, check=check)
    if dist.is_main():
        write_json(ctx.out_dir / "stats.json", stats)
    ctx.summary.update({k: stats[k] for k in ("pairs", "mean_p_a", "mean_confidence", "mean_order_gap")})
    if check is not None:
        ctx.summary.update(
            labeller_agreement=check["agreement"],
            labeller_agreement_ci95=check["ci95"],
            labeller_order_gap=check["mean_order_gap"],
            labeller_warning=check.get("warning"),
        )
    return ctx.out_dir


def pair_stats(rows: list[dict], n_prompts: int, n_responses: int, identical: int) -> dict:
    ai = [row for row in rows if row.get("source") != "human"]
    p = [row["p_a"] for row in ai]
    n = max(len(p), 1)
    per_principle: dict[str, int] = {}
    for row in ai:
        for pid in row.get("principle_ids", []):
            per_principle[pid] = per_principle.get(pid, 0) + 1
    return {
        "prompts": n_prompts,
        "responses": n_responses,
        "pairs": len(ai),
        "human_pairs": len(rows) - len(ai),
        "identical_skipped": identical,
        "mean_p_a": sum(p) / n,
        "mean_confidence": sum(abs(x - 0.5) for x in p) / n,  # 0: no preference, 0.5: certain
        "share_a_preferred": sum(x > 0.5 for x in p) / n,
        "mean_order_gap": sum(row.get("order_gap", 0.0) for row in ai) / n,
        "principle_counts": dict(sorted(per_principle.items())),
    }
