"""RL-CAI comparison data, the steps the feedback stage (and every later round of labelling) takes: sample k
responses per prompt from a policy, form pairs of distinct responses, label them with the labeller in chunks
that are appended to a JSONL file (a rerun continues where it stopped), check the labeller against human
labels first, and summarise the labels."""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

from cai.data.hh import read_hh
from cai.feedback.labeller import PairToLabel, check_warning, hh_check
from cai.runtime import distributed as dist
from cai.runtime import vllm_engine
from cai.runtime.generate import Engine
from cai.runtime.rundir import append_jsonl, resumed_rows, write_json

LABEL_CHUNK = 32  # pairs labelled (and appended to pairs.jsonl) at a time


def sample_responses(
    model_ref: str, settings, gen, prompts: list[dict], k: int, out_path: Path, tag: str
) -> list[dict]:
    """k responses per prompt from `model_ref` through the one Engine, streamed to `out_path` (resumable);
    each row's meta names its prompt and `tag` (who sampled it)."""
    engine = Engine.load(model_ref, settings, gen, settings.seed)
    requests = [
        {"id": f"{p['id']}#{j}", "messages": p["messages"], "meta": {"prompt_id": p["id"], "policy": tag}}
        for p in prompts
        for j in range(k)
    ]
    rows = engine.run(requests, out_path=out_path, desc="feedback: sample")
    del engine
    vllm_engine.release()  # a vLLM engine left running slows the labeller's forwards that follow (about 10%)
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


def label_pairs(labeller, pairs: list[dict], principles: list[list], out_path: Path) -> None:
    """Label the pairs not yet in `out_path`, each under its sampled principles, appending chunk by chunk.
    Every process takes part (the option scoring is split between them); the main process appends. The chunks
    are fixed slices of `pairs`: one a kill left partly written is labelled whole again and only its missing rows
    appended, so that every pair is scored in the batch it has in an uninterrupted run (the same labels to the
    last bit, where re-chunking the rest moved batch boundaries and labels by ~1e-7)."""
    done = {row["id"] for row in resumed_rows(out_path)}
    chunks = [
        list(range(s, min(s + LABEL_CHUNK, len(pairs))))
        for s in range(0, len(pairs), LABEL_CHUNK)
        if any(p["id"] not in done for p in pairs[s : s + LABEL_CHUNK])
    ]
    for n, chunk in enumerate(chunks):
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
            rows = [
                {**pairs[i], **res.to_dict(), "source": "ai"}
                for i, res in zip(chunk, results)
                if pairs[i]["id"] not in done
            ]
            append_jsonl(out_path, rows)


def labeller_check(labeller, check_set, seed: int, sample_principles, path: Path) -> dict | None:
    """The labeller's agreement with human labels on an HH check set (`feedback.check_set`), kept in `path`
    (check.json) so a rerun does not repeat it; a plain warning is printed when it is not above chance."""
    if check_set is None:
        return None
    if path.is_file():
        check = json.loads(path.read_text())
    else:
        rows = read_hh(check_set.path)
        rng = random.Random(f"{seed}:check")
        rows = rng.sample(rows, min(check_set.limit, len(rows)))
        t0 = time.time()
        # every rank takes part and scores its share; rank 0 writes the (one-process) result
        check = hh_check(labeller, rows, sample_principles, rng, desc="feedback: labeller check", shard=True)
        check.update(path=check_set.path, seconds=round(time.time() - t0, 1))
        check["warning"] = check_warning(check)
        if dist.is_main():
            write_json(path, check)
    if check.get("warning") and dist.is_main():
        print(f"[cai] feedback: WARNING: {check['warning']}", flush=True)
    return check


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
