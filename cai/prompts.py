"""Prompt sources: the built-in red-team and helpful sets, HH-format transcripts, JSONL files and datasets."""

from __future__ import annotations

import re

_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_transcript(text: str) -> list[dict]:
    """Split an HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...') into chat messages, in order."""
    parts = _TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def split_hh_pair(row: dict) -> tuple[list[dict], str, str]:
    """An HH preference row → (conversation up to the last human turn, chosen reply, rejected reply)."""
    chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise ValueError("an HH pair must end with an assistant turn")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
