"""Iterated online RLAIF (`policy.rounds`), after the HH-RLHF paper's online training and the CAI paper's labels
of RL-policy samples: round 1 is the policy stage as usual (against RUN/preference_model); before each later
round r, the policy that round r − 1 ended with samples fresh response pairs, the feedback model labels them under
the feedback constitution, and the PM of round r − 1 trains further on the new pairs together with all the old
ones (and the PM block's human_data mix); a prompt keeps the side of the train/held-out split it had for that PM
(its pm_split.json), so nothing it trained on is held out to measure the next. The policy then continues from
its checkpoint against the new PM. The steps are the feedback stage's (cai.feedback.pairs) and the
preference_model stage's (cai.pm.build).

Layout in the policy stage's folder: rounds/round-<r>/round.json (what the round did, its status), and for a
round after the first responses.jsonl, pairs.jsonl, pm/ (checkpoints/, metrics.jsonl, model/); each round but the
last keeps the policy it ended with in rounds/round-<r>/policy/ (the last one's is the stage's policy/). A round
records the hash of the policy folder it sampled from (`sampled_from`, the same content hash a stage's output id
is). Every step resumes after a kill: sampling and labelling continue their JSONL files, the PM its checkpoints,
the policy its own; a round marked complete is not run again.
"""

from __future__ import annotations

import random
from pathlib import Path

from cai.config.fields import merged_generation
from cai.constitution.fewshot import feedback_examples
from cai.constitution.schema import load_constitution
from cai.data.hh import human_pairs
from cai.feedback.labeller import build_labeller
from cai.feedback.pairs import form_pairs, label_pairs, pair_stats, sample_responses
from cai.hashing import derive_seed, hash_outputs
from cai.pm.build import SPLIT_FILE, responses_of, train_pm
from cai.pm.pairs import held_out_eval, split_pairs
from cai.pm.scoring import RewardScorer
from cai.runtime import distributed as dist
from cai.runtime import vllm_engine
from cai.runtime.models import load_for_inference
from cai.runtime.rundir import MetricsLog, read_json, read_jsonl, write_json

ROUND_FILE = "round.json"


def round_dir(out_dir: Path, r: int) -> Path:
    return Path(out_dir) / "rounds" / f"round-{r}"


def read_round(out_dir: Path, r: int) -> dict:
    return read_json(round_dir(out_dir, r) / ROUND_FILE) or {}


def update_round(out_dir: Path, r: int, **fields) -> dict:
    """Set fields of a round's record (the main process writes it)."""
    rec = {**read_round(out_dir, r), "round": r, **fields}
    if dist.is_main():
        write_json(round_dir(out_dir, r) / ROUND_FILE, rec)
    return rec


def is_complete(out_dir: Path, r: int) -> bool:
    return read_round(out_dir, r).get("status") == "complete"


def _rel(path: Path, base: Path) -> str:
    """`path` relative to `base` where it lies below it (round records must not depend on the checkout's place)."""
    try:
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return str(path)


def folder_hash(folder: Path) -> str:
    """The content hash of a model folder (cai.hashing.hash_outputs, as a stage's output id)."""
    folder = Path(folder)
    return hash_outputs(folder.parent, (folder.name,))


def pm_of_round(out_dir: Path, r: int, first_pm: Path | None) -> Path | None:
    """The PM the policy trains against in round r: the preference_model stage's in round 1."""
    return first_pm if r == 1 else round_dir(out_dir, r) / "pm" / "model"


def round_prompts(prompts: list[dict], n: int | None, seed: int, r: int) -> list[dict]:
    """The training prompts a round samples from: all, or a seeded choice of n of them (in their order)."""
    if n is None or n >= len(prompts):
        return prompts
    keep = set(random.Random(f"{seed}:round-{r}:prompts").sample(range(len(prompts)), n))
    return [p for i, p in enumerate(prompts) if i in keep]


def sample_and_label(c, out_dir: Path, r: int, prompts: list[dict]) -> list[dict]:
    """Round r's fresh pairs: responses of round r − 1's policy to the round's prompts, paired and labelled as
    the feedback stage does (new seeds per round); pairs.jsonl continues after a kill."""
    cfg, seed, rd = c.feedback, c.settings.seed, round_dir(out_dir, r)
    policy = round_dir(out_dir, r - 1) / "policy"
    gen = merged_generation(c.generation, cfg.generation)
    k = cfg.responses_per_prompt
    settings = c.settings.with_(seed=derive_seed(f"{seed}:round-{r}:sample"))
    responses = sample_responses(
        str(policy), settings, gen, prompts, k, rd / "responses.jsonl", f"round-{r - 1}"
    )
    pairs, identical = form_pairs(
        prompts, responses, k, cfg.max_pairs_per_prompt, random.Random(f"{seed}:round-{r}:pairs")
    )
    for p in pairs:
        p.update(id=f"round-{r}:{p['id']}", round=r)
    constitution = load_constitution(c.feedback_constitution)
    prin_rng = random.Random(f"{seed}:round-{r}:principles")
    principles = [constitution.sample(prin_rng, cfg.num_principles) for _ in pairs]
    model, tok = load_for_inference(c.models.feedback, c.settings)
    examples = feedback_examples(cfg, constitution)
    labeller = build_labeller(
        model,
        tok,
        cfg,
        seed,
        examples,
        cot_max_new_tokens=gen.max_new_tokens,
        backend=gen.backend,
        settings=c.settings,
        memory=gen.vllm_memory,
    )
    label_pairs(labeller, pairs, principles, rd / "pairs.jsonl")
    vllm_engine.release()  # a vLLM engine of the sampling or labelling must not hold memory while the PM trains
    dist.barrier()
    rows = read_jsonl(rd / "pairs.jsonl")
    update_round(out_dir, r, pairs=pair_stats(rows, len(prompts), len(responses), identical))
    return rows


def pm_agreement(pm_dir: Path, settings, cfg, rows: list[dict]) -> dict:
    """How often a PM ranks the side the labeller preferred higher on pairs it never saw (ties left out), with
    its interval clustered by prompt, n and the prompts: the labeller's agreement with the PM the policy has been
    optimising."""
    scorer = RewardScorer(pm_dir, settings)
    res = held_out_eval(scorer.model, scorer.tokenizer, rows, cfg.max_length, cfg.batch_size)
    n = res["n_scored"]  # the pairs whose label picks a side: those the accuracy counts
    out = {"n": n, "accuracy": res.get("accuracy"), "mean_margin": res.get("mean_margin")}
    if n and res.get("accuracy") == res.get("accuracy"):  # not nan
        out.update(ci95=res["ci95"], clusters=res["clusters"])
    return out


def refresh(ctx, r: int, prev_pm: Path, prompts: list[dict]) -> Path:
    """Everything before round r's policy updates: fresh pairs from round r − 1's policy, the labeller's
    agreement with the previous PM on them, and the PM trained further on old + new pairs. Returns the new PM."""
    c, out = ctx.config, ctx.out_dir
    rd, rec = round_dir(out, r), read_round(out, r)
    if rec.get("pm_done"):
        return rd / "pm" / "model"
    policy = round_dir(out, r - 1) / "policy"
    update_round(
        out,
        r,
        status="running",
        sampled_from={"path": str(policy.relative_to(out)), "hash": folder_hash(policy)},
        pm_from={"path": _rel(prev_pm, out.parent), "hash": folder_hash(prev_pm)},
    )
    chosen = round_prompts(prompts, c.policy.round_prompts, c.settings.seed, r)
    new = [row for row in sample_and_label(c, out, r, chosen) if row.get("p_a") is not None]
    cfg = c.preference_model
    update_round(out, r, pm_agreement=pm_agreement(prev_pm, c.settings, cfg, new))
    old = read_jsonl(ctx.input_dir("feedback") / "pairs.jsonl")
    for q in range(2, r):
        old += read_jsonl(round_dir(out, q) / "pairs.jsonl")
    rows = [row for row in old if row.get("p_a") is not None] + new
    if cfg.human_data is not None:  # the preference_model stage's mix, kept at its ratio to the AI pairs
        n_ai = sum(row.get("source") != "human" for row in rows)
        rows += human_pairs(cfg.human_data.path, cfg.human_data.ratio, n_ai, c.settings.seed, taken=rows)
    # the previous PM's prompts keep their side: none it trained on is held out to measure this one
    train, held = split_pairs(rows, cfg.eval_fraction, c.settings.seed, read_json(Path(prev_pm) / SPLIT_FILE))
    new_ids = {row["id"] for row in new}
    # the reward normalisation: the responses of the current policy (the new pairs), those the PM trains on when
    # every new pair went to training
    norm_rows, sample = (
        [row for row in held if row["id"] in new_ids],
        "responses of the newest pairs, held out",
    )
    if not norm_rows:
        norm_rows = [row for row in train if row["id"] in new_ids] or train
        sample = "responses of the newest pairs (trained on: none was held out)"
    ref = responses_of(norm_rows)
    random.Random(f"{c.settings.seed}:round-{r}:norm-sample").shuffle(ref)
    ref = ref[: cfg.norm_sample]
    record = {
        "n": len(ref),
        "sample": sample,
        "from": f"policy/rounds/round-{r}/pairs.jsonl",  # within the run: the PM's output id holds it
        "policy": [f"round-{r - 1}"],
    }
    log = MetricsLog(rd / "pm" / "metrics.jsonl")
    fit = train_pm(
        cfg,
        c.settings,
        train,
        held,
        rd / "pm",
        log,
        f"policy round {r}: preference model",
        ctx.run_token,
        (ref, record),
        init=str(prev_pm),
    )
    dist.release_stage_state()  # the policy's own accelerator comes next
    held_out = {k: v for k, v in fit["after"].items() if k != "scores"}
    update_round(out, r, pm_done=True, pm_train_pairs=len(train), pm_held_out=held_out, pm_norm=fit["norm"])
    return rd / "pm" / "model"


def finish_round(out_dir: Path, r: int, policy_dir: Path, metrics_path: Path) -> dict:
    """Mark round r complete with what it did: its updates, the score and KL of its first and last update, and
    the hash of the policy it ended with."""
    rows = [row for row in read_jsonl(metrics_path) if row.get("round", 1) == r and "objective/score" in row]
    fields: dict = {"status": "complete", "policy": str(Path(policy_dir).relative_to(out_dir))}
    fields["policy_hash"] = folder_hash(policy_dir)
    if rows:
        fields.update(
            updates=[rows[0]["step"], rows[-1]["step"]],
            score_first=rows[0]["objective/score"],
            score_last=rows[-1]["objective/score"],
            score_mean=sum(row["objective/score"] for row in rows) / len(rows),
            kl_last=rows[-1]["objective/kl"],
            sqrt_kl_last=rows[-1]["objective/sqrt_kl"],
        )
    return update_round(out_dir, r, **fields)


def summary(out_dir: Path, rounds: int) -> list[dict]:
    """Every round's record, in order (for RUN/policy/rounds.json, the stage summary and the report)."""
    return [read_round(out_dir, r) for r in range(1, rounds + 1)]
