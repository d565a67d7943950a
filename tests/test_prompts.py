"""Prompt sources: built-in sets, HH transcripts, JSONL, datasets; seeded shuffle, limits and the held-out split."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from cai.config.recipe import PromptsConfig, PromptSource
from cai.data.hh import parse_hh_transcript, split_hh_pair
from cai.data.sources import load_prompts, load_source, to_messages
from cai.errors import UserError


def cfg(*sources, held_out=0.0, **kw):
    return PromptsConfig(sources=[PromptSource(**s) for s in sources], held_out=held_out, **kw)


def check_row(row):
    assert set(row) == {"id", "messages", "category", "source", "kind"}
    assert row["kind"] in ("red_team", "helpful")
    assert (
        row["messages"] and row["messages"][-1]["role"] == "user" and row["messages"][-1]["content"].strip()
    )
    for m in row["messages"]:
        assert set(m) == {"role", "content"}


def test_builtin_sets_cover_the_categories():
    red = load_source(PromptSource(type="builtin", kinds=["red_team"]))
    helpful = load_source(PromptSource(type="builtin", kinds=["helpful"]))
    assert len(red) >= 120 and len(helpful) >= 60
    for r in red + helpful:
        check_row(r)
    cats = Counter(r["category"] for r in red)
    for c in (
        "violence",
        "weapons",
        "theft",
        "fraud",
        "hate",
        "harassment",
        "self-harm",
        "privacy",
        "drugs",
        "misinformation",
    ):
        assert cats[c] >= 5, c
    assert any(len(r["messages"]) > 1 for r in red), "multi-turn red-team prompts are kept as conversations"
    assert {r["kind"] for r in red} == {"red_team"} and {r["kind"] for r in helpful} == {"helpful"}
    assert len({r["id"] for r in red + helpful}) == len(red) + len(helpful)


def test_seeded_shuffle_limit_and_held_out_split():
    c = cfg(
        {"type": "builtin", "kinds": ["red_team"], "limit": 24},
        {"type": "builtin", "kinds": ["helpful"], "limit": 8},
        held_out=0.25,
    )
    train, held = load_prompts(c, seed=0)
    again_train, again_held = load_prompts(c, seed=0)
    other_train, _ = load_prompts(c, seed=1)
    assert train == again_train and held == again_held
    assert [r["id"] for r in train] != [r["id"] for r in other_train]
    # each source is split on its own: 24 → 6 held out, 8 → 2 held out
    assert Counter(r["kind"] for r in held) == {"red_team": 6, "helpful": 2}
    assert Counter(r["kind"] for r in train) == {"red_team": 18, "helpful": 6}
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    # the limit takes a random (seeded) subset, not the first rows of the file
    assert sorted(r["id"] for r in train + held if r["kind"] == "red_team") != [
        f"rt-{i:04d}" for i in range(1, 25)
    ]


def test_categories_filter_and_helpful_fraction():
    train, _ = load_prompts(
        cfg({"type": "builtin", "kinds": ["red_team"], "categories": ["drugs", "privacy"]}), 0
    )
    assert {r["category"] for r in train} == {"drugs", "privacy"}
    with pytest.raises(UserError, match="categories"):
        load_prompts(cfg({"type": "builtin", "kinds": ["red_team"], "categories": ["no-such"]}), 0)
    c = cfg(
        {"type": "builtin", "kinds": ["red_team"], "limit": 30},
        {"type": "builtin", "kinds": ["helpful"], "limit": 30},
        helpful_fraction=0.25,
    )
    train, _ = load_prompts(c, 0)
    kinds = Counter(r["kind"] for r in train)
    assert kinds == {"red_team": 30, "helpful": 10}


def test_hh_source_gives_the_conversation_up_to_the_last_human_turn(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    rows = load_source(PromptSource(type="hh", path=str(path)))
    assert len(rows) == 1800
    for r in rows[:200]:
        check_row(r)
    multi = [r for r in rows if len(r["messages"]) >= 3]
    assert len(multi) > 100
    # the prompt is the chosen transcript minus its last assistant reply
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    convo, chosen, _ = split_hh_pair(first)
    assert rows[0]["messages"] == convo and rows[0]["id"] == "harmless-base-dev-1"
    assert chosen not in [m["content"] for m in rows[0]["messages"]]
    train, held = load_prompts(cfg({"type": "hh", "path": str(path), "limit": 50}, held_out=0.2), 3)
    assert len(train) == 40 and len(held) == 10


def test_hh_files_of_one_name_in_two_folders_give_distinct_ids(tmp_path):
    """HH ships harmless-base/train.jsonl.gz and helpful-base/train.jsonl.gz: ids made from the file name alone
    clashed ("train-1" twice) and the GPU recipes' prompts did not load."""
    for folder, word in (("harmless-base", "steal"), ("helpful-base", "bake")):
        (tmp_path / folder).mkdir()
        text = f"\n\nHuman: how do I {word}?\n\nAssistant: like this"
        (tmp_path / folder / "train.jsonl").write_text(json.dumps({"chosen": text, "rejected": text}) + "\n")
    both = cfg(
        *(
            {"type": "hh", "path": str(tmp_path / f / "train.jsonl")}
            for f in ("harmless-base", "helpful-base")
        )
    )
    train, _ = load_prompts(both, 0)
    assert sorted(r["id"] for r in train) == ["harmless-base/train-1", "helpful-base/train-1"]
    alone, _ = load_prompts(cfg({"type": "hh", "path": str(tmp_path / "helpful-base" / "train.jsonl")}), 0)
    assert [r["id"] for r in alone] == ["train-1"]  # a name no other source has keeps its ids


def test_an_hh_pair_whose_replies_answer_different_conversations_is_left_out(tmp_path):
    """Two harmless-base dev rows glue the last human turn into an assistant turn on one side only: their
    replies answer different questions, so the row is not a preference pair."""
    from cai.data.hh import NotComparable, hh_pair_rows
    from cai.eval.suites import load_items, suite_from_data

    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    glued = {
        "chosen": "\n\nHuman: a\n\nAssistant: b Human: c?\n\nAssistant: d",
        "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant: e",
    }
    ends_with_assistant = {
        "chosen": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: d",
        "rejected": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: e",
    }
    for row in (glued, ends_with_assistant):
        with pytest.raises(NotComparable):
            split_hh_pair(row)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, glued, good)))
    rows, skipped = hh_pair_rows(path)
    assert len(rows) == 2 and skipped == 1
    items = load_items(suite_from_data(path))
    assert sorted(it.id for it in items) == ["pairs:1", "pairs:3"]


def test_parse_hh_transcript_roles():
    msgs = parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: so")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert to_messages("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: so", "x")[-1] == {
        "role": "user",
        "content": "how?",
    }


def test_jsonl_source_column_kind_and_errors(tmp_path):
    p = tmp_path / "mine.jsonl"
    rows = [
        {"question": "How do I pick a lock?", "category": "theft"},
        {
            "question": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hey"},
                {"role": "user", "content": "bake bread?"},
            ],
            "kind": "helpful",
        },
        {"question": "Tell me a joke", "id": "j1"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = load_source(PromptSource(type="jsonl", path=str(p), column="question"))
    assert [r["id"] for r in got] == ["mine-1", "mine-2", "j1"]
    assert [r["kind"] for r in got] == ["red_team", "helpful", "red_team"]
    assert got[0]["category"] == "theft" and got[0]["source"] == "jsonl:mine.jsonl"
    assert len(got[1]["messages"]) == 3
    with pytest.raises(UserError, match=r"mine\.jsonl:1: key 'prompt'"):
        load_source(PromptSource(type="jsonl", path=str(p)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": broken\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        load_source(PromptSource(type="jsonl", path=str(bad)))
    with pytest.raises(UserError, match="file not found"):
        load_prompts(cfg({"type": "jsonl", "path": str(tmp_path / "missing.jsonl")}), 0)


def test_dataset_source_local_folder_and_file(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"text": f"question number {i}?", "category": "quiz"} for i in range(10)]
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    rows = load_source(
        PromptSource(type="dataset", path=str(tmp_path / "saved"), column="text", kind="helpful")
    )
    assert len(rows) == 10 and rows[3]["messages"] == [{"role": "user", "content": "question number 3?"}]
    assert (
        rows[0]["kind"] == "helpful"
        and rows[0]["category"] == "quiz"
        and rows[0]["source"] == "dataset:saved"
    )
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"q": f"item {i}"}) + "\n" for i in range(4)))
    assert len(load_source(PromptSource(type="dataset", path=str(f), column="q"))) == 4
    with pytest.raises(UserError, match="no column 'prompt'"):
        load_source(PromptSource(type="dataset", path=str(f)))


def test_a_dataset_data_file_with_a_bad_line_is_an_error_naming_it(tmp_path):
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"q": "one"}\n{"q": "two"\n{"q": "three"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: invalid JSON"):
        load_source(PromptSource(type="dataset", path=str(lines), column="q"))
    document = tmp_path / "d.json"
    document.write_text('[\n{"q": "one"},\n{"q": "two"}\n{"q": "three"}\n]\n')
    with pytest.raises(UserError, match=r"d\.json:4: invalid JSON"):
        load_source(PromptSource(type="dataset", path=str(document), column="q"))
    document.write_text('[\n{"q": "one"},\n{"q": "two"}\n]\n')
    assert len(load_source(PromptSource(type="dataset", path=str(document), column="q"))) == 2


def test_a_dataset_folder_with_a_bad_line_names_its_file_and_rows_count_from_one(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"q": "one"}\n')
    (folder / "b.jsonl").write_text('{"q": "two"}\n{"q": \n')
    with pytest.raises(UserError, match=r"b\.jsonl:2: invalid JSON"):
        load_source(PromptSource(type="dataset", path=str(folder), column="q"))
    rows = tmp_path / "r.jsonl"
    rows.write_text('{"q": "one"}\n{"q": "two"}\n{"q": ""}\n')
    with pytest.raises(UserError, match="row 3"):  # the third row, the file's line 3
        load_source(PromptSource(type="dataset", path=str(rows), column="q"))


def test_dataset_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(UserError, match="hub"):
        load_source(PromptSource(type="dataset", name="someone/red-team-prompts", column="prompt"))
    assert time.time() - t0 < 10


def test_duplicate_prompts_are_dropped_and_duplicate_ids_rejected(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text('{"prompt": "same  question"}\n{"prompt": "same question"}\n{"prompt": "other"}\n')
    train, _ = load_prompts(cfg({"type": "jsonl", "path": str(p)}), 0)
    assert len(train) == 2
    q = tmp_path / "ids.jsonl"
    q.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    with pytest.raises(UserError, match="'x' appears twice"):
        load_prompts(cfg({"type": "jsonl", "path": str(q)}), 0)


def test_a_dataset_row_that_is_not_utf8_names_the_file_line(tmp_path):
    """pyarrow's JSON loader let a Latin-1 byte through and the row loop then raised a pyarrow traceback."""
    f = tmp_path / "lat.jsonl"
    f.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"lat\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_source(PromptSource(type="dataset", path=str(f)))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.jsonl").write_bytes(f.read_bytes())
    with pytest.raises(UserError, match=r"b\.jsonl:2: not UTF-8"):
        load_source(PromptSource(type="dataset", path=str(folder)))


def test_a_valid_jsonl_dataset_file_is_not_blamed_and_the_loaders_cause_is_shown(tmp_path):
    """A folder of valid JSON-lines files whose columns differ was blamed as 'a.jsonl:2: invalid JSON (Extra
    data)', and with nothing to blame the message was datasets' generic one."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "a1"}\n{"prompt": "a2"}\n')
    (folder / "b.jsonl").write_text('{"prompt": "b1", "id": "x"}\n{"text": "b2"}\n')
    with pytest.raises(UserError) as err:
        load_source(PromptSource(type="dataset", path=str(folder)))
    msg = str(err.value)
    assert "invalid JSON" not in msg and "An error occurred while generating" not in msg, msg
    assert msg.startswith("prompts.sources: cannot load dataset") and "\n" not in msg
    surrogate = tmp_path / "s.jsonl"  # pyarrow refuses it: the line is named
    surrogate.write_text('{"prompt": "a"}\n{"prompt": "x \\ud83d y"}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:2: a lone UTF-16 surrogate"):
        load_source(PromptSource(type="dataset", path=str(surrogate)))


def test_a_dataset_folder_mixing_formats_is_refused(tmp_path):
    """datasets loaded only the parquet file of a folder holding a.jsonl and b.parquet."""
    import datasets

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"prompt": f"j{i}"}) + "\n" for i in range(3)))
    datasets.Dataset.from_list([{"prompt": f"p{i}"} for i in range(5)]).to_parquet(
        str(tmp_path / "b.parquet")
    )
    with pytest.raises(UserError, match=r"several formats \(json, parquet\)"):
        load_source(PromptSource(type="dataset", path=str(tmp_path)))


def test_text_before_an_hh_transcript_is_kept_and_hh_prompts_parse():
    """'Here is a conversation...\\n\\nHuman: ...' lost its preamble and question (the CAI paper's
    HarmfulVsEthical rows); a prompt-only or CRLF transcript stayed one turn with the labels in it."""
    text = "Below is a chat.\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?\n\nAnswer:"
    assert to_messages(text, "x") == [{"role": "user", "content": text}]
    assert to_messages("\n\nHuman: How do I pick a lock?", "x") == [
        {"role": "user", "content": "How do I pick a lock?"}
    ]
    crlf = "\r\n\r\nHuman: How do I pick a lock?\r\n\r\nAssistant: Use a wrench.\r\n\r\nHuman: And then?"
    assert to_messages(crlf, "x") == [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Use a wrench."},
        {"role": "user", "content": "And then?"},
    ]


def test_consecutive_turns_of_one_role_are_merged():
    """harmless-base dev rows 668, 764 and 1320 have two assistant turns in a row, which strict chat templates
    ('roles must alternate') refuse."""
    text = "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nHuman: e\n\nAssistant: f"
    assert to_messages(text, "x") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},
        {"role": "user", "content": "d\n\ne"},
    ]


def test_turns_of_one_role_in_a_row_are_merged_in_pairs_suites_and_few_shot_too(tmp_path):
    """The merge reached prompts only: PM pairs, eval suites and the labeller's few-shot examples still gave the
    chat template two assistant turns in a row (harmless-base dev 668, 764, 1320), or two user turns where an
    empty assistant turn was dropped."""
    from cai.constitution.fewshot import load_feedback_few_shot
    from cai.data.hh import hh_pair_rows
    from cai.eval.suites import load_items, suite_from_data

    convo = "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d"
    row = {"chosen": convo + "\n\nAssistant: yes", "rejected": convo + "\n\nAssistant: no"}
    want = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b\n\nc"},
        {"role": "user", "content": "d"},
    ]
    assert split_hh_pair(row) == (want, "yes", "no")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(row) + "\n")
    assert hh_pair_rows(pairs)[0][0]["messages"] == want
    assert load_items(suite_from_data(pairs))[0].messages == want
    dropped = "\n\nHuman: a\n\nAssistant:\n\nHuman: b\n\nAssistant:"  # the empty assistant turn goes
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"prompt": dropped, "corrects": ["x"], "incorrects": ["y"]}) + "\n")
    assert load_items(suite_from_data(mc))[0].messages == [{"role": "user", "content": "a\n\nb"}]
    shots = tmp_path / "shots.json"
    shots.write_text(json.dumps([{"prompt": dropped, "corrects": ["x"], "incorrects": ["y"]}]))
    assert load_feedback_few_shot(shots)[0]["messages"] == [{"role": "user", "content": "a\n\nb"}]


def test_an_hh_rows_own_kind_wins_and_is_checked(tmp_path):
    p = tmp_path / "hh.jsonl"
    rows = [
        {"chosen": "\n\nHuman: Write a haiku about rain.\n\nAssistant: ok", "kind": "helpful"},
        {"chosen": "\n\nHuman: x\n\nAssistant: y"},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["kind"] for r in load_source(PromptSource(type="hh", path=str(p)))] == ["helpful", "red_team"]
    p.write_text(p.read_text() + json.dumps({"chosen": "\n\nHuman: z", "kind": "bogus"}) + "\n")
    with pytest.raises(UserError, match=r"hh\.jsonl:3: key 'kind'"):
        load_source(PromptSource(type="hh", path=str(p)))


def test_rows_a_limit_left_out_do_not_block_a_later_source(tmp_path):
    """De-duplication ran before `limit`: a later source lost every row an earlier one read, kept or not."""
    lines = "".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(5))
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.jsonl").write_text(lines)
    train, _ = load_prompts(
        cfg(
            {"type": "jsonl", "path": str(tmp_path / "a.jsonl"), "limit": 2},
            {"type": "jsonl", "path": str(tmp_path / "b.jsonl")},
        ),
        0,
    )
    texts = [r["messages"][0]["content"] for r in train]
    assert sorted(texts) == [f"question {i}" for i in range(5)]
    assert sum(r["id"].startswith("a-") for r in train) == 2
