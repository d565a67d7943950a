"""Stage `feedback` (RL-CAI): sample k responses per training prompt, pair them, and label each pair with the
feedback model's soft preference (cai.feedback.labeller) under principles sampled from the feedback
constitution. Before labelling, a labeller check measures the feedback model's agreement with human labels on
an HH check set, so a run shows whether its labels carry any signal. The steps live in cai.feedback.pairs.

Outputs (RUN/feedback/): responses.jsonl, pairs.jsonl, check.json, stats.json. Both JSONL files are written
batch by batch and a rerun continues where it stopped. With arms that share the sampled responses, they are
sampled once into a shared folder (ctx.shared_path) and copied here.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from cai.config.fields import merged_generation
from cai.constitution.fewshot import feedback_examples
from cai.constitution.schema import load_constitution
from cai.data.hh import human_pairs
from cai.errors import UserError
from cai.feedback.labeller import build_labeller
from cai.feedback.pairs import form_pairs, label_pairs, labeller_check, pair_stats, sample_responses
from cai.runtime import distributed as dist
from cai.runtime.models import load_for_inference
from cai.runtime.rundir import append_jsonl, read_jsonl, rewrite_jsonl, write_json


def policy_ref(ctx) -> str:
    """The model that samples the responses: the SFT output, the base policy, or a model named by the recipe."""
    which = ctx.config.feedback.policy
    if which == "sft":
        return str(ctx.input_dir("sft") / "model")
    if which == "base":
        return ctx.config.models.policy
    return which


def run(ctx) -> Path:
    c, cfg, seed = ctx.config, ctx.config.feedback, ctx.config.settings.seed
    t0 = time.time()
    prompts_file = ctx.input_dir("critique_revise") / "prompts.jsonl"
    prompts = read_jsonl(prompts_file)
    if not prompts:
        raise UserError(f"{prompts_file}: no training prompts")
    gen = merged_generation(c.generation, cfg.generation)
    shared = ctx.shared_path("responses.jsonl")
    k = cfg.responses_per_prompt
    responses = sample_responses(policy_ref(ctx), c.settings, gen, prompts, k, shared, cfg.policy)
    local = ctx.out_dir / "responses.jsonl"
    if shared != local and dist.is_main():
        rewrite_jsonl(local, responses)
    constitution = load_constitution(c.feedback_constitution)
    pairs, identical = form_pairs(
        prompts, responses, k, cfg.max_pairs_per_prompt, random.Random(f"{seed}:pairs")
    )
    prin_rng = random.Random(f"{seed}:principles")
    principles = [constitution.sample(prin_rng, cfg.num_principles) for _ in pairs]  # fixed before resuming

    model, tok = load_for_inference(c.models.feedback, c.settings)
    labeller = build_labeller(
        model,
        tok,
        cfg,
        seed,
        feedback_examples(cfg, constitution),
        cot_max_new_tokens=gen.max_new_tokens,
        backend=gen.backend,
        settings=c.settings,
        memory=gen.vllm_memory,
    )
    check_rng = random.Random(f"{seed}:check-principles")
    check = labeller_check(
        labeller,
        cfg.check_set,
        seed,
        lambda: constitution.sample(check_rng, cfg.num_principles),
        ctx.out_dir / "check.json",
    )
    out = ctx.out_dir / "pairs.jsonl"
    label_pairs(labeller, pairs, principles, out)
    if (
        cfg.human_mix is not None
        and dist.is_main()
        and not any(r.get("source") == "human" for r in read_jsonl(out))
    ):
        append_jsonl(out, human_pairs(cfg.human_mix.path, cfg.human_mix.ratio, len(pairs), seed))

    stats = pair_stats(
        read_jsonl(out), n_prompts=len(prompts), n_responses=len(responses), identical=identical
    )
    stats.update(
        seconds=round(time.time() - t0, 1), feedback_model=c.models.feedback, policy=cfg.policy, check=check
    )
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
