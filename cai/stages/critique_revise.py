"""SL-CAI data: initial answers, then critique→revision rounds under sampled principles (Bai et al., 2022, §3).

For each red-team prompt the helpful model answers; then, `num_revisions` times, a principle is sampled
(seeded per prompt and round, weights respected), the model is asked to critique its last answer under that
principle and then to revise it. The conversation carries on as in the paper:

    user: prompt → assistant: initial → user: critique request → assistant: critique
    → user: revision request → assistant: revision → (next round's critique request …)

with optional few-shot transcripts prepended to the critique and revision calls. Helpful prompts keep their
initial answer, as the paper mixes plain helpful samples into the SFT set.

Every generation step (initial, critique_k, revision_k) is one `Engine.run` over all items that streams to
steps/<step>.jsonl, so a rerun resumes where a kill left it. Generated texts are cleaned (role tags and leaked
labels stripped) and revisions that are empty, echo a request, or repeat themselves are rejected and counted.

Outputs: prompts.jsonl, held_out.jsonl, data.jsonl (one record per kept prompt), rejected.jsonl, stats.json.
"""

from __future__ import annotations

import random
import re
import time
import zlib
from collections import Counter
from pathlib import Path

from cai.config.fields import merged_generation
from cai.constitution.fewshot import fewshot_messages
from cai.constitution.schema import load_constitution
from cai.data.sources import load_prompts, write_prompts
from cai.hashing import derive_seed
from cai.runtime import distributed as dist
from cai.runtime.generate import Engine
from cai.runtime.rundir import read_jsonl, write_json

# --- clean-up filters (pure functions) ----------------------------------------------------------------------

_LABELS = r"(?:assistant|ai|human|user|critique|revision|revised (?:response|answer)|critiquerequest|revisionrequest|response)"
_PREFIX = re.compile(rf"^\s*(?:<\|im_start\|>\s*)?{_LABELS}\s*:\s*", re.IGNORECASE)
_ROLE_LINE = re.compile(r"^\s*(?:<\|im_start\|>\s*)?(?:assistant|ai)\s*\n", re.IGNORECASE)
_LEAK = re.compile(
    r"\n\s*(?:<\|im_start\|>\s*)?(?:Human|User|Assistant|CritiqueRequest|RevisionRequest|Critique|Revision)\s*:",
    re.IGNORECASE,
)


def clean_text(text: str) -> tuple[str, set[str]]:
    """Strip leading role tags and 'Critique:'/'Revision:' labels, and cut at a leaked next-turn label.

    Returns the cleaned text and the set of fixes applied ('stripped_prefix', 'cut_at_role_tag').
    """
    fixes = set()
    text = text.strip()
    while True:
        new = _ROLE_LINE.sub("", text, count=1)
        new = _PREFIX.sub("", new, count=1)
        if new == text:
            break
        fixes.add("stripped_prefix")
        text = new.strip()
    m = _LEAK.search(text)
    if m:
        fixes.add("cut_at_role_tag")
        text = text[: m.start()].strip()
    return text, fixes


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def echoes_request(text: str, requests: list[str], threshold: float = 0.8) -> bool:
    """True when `text` repeats one of the requests: it contains the request, is a sizeable piece of it, or is
    nearly the same string."""
    import difflib

    t = _norm(text)
    if not t:
        return False
    for req in requests:
        r = _norm(req)
        if not r:
            continue
        if r in t or (len(t) >= 20 and t in r):
            return True
        if difflib.SequenceMatcher(None, t, r, autojunk=False).ratio() >= threshold:
            return True
    return False


def is_degenerate(text: str, max_repeat: float = 0.5, min_compress: float = 0.2) -> bool:
    """Degenerate repetition: more than `max_repeat` of the word trigrams are repeats (at least 10 trigrams), or
    a text of 80+ characters compresses below `min_compress` of its size (loops of characters or phrases)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(grams) >= 10 and 1 - len(set(grams)) / len(grams) > max_repeat:
        return True
    raw = text.encode("utf-8")
    return len(raw) >= 80 and len(zlib.compress(raw, 9)) / len(raw) < min_compress


def revision_problem(text: str, requests: list[str]) -> str | None:
    """Why a cleaned revision is rejected, or None when it is kept."""
    if not text.strip():
        return "empty_revision"
    if echoes_request(text, requests):
        return "echoed_request"
    if is_degenerate(text):
        return "degenerate_repetition"
    return None


# --- conversations ------------------------------------------------------------------------------------------


def sample_principle(constitution, seed: int, prompt_id: str, round_no: int):
    """The principle for one prompt and round: a seeded draw that respects weights, independent of order."""
    return constitution.sample(random.Random(step_seed(seed, f"principle:{prompt_id}:{round_no}")), 1)[0]


def conversation(
    prompt: list[dict], initial: str, rounds: list[dict], fewshot: list[dict] | None = None
) -> list[dict]:
    """The prompt's system turns, few-shot examples, the rest of the prompt, the initial answer and each round's
    critique/revision turns (a system turn stays first, where the initial answer saw it and templates want it).

    A round is {'critique_request', 'critique'?, 'revision_request'?, 'revision'?}; turns are added while present,
    so the last round may stop after its critique request (to generate the critique) or its revision request.
    """
    k = next((i for i, m in enumerate(prompt) if m["role"] != "system"), len(prompt))
    msgs = (
        [dict(m) for m in prompt[:k]]
        + [dict(m) for m in (fewshot or [])]
        + [dict(m) for m in prompt[k:]]
        + [{"role": "assistant", "content": initial}]
    )
    for r in rounds:
        for role, key in (
            ("user", "critique_request"),
            ("assistant", "critique"),
            ("user", "revision_request"),
            ("assistant", "revision"),
        ):
            if key not in r:
                break
            msgs.append({"role": role, "content": r[key]})
    return msgs


def round_requests(state: dict, live: list[str], upto: str, fewshot: list[dict]) -> list[dict]:
    """Engine requests for the last round of each live item: up to its critique request ('critique') or, with the
    critique in place, up to its revision request ('revision')."""
    reqs = []
    for pid in live:
        s = state[pid]
        last = s["rounds"][-1]
        upto_last = {"critique_request": last["critique_request"]} if upto == "critique" else last
        msgs = conversation(s["prompt"]["messages"], s["initial"], s["rounds"][:-1] + [upto_last], fewshot)
        reqs.append({"id": pid, "messages": msgs, "meta": {"principle_id": last["principle_id"]}})
    return reqs


def step_seed(seed: int, name: str) -> int:
    """A 32-bit seed derived from the recipe seed and a name (a step, or a prompt and round)."""
    return derive_seed(f"{seed}:{name}")


# --- the stage ----------------------------------------------------------------------------------------------


class Steps:
    """The generation steps of one run (initial, critique_k, revision_k): each one `Engine.run` over all its
    items that streams to steps/<step>.jsonl (so a rerun resumes it), timed; generated texts are cleaned."""

    def __init__(self, engine, steps_dir: Path, seed: int):
        self.engine, self.dir, self.seed = engine, steps_dir, seed
        self.timing: dict[str, dict] = {}
        self.truncated: dict[str, int] = {}
        self.cleanup: Counter = Counter()

    def __call__(self, name: str, requests: list[dict]) -> dict[str, dict]:
        path = self.dir / f"{name}.jsonl"
        before = {r["id"] for r in read_jsonl(path)}
        self.engine.seed = step_seed(self.seed, name)
        t0 = time.time()
        rows = self.engine.run(requests, out_path=path, desc=name)
        secs = time.time() - t0
        fresh = sum(r["new_tokens"] for r in rows if r["id"] not in before)
        self.timing[name] = {
            "items": len(rows),
            "resumed": len(before & {r["id"] for r in rows}),
            "new_tokens": fresh,
            "seconds": round(secs, 2),
            "tokens_per_s": round(fresh / secs, 2) if secs > 0 else 0.0,
        }
        self.truncated[name] = sum(r["finish"] == "length" for r in rows)
        return {r["id"]: r for r in rows}

    def cleaned(self, row: dict) -> str:
        text, fixes = clean_text(row["text"])
        self.cleanup.update(fixes)
        return text


def revise(steps: Steps, train: list[dict], constitution, fewshot, seed: int, rounds: int):
    """Initial answers to every prompt, then `rounds` critique→revision rounds for the red-team prompts still in
    play. Returns (state by prompt id, rejected {id: {reason, round}}, principles used)."""
    initial_rows = steps("initial", [{"id": p["id"], "messages": p["messages"]} for p in train])
    state = {
        p["id"]: {"prompt": p, "initial": steps.cleaned(initial_rows[p["id"]]), "rounds": []} for p in train
    }
    rejected: dict[str, dict] = {}
    for pid, s in state.items():
        if not s["initial"].strip():
            rejected[pid] = {"reason": "empty_initial", "round": 0}
        elif s["prompt"]["kind"] == "helpful" and is_degenerate(s["initial"]):
            rejected[pid] = {"reason": "degenerate_repetition", "round": 0}
    principles_used: Counter = Counter()
    for k in range(1, rounds + 1):
        live = [pid for pid, s in state.items() if s["prompt"]["kind"] == "red_team" and pid not in rejected]
        for pid in live:
            p = sample_principle(constitution, seed, pid, k)
            principles_used[p.id] += 1
            state[pid]["rounds"].append(
                {
                    "principle_id": p.id,
                    "critique_request": p.critique.strip(),
                    "revision_request": p.revision.strip(),
                }
            )
        crit_rows = steps(f"critique_{k}", round_requests(state, live, "critique", fewshot))
        for pid in live:
            state[pid]["rounds"][-1]["critique"] = steps.cleaned(crit_rows[pid])
        rev_rows = steps(f"revision_{k}", round_requests(state, live, "revision", fewshot))
        for pid in live:
            r = state[pid]["rounds"][-1]
            r["revision"] = steps.cleaned(rev_rows[pid])
            reason = revision_problem(r["revision"], [r["critique_request"], r["revision_request"]])
            if reason:
                rejected[pid] = {"reason": reason, "round": k}
    return state, rejected, principles_used


def records(train: list[dict], state: dict, rejected: dict) -> tuple[list[dict], list[dict]]:
    """(kept records, rejected records): one per training prompt, with its rounds and final response."""
    kept, rejects = [], []
    for p in train:
        s = state[p["id"]]
        rounds = [
            {"principle_id": r["principle_id"], "critique": r["critique"], "revision": r["revision"]}
            for r in s["rounds"]
        ]
        rec = {
            "id": p["id"],
            "prompt": p["messages"],
            "initial": s["initial"],
            "rounds": rounds,
            "final": rounds[-1]["revision"] if rounds else s["initial"],
            "category": p["category"],
            "source": p["source"],
            "kind": p["kind"],
        }
        if p["id"] in rejected:
            rejects.append({**rec, **rejected[p["id"]]})
        else:
            kept.append(rec)
    return kept, rejects


def stage_stats(train, held, kept, rejects, steps: Steps, principles_used, num_revisions, n_fewshot) -> dict:
    gen_seconds = sum(t["seconds"] for t in steps.timing.values())
    gen_tokens = sum(t["new_tokens"] for t in steps.timing.values())
    return {
        "prompts": {
            "train": len(train),
            "held_out": len(held),
            "train_by_kind": dict(Counter(p["kind"] for p in train)),
            "train_by_source": dict(Counter(p["source"] for p in train)),
        },
        "records": {
            "written": len(kept),
            "red_team": sum(r["kind"] == "red_team" for r in kept),
            "helpful": sum(r["kind"] == "helpful" for r in kept),
        },
        "rejected": {"total": len(rejects), "by_reason": dict(Counter(r["reason"] for r in rejects))},
        "cleanup": {
            "stripped_prefix": steps.cleanup["stripped_prefix"],
            "cut_at_role_tag": steps.cleanup["cut_at_role_tag"],
        },
        "truncated_at_max_new_tokens": steps.truncated,
        "principles": dict(sorted(principles_used.items())),
        "num_revisions": num_revisions,
        "few_shot_messages": n_fewshot,
        # Timing depends on the machine and on how much a resumed run still had to do; the rest is reproducible.
        "timing": {
            "generation_seconds": round(gen_seconds, 2),
            "generated_tokens": gen_tokens,
            "tokens_per_s": round(gen_tokens / gen_seconds, 2) if gen_seconds > 0 else 0.0,
            "steps": steps.timing,
        },
    }


def run(ctx) -> Path:
    c, out = ctx.config, ctx.out_dir
    cfg, seed = c.critique_revise, c.settings.seed
    train, held = load_prompts(c.prompts, seed)
    if dist.is_main():
        write_prompts(out / "prompts.jsonl", train)
        write_prompts(out / "held_out.jsonl", held)
    constitution = load_constitution(c.constitution)
    fewshot = fewshot_messages(cfg.few_shot or constitution.few_shot.critique_revise, cfg.num_few_shot)
    engine = Engine.load(c.models.policy, c.settings, merged_generation(c.generation, cfg.generation), seed)
    steps = Steps(engine, out / "steps", seed)
    state, rejected, principles_used = revise(steps, train, constitution, fewshot, seed, cfg.num_revisions)
    kept, rejects = records(train, state, rejected)
    stats = stage_stats(train, held, kept, rejects, steps, principles_used, cfg.num_revisions, len(fewshot))
    if dist.is_main():
        write_prompts(out / "data.jsonl", kept)
        write_prompts(out / "rejected.jsonl", rejects)
        write_json(out / "stats.json", stats)
    ctx.summary.update(
        train_prompts=len(train),
        held_out=len(held),
        records=len(kept),
        revised=stats["records"]["red_team"],
        helpful=stats["records"]["helpful"],
        rejected=len(rejects),
        generated_tokens=stats["timing"]["generated_tokens"],
        tokens_per_s=stats["timing"]["tokens_per_s"],
    )
    if dist.is_main():
        print(
            f"[critique_revise] {len(kept)} records ({stats['records']['red_team']} revised, "
            f"{stats['records']['helpful']} helpful), {len(rejects)} rejected {stats['rejected']['by_reason']}, "
            f"{stats['timing']['tokens_per_s']} generated tok/s",
            flush=True,
        )
    return out
