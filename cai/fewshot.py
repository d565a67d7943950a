"""Few-shot critique/revision examples in the CAI paper's format, turned into chat messages to prepend.

The paper's file (CritiqueRevisionFewShotPrompts.json) is a JSON list of transcripts such as

    "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nCritiqueRequest: ...\\n\\nCritique: ...
     \\n\\nRevisionRequest: ...\\n\\nRevision: ...\\n\\nHuman:"

Each labelled turn becomes a chat message: Human, CritiqueRequest and RevisionRequest are user turns;
Assistant, Critique and Revision are assistant turns. This is the same conversation shape the
critique_revise stage builds, so an example reads exactly like the task that follows it. A transcript may
also be given directly as a list of {"role", "content"} messages.
"""

from __future__ import annotations

import re
from pathlib import Path

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
_LABEL = re.compile(r"(?:^|\n\n)(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):[ ]?")


def parse_transcript(text: str) -> list[dict]:
    """One paper transcript → chat messages, in order; empty turns (the trailing 'Human:') are dropped."""
    parts = _LABEL.split(text)
    messages = []
    for label, content in zip(parts[1::2], parts[2::2]):
        content = content.strip()
        if content:
            messages.append({"role": ROLES[label], "content": content, "label": label})
    return messages


def _merge_same_role(messages: list[dict]) -> list[dict]:
    """Join consecutive turns of the same role (chat templates expect alternation)."""
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1]["content"] += "\n\n" + m["content"]
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


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
        messages = _merge_same_role(turns)
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
