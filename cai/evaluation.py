"""`cai pm eval` and `cai feedback eval`: how far a preference model, or a feedback (labeller) model, can be
trusted, on the suites in reward_models/suites (or a suite YAML file).

Both report accuracy with a 95% bootstrap CI and the chance level, expected calibration error with a
reliability-diagram PNG, and a per-tag breakdown, as JSON and markdown. `pm eval` adds the mean score margin;
`feedback eval` on pair suites adds the mean gap between the two option orders. This module imports fast:
torch and the models are loaded inside the commands.
"""

from __future__ import annotations

import random
from pathlib import Path

DEFAULT_OUT = "runs/eval"
DEFAULT_CONSTITUTION = "constitutions/harmless-specific.yaml"


def _write(result: dict, out_dir: str | Path, kind: str) -> dict:
    from cai.eval_metrics import markdown, reliability_png
    from cai.rundir import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{result['suite']}"
    xlabel = (
        "predicted P(option) = softmax of PM scores (σ(r_c − r_r) for pairs)"
        if kind == "pm"
        else "feedback model's P(option)"
    )
    png = reliability_png(
        out / f"{stem}-reliability.png",
        result["reliability"],
        f"{kind} eval, {result['suite']}: ECE {result['ece']:.3f} (n={result['n']})",
        xlabel,
    )
    result["files"] = {
        "json": str(out / f"{stem}.json"),
        "markdown": str(out / f"{stem}.md"),
        "png": str(png),
    }
    write_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown(result, png.name), encoding="utf-8")
    return result


def evaluate_pm(
    model,
    suite: str,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    max_length: int | None = 1024,
    seed: int = 0,
) -> dict:
    """Score every candidate response of every suite item with a PM (a RewardScorer or a model folder)."""
    from cai.eval_metrics import summarise
    from cai.pm import RewardScorer
    from cai.reward_specs import load_items, load_suite

    spec = load_suite(suite)
    items = load_items(spec, limit, seed)
    scorer = model if isinstance(model, RewardScorer) else RewardScorer(model, device=device)
    convs = [it.messages + [{"role": "assistant", "content": c}] for it in items for c in it.candidates]
    raw = scorer.score(
        convs, batch_size=batch_size, max_length=max_length, desc=f"pm eval {spec.name}"
    ).tolist()
    hits, probs, correct, margins, k = [], [], [], [], 0
    for it in items:
        s = raw[k : k + len(it.candidates)]
        k += len(it.candidates)
        best_wrong = max(x for i, x in enumerate(s) if i != it.correct)
        hits.append(1.0 if s[it.correct] > best_wrong else (0.5 if s[it.correct] == best_wrong else 0.0))
        margins.append(s[it.correct] - best_wrong)
        probs.append(_softmax(s))
        correct.append(it.correct)
    result = {
        "kind": "pm",
        "suite": spec.name,
        "model": str(scorer.model_dir),
        "limit": limit,
        **summarise(hits, probs, correct, [it.tag for it in items], margins, seed),
    }
    return _write(result, out_dir, "pm") if out_dir else result


def _softmax(xs: list[float]) -> list[float]:
    from cai.labels import normalise

    return normalise(xs)


def evaluate_feedback(
    model_ref: str,
    suite: str,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    *,
    constitution: str | None = None,
    template: str | None = None,
    both_orders: bool = True,
    num_principles: int = 1,
    few_shot: str | None = None,
    num_few_shot: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
    model=None,
    tokenizer=None,
) -> dict:
    """Measure a feedback model: agreement with human labels on pair suites (same prompt, principles and order
    averaging as the feedback stage), or accuracy on multiple-choice classification suites."""
    from cai.models import load_model, load_tokenizer
    from cai.reward_specs import load_items, load_suite, repo_path

    spec = load_suite(suite)
    items = load_items(spec, limit, seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_ref, trust_remote_code=trust_remote_code)
    if model is None:
        model = load_model(model_ref, device=device, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    chat = (template or spec.template) == "chat"
    rng = random.Random(f"{seed}:feedback-eval")
    extra: dict = {"template": "chat" if chat else "plain", "both_orders": both_orders}
    if spec.format in ("hh_pairs", "ai_risk"):
        from cai.constitution import load_constitution
        from cai.labels import Labeller, PairToLabel, load_feedback_few_shot

        const_path = constitution or str(repo_path(DEFAULT_CONSTITUTION))
        const = load_constitution(const_path)
        shots = load_feedback_few_shot(few_shot)[:num_few_shot] if few_shot and num_few_shot else []
        lab = Labeller(
            model,
            tokenizer,
            both_orders=both_orders,
            few_shot=shots,
            batch_size=batch_size,
            seed=seed,
            chat=chat,
        )
        pairs, a_right = [], []
        for it in items:
            right, wrong = it.candidates[it.correct], it.candidates[1 - it.correct]
            flip = rng.random() < 0.5
            pairs.append(PairToLabel(it.id, it.messages, wrong if flip else right, right if flip else wrong))
            a_right.append(not flip)
        prins = [const.sample(rng, num_principles) for _ in pairs]
        res = lab.label(pairs, prins, desc=f"feedback eval {spec.name}")
        p_right = [r.p_a if a else 1.0 - r.p_a for r, a in zip(res, a_right)]
        probs = [[p, 1.0 - p] for p in p_right]
        extra.update(
            constitution=const_path,
            num_principles=num_principles,
            num_few_shot=len(shots),
            mean_order_gap=sum(r.order_gap for r in res) / max(len(res), 1),
            mean_p_right=sum(p_right) / max(len(p_right), 1),
        )
    else:
        probs = _multiple_choice_probs(model, tokenizer, items, spec, chat, both_orders, batch_size, rng)
    hits = [_hit(p, 0) for p in probs]
    from cai.eval_metrics import summarise

    result = {
        "kind": "feedback",
        "suite": spec.name,
        "model": model_ref,
        "limit": limit,
        **extra,
        **summarise(hits, probs, [0] * len(items), [it.tag for it in items], None, seed),
    }
    return _write(result, out_dir, "feedback") if out_dir else result


def _hit(probs: list[float], correct: int) -> float:
    best_wrong = max(p for i, p in enumerate(probs) if i != correct)
    return 1.0 if probs[correct] > best_wrong else (0.5 if probs[correct] == best_wrong else 0.0)


def _multiple_choice_probs(
    model, tok, items, spec, chat: bool, both_orders: bool, batch_size: int, rng
) -> list[list[float]]:
    """Option probabilities per item, candidates in item order (index 0 is the right one).

    Letter-option items use their own prompt and continuations. Text-option items are shown as
    "(A) [[[...]]]" options in a shuffled order, and with both_orders in every rotation of it, averaged."""
    from cai.labels import (
        INTRO,
        OPTION_LETTERS,
        option_continuations,
        option_probs,
        render_conversation,
        render_mc,
    )
    from cai.reward_specs import split_cue

    prompts, options, back = [], [], []  # back[i]: (item index, candidate index of each shown option)
    for n, it in enumerate(items):
        if it.mc_prompt is not None:
            body, cue = split_cue(it.mc_prompt)
            text = (
                render_mc(tok, [(body, None)], cue=cue or "The answer is:", chat=chat)
                if chat
                else it.mc_prompt
            )
            prompts.append(text)
            options.append(it.mc_options)
            back.append((n, list(range(len(it.candidates)))))
            continue
        order = list(range(len(it.candidates)))
        rng.shuffle(order)
        rotations = [order[r:] + order[:r] for r in range(len(order))] if both_orders else [order]
        for rot in rotations:
            opts = "\n".join(f"({OPTION_LETTERS[j]}) [[[{it.candidates[c]}]]]" for j, c in enumerate(rot))
            q = f"{INTRO}\n\n{render_conversation(it.messages)}\n\n{spec.instruction}\nOptions:\n{opts}"
            text = render_mc(tok, [(q, None)], chat=chat)
            prompts.append(text)
            options.append(option_continuations(tok, text, len(rot)))
            back.append((n, rot))
    got = option_probs(model, tok, prompts, options, batch_size, desc=f"feedback eval {spec.name}")
    sums = [[0.0] * len(it.candidates) for it in items]
    counts = [0] * len(items)
    for (n, shown), ps in zip(back, got):
        for j, c in enumerate(shown):
            sums[n][c] += ps[j]
        counts[n] += 1
    return [[s / counts[n] for s in row] for n, row in enumerate(sums)]


# ------------------------------------------------------------------------------------------------ CLI
def _print(result: dict) -> None:
    lo, hi = result["ci95"]
    line = (
        f"{result['kind']} eval {result['suite']}: accuracy {result['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, "
        f"chance {result['chance']:.3f}, n={result['n']}), ECE {result['ece']:.3f}"
    )
    if "mean_margin" in result:
        line += f", mean margin {result['mean_margin']:.3f}"
    if "mean_order_gap" in result:
        line += f", mean order gap {result['mean_order_gap']:.3f}"
    print(line)
    for tag, row in result["per_tag"].items():
        print(f"  {tag}: {row['accuracy']:.3f} (n={row['n']})")
    if "files" in result:
        print(f"wrote {result['files']['json']}, {result['files']['markdown']}, {result['files']['png']}")


def _cmd_pm_eval(a) -> int:
    from cai.models import resolve_device

    res = evaluate_pm(
        a.model,
        a.suite,
        a.limit,
        a.out,
        batch_size=a.batch_size,
        device=resolve_device(a.device),
        max_length=a.max_length,
        seed=a.seed,
    )
    _print(res)
    return 0


def _cmd_feedback_eval(a) -> int:
    from cai.models import resolve_device

    res = evaluate_feedback(
        a.model,
        a.suite,
        a.limit,
        a.out,
        constitution=a.constitution,
        template=a.template,
        both_orders=not a.one_order,
        num_principles=a.principles,
        few_shot=a.few_shot,
        num_few_shot=a.num_few_shot,
        batch_size=a.batch_size,
        device=resolve_device(a.device),
        dtype=a.dtype,
        seed=a.seed,
        trust_remote_code=a.trust_remote_code,
    )
    _print(res)
    return 0


def _common(p) -> None:
    p.add_argument(
        "--suite",
        required=True,
        help="suite name in reward_models/suites (pairs, ai-risk, multiple-choice, "
        "harmful-vs-ethical, harmfulness-classification) or a suite YAML file",
    )
    p.add_argument("--limit", type=int, help="evaluate at most this many items (a seeded sample)")
    p.add_argument(
        "--out", default=DEFAULT_OUT, help=f"folder for the JSON, markdown and PNG (default {DEFAULT_OUT})"
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--seed", type=int, default=0, help="seed for sampling items, option orders and principles"
    )


def register(subparsers) -> None:
    pm = subparsers.add_parser("pm", help="evaluate preference models").add_subparsers(
        dest="sub", required=True, metavar="SUB"
    )
    e = pm.add_parser("eval", help="accuracy, CI, margin, calibration of a PM on an evaluation suite")
    e.add_argument("--model", required=True, help="a preference_model/model folder (or the stage folder)")
    e.add_argument(
        "--max-length", type=int, default=1024, help="left-truncate conversations to this many tokens"
    )
    _common(e)
    e.set_defaults(func=_cmd_pm_eval)

    fb = subparsers.add_parser("feedback", help="evaluate feedback (labeller) models").add_subparsers(
        dest="sub", required=True, metavar="SUB"
    )
    e = fb.add_parser("eval", help="accuracy / human agreement of a feedback model on an evaluation suite")
    e.add_argument("--model", required=True, help="feedback model: alias, model folder, .gguf or hub id")
    e.add_argument(
        "--constitution",
        help=f"pair suites: constitution whose feedback principles are sampled (default {DEFAULT_CONSTITUTION})",
    )
    e.add_argument(
        "--principles", type=int, default=1, help="pair suites: principles sampled per pair (ensemble)"
    )
    e.add_argument(
        "--one-order", action="store_true", help="show each pair in one order only (no position-bias control)"
    )
    e.add_argument(
        "--template",
        choices=["chat", "plain"],
        help="render prompts with the chat template or as plain text (default: the suite's)",
    )
    e.add_argument("--few-shot", help="pair suites: few-shot feedback file (paper JSON)")
    e.add_argument("--num-few-shot", type=int, default=0, help="pair suites: few-shot examples to prepend")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model repo's own code (off by default)"
    )
    _common(e)
    e.set_defaults(func=_cmd_feedback_eval)
