"""How far a preference model, or a feedback (labeller) model, can be trusted, measured on an evaluation suite
(cai.eval.suites): what `cai pm eval`, `cai feedback eval` and the report compute.

Both report accuracy with a 95% Wilson interval, its n (flagged below cai.stats.SMALL_N) and the chance level,
expected calibration error with a reliability-diagram PNG (one point per item: the confidence in the preferred
option against how often it is right), and a per-tag breakdown, as JSON and markdown. PM evaluation adds the mean score
margin; feedback evaluation on pair suites adds the mean gap between the two option orders.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from cai.constitution.schema import Constitution
from cai.credit import credit, option_credit
from cai.errors import UserError
from cai.eval.baselines import (
    OPTION_FORMATS,
    UNTRAINED,
    compare,
    describe,
    length_correlation,
    trivial_hits,
)
from cai.eval.suites import OPTION_LINE, load_items, load_suite, split_cue
from cai.feedback.labeller import (
    INTRO,
    PairToLabel,
    build_labeller,
    render_conversation,
    render_mc,
)
from cai.feedback.options import OPTION_LETTERS, normalise, option_continuations, option_probs
from cai.markdown import num
from cai.plots import reliability_png
from cai.pm.build import read_origin, untrained_scorer
from cai.pm.scoring import RewardScorer, check_finite
from cai.runtime.models import load_for_inference
from cai.runtime.rundir import write_json
from cai.runtime.settings import DEFAULT, Settings
from cai.stats import balanced_coins, small_n_note, summarise

# Suite formats whose items are response pairs the labeller judges under sampled principles (with its few-shot
# examples); every other suite is multiple-choice and asks its own question.
PAIR_FORMATS = ("hh_pairs", "ai_risk")


def _write(result: dict, out_dir: str | Path, kind: str) -> dict:

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{result['suite']}"
    xlabel = (
        "confidence: P(preferred option) from the PM scores (σ of the margin for pairs)"
        if kind == "pm"
        else "confidence: the feedback model's P(preferred option)"
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


def score_items(
    scorer: RewardScorer, items, batch_size: int, max_length: int | None, desc: str, suite: str | None = None
) -> list[float]:
    """A PM's raw score of every candidate of every item, items in order; an item's candidates share its
    conversation, which a packed forward computes once (cai.pm.scoring). A NaN or infinite score is a one-line
    UserError naming the PM and the suite (`desc` when no suite is given). An item's identical candidates are
    scored once and share the score, so they tie exactly (a packed forward's rounding parted them by ~1e-8)."""
    distinct = [list(dict.fromkeys(it.candidates)) for it in items]
    convs = [
        it.messages + [{"role": "assistant", "content": c}] for it, cs in zip(items, distinct) for c in cs
    ]
    starts = list(itertools.accumulate((len(cs) for cs in distinct), initial=0))
    groups = [list(range(a, b)) for a, b in zip(starts, starts[1:])]
    raw = scorer.score(convs, batch_size=batch_size, max_length=max_length, desc=desc, groups=groups).tolist()
    check_finite(raw, scorer.model_dir, suite or desc)
    return [raw[start + cs.index(c)] for it, cs, start in zip(items, distinct, starts) for c in it.candidates]


def _per_item(items, raw: list[float]) -> list[list[float]]:
    out, k = [], 0
    for it in items:
        out.append(raw[k : k + len(it.candidates)])
        k += len(it.candidates)
    return out


def pm_result(items, raw: list[float], untrained_raw: list[float] | None, fmt: str, seed: int) -> dict:
    """Accuracy, CI, calibration and margins of scores on suite items, with the baselines (cai.eval.baselines),
    the lift over the best of them, and the correlation of the scores with response length."""
    per_item = _per_item(items, raw)
    correct = [it.correct for it in items]
    hits = [credit(s, c) for s, c in zip(per_item, correct)]
    margins = [s[c] - max(x for i, x in enumerate(s) if i != c) for s, c in zip(per_item, correct)]
    probs = [normalise(s) for s in per_item]
    out = summarise(hits, probs, correct, [it.tag for it in items], margins, seed)
    cands = [it.candidates for it in items]
    base = trivial_hits(cands, correct, fmt in OPTION_FORMATS)
    if untrained_raw is not None:
        base = {UNTRAINED: [credit(s, c) for s, c in zip(_per_item(items, untrained_raw), correct)], **base}
    out.update(compare(hits, base, out["chance"], seed))
    groups = [i for i, cs in enumerate(cands) for _ in cs]  # an item's candidates share its prompt
    out["length"] = length_correlation(raw, [c for cs in cands for c in cs], groups, unit="items")
    return out


def evaluate_pm(
    model,
    suite: str,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    *,
    batch_size: int = 8,
    settings: Settings = DEFAULT,
    max_length: int | None = 1024,
    untrained: RewardScorer | str | None = "auto",
) -> dict:
    """Score every candidate response of every suite item with a PM (a RewardScorer or a model folder), beside
    the baselines; the items are a sample seeded by `settings.seed`. `untrained` is the untrained baseline's
    scorer, or 'auto' to build it from the PM folder's origin record (cai.pm.build), or None for none."""
    spec = load_suite(suite)
    items = load_items(spec, limit, settings.seed)
    scorer = model if isinstance(model, RewardScorer) else RewardScorer(model, settings)
    note = "no untrained baseline (skipped)"
    if untrained == "auto":
        untrained = untrained_for(scorer, settings)
        note = "no untrained baseline: the PM folder has no pm_origin.json (give --backbone to build it)"
    raw = score_items(scorer, items, batch_size, max_length, f"pm eval {spec.name}", spec.name)
    base_raw = (
        score_items(untrained, items, batch_size, max_length, f"pm eval {spec.name}: untrained", spec.name)
        if isinstance(untrained, RewardScorer)
        else None
    )
    result = pm_result(items, raw, base_raw, spec.format, settings.seed)
    result = {"kind": "pm", "suite": spec.name, "model": str(scorer.model_dir), "limit": limit, **result}
    if base_raw is None:
        result["untrained_note"] = note
    else:
        result["untrained_model"] = str(untrained.model_dir)
    return _write(result, out_dir, "pm") if out_dir else result


def untrained_for(
    scorer: RewardScorer, settings: Settings, backbone: str | None = None
) -> RewardScorer | None:
    """The untrained baseline of a loaded PM: its backbone (from the folder's pm_origin.json, or `backbone`)
    with a fresh head of the same kind from the seed the PM was trained with; None when the backbone is unknown."""
    origin = read_origin(scorer.model_dir) or {}
    ref = backbone or origin.get("backbone")
    if not ref:
        return None
    seed = origin.get("seed", settings.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(
            f"{scorer.model_dir}/pm_origin.json: key 'seed': an integer from 0 to 2**32 - 1 is expected, "
            f"not {seed!r}"
        )
    return untrained_scorer(ref, origin.get("head") or scorer.head, settings.with_(seed=int(seed)))


def evaluate_feedback(
    model_ref: str,
    suite: str,
    labeller_cfg,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    *,
    constitution: Constitution | None = None,
    few_shot: list[dict] | None = None,
    template: str | None = None,
    settings: Settings = DEFAULT,
    model=None,
    tokenizer=None,
) -> dict:
    """Measure a feedback model: agreement with human labels on pair suites (the feedback stage's labeller
    with the labeller fields of `labeller_cfg`, a cai.config.recipe.FeedbackConfig, and principles sampled
    from `constitution`), or accuracy on multiple-choice classification suites."""
    spec = load_suite(suite)
    seed = settings.seed
    items = load_items(spec, limit, seed)
    if spec.format in PAIR_FORMATS and constitution is None:  # before a model takes minutes to load
        raise UserError(
            f"suite '{spec.name}' compares responses: give --constitution (its principles are asked)"
        )
    if model is None or tokenizer is None:
        model, tokenizer = load_for_inference(model_ref, settings)
    chat = (template or spec.template) == "chat"
    rng = random.Random(f"{seed}:feedback-eval")
    extra: dict = {"template": "chat" if chat else "plain", "both_orders": labeller_cfg.both_orders}
    if spec.format in PAIR_FORMATS:
        lab = build_labeller(model, tokenizer, labeller_cfg, seed, few_shot, chat=chat)
        pairs, a_right = [], []
        for it, flip in zip(items, balanced_coins(len(items), rng)):  # the right answer at (B) in half
            right, wrong = it.candidates[it.correct], it.candidates[1 - it.correct]
            pairs.append(PairToLabel(it.id, it.messages, wrong if flip else right, right if flip else wrong))
            a_right.append(not flip)
        prins = [constitution.sample(rng, labeller_cfg.num_principles) for _ in pairs]
        res = lab.label(pairs, prins, desc=f"feedback eval {spec.name}")
        p_right = [r.p_a if a else 1.0 - r.p_a for r, a in zip(res, a_right)]
        probs = [[p, 1.0 - p] for p in p_right]
        extra.update(
            constitution=constitution.name,
            num_principles=labeller_cfg.num_principles,
            num_few_shot=len(few_shot or []),
            # one order measures no position bias: None, not a gap of 0
            mean_order_gap=sum(r.order_gap for r in res) / max(len(res), 1)
            if labeller_cfg.both_orders
            else None,
            mean_p_right=sum(p_right) / max(len(p_right), 1),
        )
    else:
        probs = _multiple_choice_probs(
            model, tokenizer, items, spec, chat, labeller_cfg.both_orders, labeller_cfg.score_batch_size, rng
        )
    hits = [option_credit(p, 0) for p in probs]
    result = {
        "kind": "feedback",
        "suite": spec.name,
        "model": model_ref,
        "limit": limit,
        **extra,
        **summarise(hits, probs, [0] * len(items), [it.tag for it in items], None, seed),
    }
    base = trivial_hits(
        [it.candidates for it in items], [it.correct for it in items], spec.format in OPTION_FORMATS
    )
    result.update(compare(hits, base, result["chance"], seed))
    return _write(result, out_dir, "feedback") if out_dir else result


def letter_rotations(prompt: str, continuations: list[str], both_orders: bool) -> list[tuple[str, list[str]]]:
    """A letter-option item's prompt and candidate continuations (" (B)", ...) as asked: the prompt as written,
    and with both_orders also every rotation of its option texts over the letters, each continuation moved to
    the letter its text now has (the two texts swapped, for two options), so every text is asked at every
    letter and a position-biased model scores chance."""
    last = {m.group(1): m for m in OPTION_LINE.finditer(prompt)}  # as option_texts reads them: last wins
    lines = sorted(last.values(), key=lambda m: m.start())
    letters = [m.group(1) for m in lines]
    out = []
    for r in range(len(lines) if both_orders else 1):
        text, end = [], 0
        for j, m in enumerate(lines):  # letter j shows the text of letter j + r
            text += [prompt[end : m.start(2)], lines[(j + r) % len(lines)].group(2)]
            end = m.end(2)
        # a candidate's continuation names the letter its text is now shown at
        moved = {letters[(j + r) % len(letters)]: letters[j] for j in range(len(letters))}
        conts = []
        for c in continuations:
            old = c.strip()[1:-1]
            conts.append(c.replace(f"({old})", f"({moved[old]})", 1))
        out.append(("".join(text) + prompt[end:], conts))
    return out


def _multiple_choice_probs(
    model, tok, items, spec, chat: bool, both_orders: bool, batch_size: int, rng
) -> list[list[float]]:
    """Option probabilities per item, candidates in item order (index 0 is the right one).

    Letter-option items use their own prompt and continuations, with both_orders in every rotation of their
    option texts over the letters (letter_rotations), averaged. Text-option items are shown as "(A) [[[...]]]"
    options in a shuffled order, and with both_orders in every rotation of it, averaged."""
    prompts, options, back = [], [], []  # back[i]: (item index, candidate index of each shown option)
    for n, it in enumerate(items):
        if it.mc_prompt is not None:
            for asked, conts in letter_rotations(it.mc_prompt, it.mc_options, both_orders):
                body, cue = split_cue(asked)
                text = (
                    render_mc(tok, [(body, None)], cue=cue or "The answer is:", chat=chat) if chat else asked
                )
                prompts.append(text)
                options.append(conts)
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


def markdown(result: dict, png_name: str | None) -> str:
    """A short markdown report of one evaluation result."""

    def f(x) -> str:
        return num(x, ".3f", "n/a")

    lo, hi = result["ci95"]
    lines = [
        f"# {result['kind']} eval: {result['suite']}",
        "",
        f"- model: `{result['model']}`",
        f"- items: {result['n']}" + (f" (limit {result['limit']})" if result.get("limit") else ""),
        f"- accuracy: **{f(result['accuracy'])}** (95% Wilson interval {f(lo)}–{f(hi)}, n = {result['n']}); "
        f"chance {f(result['chance'])}",
    ]
    if small_n_note(result["n"]):
        lines.append(f"- **small sample:** {small_n_note(result['n'])}")
    if "mean_margin" in result:
        lines.append(f"- mean margin (right − best wrong score): {f(result['mean_margin'])}")
    if "mean_order_gap" in result:
        lines.append(
            "- mean order gap (|p_a shown first − p_a shown second|): "
            + ("n/a (one order scored)" if result["mean_order_gap"] is None else f(result["mean_order_gap"]))
        )
    lines.append(f"- expected calibration error: {f(result['ece'])}")
    margin = "mean_margin" in result
    lines += [
        "",
        "| tag | n | accuracy | 95% CI |" + (" mean margin |" if margin else ""),
        "|---|---|---|---|" + ("---|" if margin else ""),
    ]
    for tag, row in result["per_tag"].items():
        extra = f" {f(row.get('mean_margin'))} |" if margin else ""
        ci = f"{f(row['ci95'][0])}–{f(row['ci95'][1])}"
        lines.append(f"| {tag} | {row['n']} | {f(row['accuracy'])} | {ci} |{extra}")
    notes, warnings = describe(result)
    lines += [""] + [f"- {x}" for x in notes] + [f"\n> **Warning:** {w}." for w in warnings]
    if png_name:
        lines += ["", f"![reliability diagram]({png_name})"]
    return "\n".join(lines) + "\n"
