"""Few-shot examples in the CAI paper's formats, the one loader for both kinds a constitution names.

Critique/revision examples (`few_shot.critique_revise`) become chat messages to prepend. The paper's file (CritiqueRevisionFewShotPrompts.json) is a JSON list of transcripts such as

    "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nCritiqueRequest: ...\\n\\nCritique: ...
     \\n\\nRevisionRequest: ...\\n\\nRevision: ...\\n\\nHuman:"

Each labelled turn becomes a chat message: Human, CritiqueRequest and RevisionRequest are user turns;
Assistant, Critique and Revision are assistant turns. This is the same conversation shape the
critique_revise stage builds, so an example reads exactly like the task that follows it. A transcript may
also be given directly as a list of {"role", "content"} messages.

Feedback examples (`few_shot.feedback`, the paper's RLMadisonFewShotPrompts.json) become answered
multiple-choice questions for the labeller (cai.feedback.labeller.build_mc_prompt).
"""

from __future__ import annotations

from pathlib import Path

from cai.data import hh
from cai.errors import UserError
from cai.yamlio import load_json

ROLES = {
    "Human": "user",
    "Assistant": "assistant",
    "CritiqueRequest": "user",
    "Critique": "assistant",
    "RevisionRequest": "user",
    "Revision": "assistant",
}


def parse_transcript(text: str) -> list[dict]:
    """One paper transcript → chat turns {"role", "content", "label"}, in order; empty turns (the trailing
    'Human:') are dropped."""
    return hh.parse_transcript(text, ROLES, drop_empty=True)


def load_fewshot(path: str | Path, n: int | None = None) -> list[list[dict]]:
    """The first `n` (default all) few-shot transcripts of a file, each as a list of chat messages.

    Every transcript must contain a critique and a revision. Errors name the file and the item.
    """
    path = Path(path)
    data = load_json(path, "few-shot file")
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: a non-empty JSON list of transcripts is expected")
    out = []
    for i, item in enumerate(data[: n if n is not None else len(data)]):
        where = f"{path}: item {i}"
        if isinstance(item, str):
            turns = parse_transcript(item)
            labels = {m["label"] for m in turns}
            if not {"Critique", "Revision"} <= labels:
                raise UserError(f"{where}: a transcript with 'Critique:' and 'Revision:' turns is expected")
        elif isinstance(item, list):
            if not all(
                isinstance(m, dict)
                and m.get("role") in ("user", "assistant")
                and isinstance(m.get("content"), str)
                for m in item
            ):
                raise UserError(f"{where}: messages {{'role': user|assistant, 'content': str}} are expected")
            turns = item
        else:
            raise UserError(f"{where}: a transcript string or a list of messages is expected")
        messages = hh.merge_same_role([{"role": m["role"], "content": m["content"]} for m in turns])
        if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "assistant":
            raise UserError(
                f"{where}: the transcript must start with a user turn and end with an assistant turn"
            )
        out.append(messages)
    return out


def fewshot_messages(path: str | Path | None, n: int) -> list[dict]:
    """The messages to prepend to every critique/revision conversation: `n` transcripts, one after another."""
    if not path or n <= 0:
        return []
    return [m for transcript in load_fewshot(path, n) for m in transcript]


def load_feedback_few_shot(path) -> list[dict]:
    """Few-shot feedback examples in the paper's RLMadisonFewShotPrompts.json format:
    [{"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "corrects": [...], "incorrects": [...]}, ...]
    → [{"messages", "chosen", "rejected"}] (one example per listed correct/incorrect pair)."""
    path = Path(path)
    data = load_json(path, "few-shot file")
    if not isinstance(data, list):
        raise UserError(f"{path}: a JSON list of {{prompt, corrects, incorrects}} objects is expected")
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict) or not all(k in row for k in ("prompt", "corrects", "incorrects")):
            raise UserError(f"{path}: item {i}: 'prompt', 'corrects' and 'incorrects' are expected")
        lists = [row["corrects"], row["incorrects"]]
        if not isinstance(row["prompt"], str) or not all(
            isinstance(x, list) and all(isinstance(o, str) for o in x) for x in lists
        ):
            raise UserError(
                f"{path}: item {i}: a 'prompt' text and lists of texts 'corrects', 'incorrects' are expected"
            )
        prompt = row["prompt"].rstrip()
        if prompt.endswith("Assistant:"):
            prompt = prompt[: -len("Assistant:")]
        messages = hh.merge_same_role([m for m in hh.parse_hh_transcript(prompt) if m["content"]])
        if not messages or messages[-1]["role"] != "user":
            raise UserError(f"{path}: item {i}: the prompt must end with a Human turn")
        for good, bad in zip(row["corrects"], row["incorrects"]):
            out.append({"messages": messages, "chosen": str(good).strip(), "rejected": str(bad).strip()})
    return out


def feedback_examples(cfg, constitution) -> list[dict]:
    """The few-shot feedback examples a feedback block asks for: `cfg.num_few_shot` of its `few_shot` file, or
    of the constitution's own."""
    path = cfg.few_shot or constitution.few_shot.feedback
    if not path or cfg.num_few_shot == 0:
        return []
    return load_feedback_few_shot(path)[: cfg.num_few_shot]
