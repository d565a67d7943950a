"""Anthropic HH-format data, the one parser for it: '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts (also the
CAI paper's few-shot files, which add CritiqueRequest/Critique/RevisionRequest/Revision turns), preference
rows {"chosen", "rejected"} that differ only in the last assistant turn, and human pairs for the PM's data mix.
"""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

from cai.errors import UserError
from cai.yamlio import iter_jsonl

HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str, roles: dict[str, str] | None = None, drop_empty: bool = False) -> list[dict]:
    """Split a transcript into {"role", "content", "label"} turns, in order. `roles` maps a turn label ('Human')
    to a chat role ('user'); a turn starts at the beginning or after a blank line. Contents are stripped; with
    `drop_empty`, empty turns (a trailing 'Assistant:') are left out. Windows line ends (CRLF) read as LF;
    text before the first label is not a turn (callers that keep it check that the text starts with one)."""
    roles = roles or HH_ROLES
    pattern = re.compile(r"(?:^|\n\n)(" + "|".join(map(re.escape, roles)) + r"):[ ]?")
    parts = pattern.split(text.replace("\r\n", "\n").lstrip())
    turns = []
    for label, content in zip(parts[1::2], parts[2::2]):
        content = content.strip()
        if content or not drop_empty:
            turns.append({"role": roles[label], "content": content, "label": label})
    return turns


def parse_hh_transcript(text: str) -> list[dict]:
    """An HH transcript as chat messages {"role", "content"}, in order (empty turns kept)."""
    return [{"role": t["role"], "content": t["content"]} for t in parse_transcript(text)]


def merge_same_role(messages: list[dict]) -> list[dict]:
    """Consecutive turns of one role as one turn, the non-empty contents joined by a blank line: strict chat
    templates need user and assistant turns to alternate, and a few HH rows (harmless-base dev 668, 764, 1320)
    have two assistant turns in a row."""
    out = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            joined = "\n\n".join(c for c in (out[-1]["content"], m["content"]) if c)
            out[-1] = {**out[-1], "content": joined}
        else:
            out.append(dict(m))
    return out


class NotComparable(ValueError):
    """An HH row whose two replies answer different conversations (2 of the 1800 harmless-base dev rows: the
    last human turn glued into an assistant turn on one side), left out wherever pairs are read."""


def split_hh_pair(row: dict) -> tuple[list[dict], str, str]:
    """An HH preference row → (conversation up to the last human turn, its same-role turns merged; chosen reply,
    rejected reply); a ValueError for a row that is not one."""
    if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        raise ValueError("'chosen' and 'rejected' must be transcript strings")
    chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise ValueError("an HH pair must end with an assistant turn")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2 or chosen[-2]["role"] != "user":
        # a reply is only comparable to one answering the same conversation, which ends with the human
        raise NotComparable(
            "an HH pair's two transcripts must share the conversation up to a last human turn"
        )
    # turns of one role in a row inside the conversation are one turn (strict templates need alternation)
    return merge_same_role(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def read_hh(path: str | Path) -> list[dict]:
    """HH preference rows ({"chosen", "rejected"}) from a .jsonl or .jsonl.gz file; errors name file:line."""
    rows = []
    for n, row in iter_jsonl(path, "an object with 'chosen' and 'rejected' transcripts"):
        if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise UserError(
                f"{path}:{n}: an object with 'chosen' and 'rejected' transcript strings is expected"
            )
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no preference pairs (the file has no rows)")
    return rows


def check_pair_file(path: str | Path, rows: int = 100) -> None:
    """Preflight of an HH pair file (feedback.check_set, human_mix, preference_model.human_data, gold.data), read
    as the stages read it: a row that is not an object with 'chosen' and 'rejected' strings stops them (a
    UserError naming file:line); one whose transcripts do not make a pair they skip, so the file passes once one
    of its first `rows` rows is an HH preference pair."""
    first = None
    for n, row in itertools.islice(
        iter_jsonl(path, "an object with 'chosen' and 'rejected' transcripts"), rows
    ):
        if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise UserError(
                f"{path}:{n}: an object with 'chosen' and 'rejected' transcript strings is expected"
            )
        try:
            split_hh_pair(row)
            return
        except ValueError as exc:  # NotComparable among them: the stages skip such a row
            first = first or f"{path}:{n}: not an HH preference pair: {exc}"
    raise UserError(first or f"{path}: no preference pairs (the file has no rows)")


def human_pairs(path, ratio: float, n_ai: int, seed: int, taken: list[dict] = ()) -> list[dict]:
    """round(ratio·n_ai) human pairs from an HH file, the chosen reply as response_a with p_a = 1.0; none of the
    pairs already among `taken` (the same conversation and replies: feedback.human_mix's from the same file)."""
    rows, _ = hh_pair_rows(path)
    random.Random(f"{seed}:human_mix").shuffle(rows)
    have = {_pair_text(r) for r in taken}
    return [r for r in rows if _pair_text(r) not in have][: round(ratio * n_ai)]


def _pair_text(row: dict) -> tuple:
    return (repr(row.get("messages")), str(row.get("response_a")).strip(), str(row.get("response_b")).strip())


def hh_pair_rows(path: str | Path) -> tuple[list[dict], int]:
    """The preference pairs of an HH file as PM training rows (the chosen reply as response_a, p_a 1.0, ids by
    line), and how many rows were skipped: not a pair (no final assistant turn on each side) or identical
    replies. A row that is not an object with transcript strings is a UserError naming its line."""
    out, skipped, n_rows = [], 0, 0
    for n, row in iter_jsonl(path, "an object with 'chosen' and 'rejected' transcripts"):
        n_rows += 1
        if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
            raise UserError(f"{path}:{n}: 'chosen' and 'rejected' transcript strings are expected")
        try:
            messages, chosen, rejected = split_hh_pair(row)
        except ValueError:
            skipped += 1
            continue
        if chosen.strip() == rejected.strip() or not chosen.strip() or not rejected.strip():
            skipped += 1
            continue
        pid = f"hh-{n}"
        out.append(
            {
                "id": pid,
                "prompt_id": pid,
                "kind": "human",
                "messages": messages,
                "response_a": chosen,
                "response_b": rejected,
                "p_a": 1.0,
                "source": "human",
            }
        )
    if not n_rows:
        raise UserError(f"{path}: no preference pairs (the file has no rows)")
    return out, skipped
