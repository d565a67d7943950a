"""Constitutions: the shipped files validate; schema errors name file:line and key; show, diff, import, schema."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cai.cli import main as cli
from cai.constitution.schema import (
    Constitution,
    diff,
    format_diff,
    json_schema,
    load_constitution,
    show,
    word_diff,
)
from cai.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "constitutions").glob("*.yaml"))

GOOD = """\
name: mini
description: two principles
kind: specific
principles:
  - id: alpha
    critique: Find the harm in the last response.
    revision: Rewrite the response without the harm.
    feedback: Which response is less harmful?
    tags: [harm]
  - id: beta
    critique: Find the rudeness in the last response.
    revision: Rewrite the response politely.
    feedback: Which response is more polite?
    weight: 3
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def error_of(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_constitution(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- the shipped constitutions -------------------------------------------------------------------


def test_three_constitutions_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"harmless-specific", "good-for-humanity", "traits-specific"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_constitution_validates(path):
    c = load_constitution(path)
    assert c.name == path.stem
    assert len({p.id for p in c.principles}) == len(c.principles)
    for p in c.principles:
        assert p.critique.strip() and p.revision.strip() and p.feedback.strip()


def test_shipped_constitutions_cover_the_issue():
    harmless = load_constitution(ROOT / "constitutions/harmless-specific.yaml")
    assert harmless.kind == "specific" and len(harmless.principles) >= 12
    text = " ".join(
        p.critique + p.revision + p.feedback + " ".join(p.tags) for p in harmless.principles
    ).lower()
    for harm in (
        "harmful",
        "unethical",
        "racis",
        "sexis",
        "toxic",
        "dangerous",
        "illegal",
        "age",
        "medical",
        "legal",
        "insensitiv",
    ):
        assert harm in text, harm
    general = load_constitution(ROOT / "constitutions/good-for-humanity.yaml")
    assert general.kind == "general"
    assert len(general.principles) >= 2  # the one general principle, phrased a few ways
    assert sum("humanity" in p.feedback.lower() for p in general.principles) >= 2
    traits = load_constitution(ROOT / "constitutions/traits-specific.yaml")
    traits_text = " ".join(p.feedback + " ".join(p.tags) for p in traits.principles).lower()
    for trait in ("power", "self-preservation", "wealth"):
        assert trait in traits_text, trait


def test_validate_cli_accepts_all_shipped(capsys):
    rc, out, err = run_cli(capsys, "constitution", "validate", *map(str, SHIPPED))
    assert rc == 0, err
    assert err == ""
    assert out.count("ok  ") == len(SHIPPED)


# --- schema errors: one line, file:line, key, what was expected -------------------------------------


def test_missing_revision_names_file_and_line(tmp_path, capsys):
    text = GOOD.replace("    revision: Rewrite the response politely.\n", "")
    p = write(tmp_path, "no-revision.yaml", text)
    lines = text.splitlines()
    n = next(i for i, line in enumerate(lines, 1) if "id: beta" in line)  # the principle that lacks it
    msg = error_of(p)
    assert f"no-revision.yaml:{n}:" in msg
    assert "principles[1].revision" in msg and "missing" in msg
    rc, out, err = run_cli(capsys, "constitution", "validate", str(p))
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [f"error: {msg}"]


def test_missing_revision_through_the_process_exits_2_without_traceback(tmp_path):
    p = write(
        tmp_path, "broken.yaml", GOOD.replace("    revision: Rewrite the response without the harm.\n", "")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cai", "constitution", "validate", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert f"{p}:5:" in proc.stderr and "revision" in proc.stderr


def test_duplicate_id(tmp_path):
    p = write(tmp_path, "dup.yaml", GOOD.replace("id: beta", "id: alpha"))
    msg = error_of(p)
    assert msg.startswith(f"{p}:10:")
    assert "principles[1].id" in msg and "duplicate" in msg and "'alpha'" in msg and "line 5" in msg


def test_empty_principles(tmp_path):
    p = write(tmp_path, "empty.yaml", "name: e\nkind: general\n\nprinciples: []\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:4:") and "principles" in msg and "at least 1" in msg


@pytest.mark.parametrize(
    "old, new, line, key, expected",
    [
        ("    weight: 3", "    weight: heavy", 14, "principles[1].weight", "number"),
        ("    tags: [harm]", "    tags: 5", 9, "principles[0].tags", "list"),
        ("kind: specific", "kind: specifc", 3, "kind", "'specific' or 'general'"),
        ("id: beta", "id: Beta Two", 10, "principles[1].id", "lowercase"),
        (
            "    critique: Find the rudeness in the last response.",
            "    critique: ''",
            11,
            "principles[1].critique",
            "at least 1",
        ),
    ],
)
def test_wrong_type_or_value(tmp_path, old, new, line, key, expected):
    assert old in GOOD
    p = write(tmp_path, "typed.yaml", GOOD.replace(old, new))
    msg = error_of(p)
    assert msg.startswith(f"{p}:{line}:"), msg
    assert f"'{key}'" in msg and expected in msg


def test_yaml_that_does_not_parse(tmp_path):
    p = write(tmp_path, "bad.yaml", GOOD.replace("    tags: [harm]", "    tags: [harm"))
    msg = error_of(p)
    assert msg.startswith(f"{p}:")
    assert int(msg.split(":")[1]) in (9, 10)
    assert "YAML does not parse" in msg


def test_duplicate_yaml_key_is_not_silently_dropped(tmp_path):
    p = write(
        tmp_path, "twice.yaml", GOOD.replace("    weight: 3\n", "    weight: 3\n    feedback: Again?\n")
    )
    msg = error_of(p)
    assert msg == f"{p}:15: duplicate key 'principles[1].feedback' (first on line 13)"


def test_unknown_key_suggests_the_closest(tmp_path):
    p = write(
        tmp_path,
        "typo.yaml",
        GOOD.replace(
            "    revision: Rewrite the response politely.", "    revison: Rewrite the response politely."
        ),
    )
    msg = error_of(p)
    assert msg.startswith(f"{p}:12:")
    assert "unknown key 'principles[1].revison'" in msg and "did you mean 'revision'" in msg


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "a mapping"),
        ("- just\n- a list\n", "a mapping"),
        ("name: x\nkind: general\nprinciples:\n  - plain text\n", "principles[0]"),
    ],
)
def test_wrong_shapes(tmp_path, text, expected):
    msg = error_of(write(tmp_path, "shape.yaml", text))
    assert expected in msg


def test_non_utf8_and_missing_files(tmp_path):
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"\xff\xfe\x00name")
    assert "UTF-8" in error_of(p)
    assert "not found" in error_of(tmp_path / "absent.yaml")


def test_missing_few_shot_file_names_the_line(tmp_path):
    p = write(
        tmp_path,
        "fs.yaml",
        GOOD.replace("kind: specific\n", "kind: specific\nfew_shot:\n  feedback: nowhere.json\n"),
    )
    msg = error_of(p)
    assert msg.startswith(f"{p}:5:") and "nowhere.json" in msg


def test_few_shot_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "shots.json").write_text("[]")
    p = write(
        tmp_path,
        "fs.yaml",
        GOOD.replace("kind: specific\n", "kind: specific\nfew_shot:\n  feedback: shots.json\n"),
    )
    assert load_constitution(p).few_shot.feedback == str((tmp_path / "shots.json").resolve())


def test_every_file_given_is_checked(tmp_path, capsys):
    bad1 = write(tmp_path, "bad1.yaml", GOOD.replace("id: beta", "id: alpha"))
    bad2 = write(tmp_path, "bad2.yaml", "name: [\n")
    good = write(tmp_path, "good.yaml", GOOD)
    rc, out, err = run_cli(capsys, "constitution", "validate", str(bad1), str(good), str(bad2))
    assert rc == 2
    assert f"ok  {good}" in out
    errors = err.strip().splitlines()
    assert len(errors) == 2
    assert str(bad1) in errors[0] and str(bad2) in errors[1]


# --- import of the paper's JSON --------------------------------------------------------------------


def test_import_paper_json(tmp_path, capsys, shared_data):
    crit = shared_data / "cai-paper/CritiqueRevisionInstructions.json"
    fb = shared_data / "cai-paper/RLMadisonInstructions.json"
    out_path = tmp_path / "sub" / "paper.yaml"
    rc, out, err = run_cli(
        capsys, "constitution", "import", str(crit), "--feedback", str(fb), "-o", str(out_path)
    )
    assert rc == 0, err
    assert "16 principles" in out
    c = load_constitution(out_path)
    assert c.name == "paper" and c.kind == "specific" and len(c.principles) == 16
    raw_crit = json.loads(crit.read_text())
    raw_fb = json.loads(fb.read_text())
    for p, (key, entry), instruction in zip(c.principles, raw_crit.items(), raw_fb):
        assert p.id == key.lower()
        # labels and trailing cues of the paper's prompt format are gone; the text itself is kept
        for text in (p.critique, p.revision, p.feedback):
            assert "CritiqueRequest" not in text and "RevisionRequest" not in text
            assert not text.endswith(("Critique:", "Revision:", "Options:"))
        assert p.critique in entry["prompt"][0] and p.revision in entry["edit_request"]
        assert p.feedback == instruction.strip().removesuffix("Options:").strip()  # paired by position
    rc, out, err = run_cli(capsys, "constitution", "validate", str(out_path))
    assert rc == 0, err


def test_import_without_feedback_and_with_name(tmp_path, shared_data, capsys):
    out_path = tmp_path / "p.yaml"
    crit = shared_data / "cai-paper/CritiqueRevisionInstructions.json"
    rc, _, err = run_cli(
        capsys, "constitution", "import", str(crit), "-o", str(out_path), "--name", "sl-only"
    )
    assert rc == 0, err
    c = load_constitution(out_path)
    assert c.name == "sl-only" and len(c.principles) == 16
    assert all(p.feedback for p in c.principles)


def test_import_bad_json_is_a_user_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, out, err = run_cli(capsys, "constitution", "import", str(bad), "-o", str(tmp_path / "o.yaml"))
    assert rc == 2 and str(bad) in err and len(err.strip().splitlines()) == 1
    bad.write_text(json.dumps({"x": {"prompt": ["only a prompt"]}}))
    rc, out, err = run_cli(capsys, "constitution", "import", str(bad), "-o", str(tmp_path / "o.yaml"))
    assert rc == 2 and "edit_request" in err
    assert not (tmp_path / "o.yaml").exists()


# --- diff, show, schema ------------------------------------------------------------------------------


def test_word_diff():
    assert word_diff("a b c d", "a x c d e") == "a [-b-] {+x+} c d {+e+}"
    assert word_diff("same words", "same words") == "same words"


def test_diff_added_removed_changed(tmp_path, capsys):
    old = write(tmp_path, "old.yaml", GOOD)
    new_text = GOOD.replace("Find the harm in the last response.", "Find every harm in the last response.")
    new_text = new_text.replace("id: beta", "id: gamma")  # beta removed, gamma (other text) added
    new_text = new_text.replace("Which response is more polite?", "Which response is kinder?")
    new_text = new_text.replace("    tags: [harm]", "    tags: [harm, danger]")
    new = write(tmp_path, "new.yaml", new_text)
    d = diff(load_constitution(old), load_constitution(new))
    assert d == {
        "added": ["gamma"],
        "removed": ["beta"],
        "renamed": {},
        "changed": {"alpha": ["critique", "tags"]},
        "order": None,
        "few_shot": {},
    }
    rc, out, err = run_cli(capsys, "constitution", "diff", str(old), str(new))
    assert rc == 0, err
    assert "+ added    gamma" in out and "- removed  beta" in out and "~ changed  alpha" in out
    assert "critique: Find [-the-] {+every+} harm in the last response." in out
    rc, out, _ = run_cli(capsys, "constitution", "diff", str(old), str(old))
    assert out.strip() == "no differences"


def test_diff_of_shipped_constitutions_runs():
    a = load_constitution(ROOT / "constitutions/harmless-specific.yaml")
    b = load_constitution(ROOT / "constitutions/traits-specific.yaml")
    text = format_diff(a, b)
    assert text.count("+ added") == len(b.principles) - len(set(a.by_id()) & set(b.by_id()))


def test_show(tmp_path, capsys):
    c = load_constitution(write(tmp_path, "mini.yaml", GOOD))
    text = show(c)
    assert text.splitlines()[0] == "mini (specific, 2 principles)"
    assert "- alpha [harm]  p=0.25" in text and "- beta  p=0.75" in text  # sampling probability from weights
    assert "revision: Rewrite the response politely." in text
    rc, out, _ = run_cli(capsys, "constitution", "show", str(ROOT / "constitutions/harmless-specific.yaml"))
    assert rc == 0 and "harmless-specific (specific," in out


def test_sampling_respects_weights(tmp_path):
    import random

    c = load_constitution(write(tmp_path, "mini.yaml", GOOD))
    picks = [p.id for p in c.sample(random.Random(0), k=4000)]
    assert 0.70 < picks.count("beta") / len(picks) < 0.80
    assert [p.id for p in c.sample(random.Random(1), k=20)] == [
        p.id for p in c.sample(random.Random(1), k=20)
    ]


def test_json_schema_export(capsys):
    rc, out, _ = run_cli(capsys, "constitution", "schema")
    assert rc == 0
    schema = json.loads(out)
    assert schema == json_schema()
    assert set(schema["required"]) == {"name", "kind", "principles"}
    assert schema["additionalProperties"] is False
    principle = schema["$defs"]["Principle"]
    assert {"id", "critique", "revision", "feedback"} <= set(principle["required"])
    assert principle["additionalProperties"] is False
    assert all(prop.get("description") for prop in principle["properties"].values())
    # every key used by the shipped files is one the schema knows
    for path in SHIPPED:
        data = yaml.safe_load(path.read_text())
        assert set(data) <= set(schema["properties"])
        for p in data["principles"]:
            assert set(p) <= set(principle["properties"])


def test_round_trip_through_yaml(tmp_path):
    from cai.constitution.schema import to_yaml

    c = load_constitution(ROOT / "constitutions/harmless-specific.yaml")
    out = tmp_path / "copy.yaml"
    out.write_text(to_yaml(c))
    assert load_constitution(out) == c
    assert Constitution.model_validate(yaml.safe_load(out.read_text())) == c


# --- diff: what reaches the stages, not the bytes of the file -------------------------------------------


def test_diff_whitespace_only_edit_is_no_change(tmp_path, capsys):
    """A trailing newline from `feedback: |` is stripped by the labeller: no change to any prompt."""
    old = write(tmp_path, "old.yaml", GOOD)
    text = GOOD.replace(
        "    feedback: Which response is more polite?\n",
        "    feedback: |\n      Which response is more polite?\n",
    )
    new = write(tmp_path, "new.yaml", text)
    assert load_constitution(new).principles[1].feedback.endswith("\n")
    assert diff(load_constitution(old), load_constitution(new))["changed"] == {}
    assert run_cli(capsys, "constitution", "diff", str(old), str(new))[1].strip() == "no differences"


def test_diff_reports_a_rename_the_order_and_few_shot_files(tmp_path, capsys):
    old = write(tmp_path, "old.yaml", GOOD)
    renamed = write(tmp_path, "renamed.yaml", GOOD.replace("id: beta", "id: politeness"))
    d = diff(load_constitution(old), load_constitution(renamed))
    assert (d["added"], d["removed"], d["renamed"]) == ([], [], {"beta": "politeness"})
    assert (
        "> renamed  beta -> politeness" in run_cli(capsys, "constitution", "diff", str(old), str(renamed))[1]
    )
    # swapping the principles changes which one the stages' seeded draw picks: it is a difference
    a, b = GOOD.index("  - id: alpha"), GOOD.index("  - id: beta")
    swapped = write(tmp_path, "swapped.yaml", GOOD[:a] + GOOD[b:] + GOOD[a:b])
    d = diff(load_constitution(old), load_constitution(swapped))
    assert d["order"] == {"old": ["alpha", "beta"], "new": ["beta", "alpha"]} and not d["changed"]
    assert (
        "~ order    alpha, beta -> beta, alpha"
        in run_cli(capsys, "constitution", "diff", str(old), str(swapped))[1]
    )
    # a few-shot file with other content is a difference (path and content hash); a copy is not
    for name, answer in (
        ("fs1", "No."),
        ("fs2", "Yes."),
        ("copy", "No."),
    ):  # few-shot files validate is checked
        shot = {"prompt": "\n\nHuman: Hi?\n\nAssistant:", "corrects": [answer], "incorrects": ["Go away."]}
        (tmp_path / f"{name}.json").write_text(json.dumps([shot]))
    fs = {
        n: write(
            tmp_path,
            f"{n}.yaml",
            GOOD.replace("kind: specific\n", f"kind: specific\nfew_shot:\n  feedback: {n}.json\n"),
        )
        for n in ("fs1", "fs2", "copy")
    }
    d = diff(load_constitution(fs["fs1"]), load_constitution(fs["fs2"]))
    assert d["few_shot"]["feedback"]["old"].endswith("fs1.json") and d["few_shot"]["feedback"][
        "new"
    ].endswith("fs2.json")
    assert d["few_shot"]["feedback"]["old_sha256"] != d["few_shot"]["feedback"]["new_sha256"]
    out = run_cli(capsys, "constitution", "diff", str(fs["fs1"]), str(fs["fs2"]))[1]
    assert "~ few_shot.feedback:" in out and "fs2.json (sha256 " in out
    assert diff(load_constitution(fs["fs1"]), load_constitution(fs["copy"]))["few_shot"] == {}


@pytest.mark.parametrize(
    "alpha_weight, beta_weight, line, expected",
    [
        (1, ".inf", 15, "'principles[1].weight': Input should be a finite number"),
        (1, ".nan", 15, "'principles[1].weight': Input should be a finite number"),
        ("1.0e308", "1.0e308", 4, "'principles': weights whose total is a finite number are expected"),
    ],
)
def test_weights_must_be_finite_and_so_must_their_total(tmp_path, alpha_weight, beta_weight, line, expected):
    """`random.choices` (Constitution.sample, in the stages) refuses an infinite total: refused at validation."""
    text = GOOD.replace("    tags: [harm]", f"    tags: [harm]\n    weight: {alpha_weight}")
    p = write(tmp_path, "w.yaml", text.replace("    weight: 3", f"    weight: {beta_weight}"))
    msg = error_of(p)
    assert msg.startswith(f"{p}:{line}:") and expected in msg, msg


def test_import_refuses_two_names_with_one_id(tmp_path, capsys):
    crit = tmp_path / "dup.json"
    entry = {"prompt": ["Find the harm."], "edit_request": "Rewrite it without the harm."}
    crit.write_text(json.dumps({"Harmful 1": entry, "harmful-1": entry}))
    rc, out, err = run_cli(capsys, "constitution", "import", str(crit), "-o", str(tmp_path / "o.yaml"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "'Harmful 1' and 'harmful-1' both become principle id 'harmful-1'" in err and str(crit) in err


@pytest.mark.parametrize(
    "old, new, line, key",
    [
        (
            "    critique: Find the harm in the last response.",
            "    critique: '   '",
            6,
            "principles[0].critique",
        ),
        ("    revision: Rewrite the response politely.", '    revision: "\\n"', 12, "principles[1].revision"),
        ("    feedback: Which response is less harmful?", "    feedback: |\n", 8, None),
        ("name: mini", "name: ' '", 1, "name"),
        ("    tags: [harm]", "    tags: [harm, ' ']", 9, "principles[0].tags[1]"),
    ],
)
def test_blank_texts_are_refused(tmp_path, old, new, line, key):
    msg = error_of(write(tmp_path, "blank.yaml", GOOD.replace(old, new)))
    if key is None:  # a `|` block of blank lines is "" to YAML: refused as empty
        assert "principles[0].feedback" in msg
    else:
        assert msg.startswith(f"{tmp_path / 'blank.yaml'}:{line}: key '{key}': a text that is not blank"), msg


def test_few_shot_files_of_the_wrong_format_are_refused(tmp_path, shared_data):
    paper = shared_data / "cai-paper"
    swapped = f"few_shot:\n  critique_revise: {paper / 'RLMadisonFewShotPrompts.json'}\n"
    swapped += f"  feedback: {paper / 'CritiqueRevisionFewShotPrompts.json'}\n"
    p = write(tmp_path, "swapped.yaml", GOOD.replace("kind: specific\n", "kind: specific\n" + swapped))
    msg = error_of(p)
    assert msg.startswith(f"{p}:5: key 'few_shot.critique_revise': not a usable few-shot file: {paper}"), msg
    assert "item 0: a transcript string or a list of messages is expected" in msg
    p.write_text(p.read_text().replace("critique_revise: " + str(paper / "RLMadison"), "critique_revise: x"))
    p = write(
        tmp_path,
        "fb.yaml",
        GOOD.replace(
            "kind: specific\n",
            "kind: specific\n" + swapped.split("\n", 2)[0] + "\n" + swapped.split("\n")[2] + "\n",
        ),
    )
    msg = error_of(p)
    assert (
        msg.startswith(f"{p}:5: key 'few_shot.feedback': not a usable few-shot file:") and "'prompt'" in msg
    )
    right = f"few_shot:\n  critique_revise: {paper / 'CritiqueRevisionFewShotPrompts.json'}\n"
    right += f"  feedback: {paper / 'RLMadisonFewShotPrompts.json'}\n"
    load_constitution(
        write(tmp_path, "right.yaml", GOOD.replace("kind: specific\n", "kind: specific\n" + right))
    )


def test_import_refuses_lists_of_different_lengths(tmp_path, capsys):
    crit = tmp_path / "cr.json"
    entries = {f"e{i}": {"prompt": [f"Critique {i}."], "edit_request": f"Revise {i}."} for i in range(3)}
    crit.write_text(json.dumps(entries))
    for n in (1, 5):
        fb = tmp_path / f"fb{n}.json"
        fb.write_text(json.dumps([f"Which is better, {i}?" for i in range(n)]))
        rc, out, err = run_cli(
            capsys, "constitution", "import", str(crit), "--feedback", str(fb), "-o", str(tmp_path / "o.yaml")
        )
        assert rc == 2 and f"{n} feedback instruction(s) but 3 critique/revision entries" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.yaml").exists()


@pytest.mark.parametrize("weight", ["true", "yes", "'2'", "false"])
def test_weight_is_a_number_not_a_bool_or_text(tmp_path, weight):
    p = write(tmp_path, "w.yaml", GOOD.replace("    weight: 3", f"    weight: {weight}"))
    assert error_of(p).startswith(f"{p}:14: key 'principles[1].weight': Input should be a valid number")


def test_weight_accepts_ints_floats_and_exponents(tmp_path):
    for weight, value in (("2", 2.0), ("0.5", 0.5), ("1e-3", 1e-3), ("2.5E+2", 250.0)):
        p = write(tmp_path, "w.yaml", GOOD.replace("    weight: 3", f"    weight: {weight}"))
        assert load_constitution(p).principles[1].weight == value


def test_diff_ignores_a_reformatted_few_shot_file(tmp_path, capsys):
    shots = [{"prompt": "\n\nHuman: Hi?\n\nAssistant:", "corrects": ["Hello."], "incorrects": ["Go away."]}]
    (tmp_path / "a.json").write_text(json.dumps(shots))
    (tmp_path / "b.json").write_text(json.dumps(shots, indent=2))
    shots[0]["corrects"] = ["Hello there."]
    (tmp_path / "c.json").write_text(json.dumps(shots))
    fs = {
        n: write(
            tmp_path,
            f"{n}.yaml",
            GOOD.replace("kind: specific\n", f"kind: specific\nfew_shot:\n  feedback: {n}.json\n"),
        )
        for n in "abc"
    }
    assert run_cli(capsys, "constitution", "diff", str(fs["a"]), str(fs["b"]))[1].strip() == "no differences"
    assert "~ few_shot.feedback:" in run_cli(capsys, "constitution", "diff", str(fs["a"]), str(fs["c"]))[1]


def test_non_utf8_error_names_the_line(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(GOOD.replace("two principles", "caf\xe9").encode("latin-1"))
    assert error_of(p).startswith(f"{p}:2: not a UTF-8 text file")


def test_a_big_file_without_aliases_is_no_alias_bomb(tmp_path, monkeypatch):
    import cai.yamlio

    monkeypatch.setattr(cai.yamlio, "MAX_NODES", 50)  # a file of 100 principles has ~600 values, no alias
    many = "".join(
        f"  - id: p{i}\n    critique: c{i}\n    revision: r{i}\n    feedback: Which {i}?\n"
        for i in range(100)
    )
    assert len(load_constitution(write(tmp_path, "big.yaml", GOOD + many)).principles) == 102
    bomb = 'a: &a ["x", "x", "x", "x", "x", "x", "x", "x"]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b]\n'
    with pytest.raises(UserError, match="YAML aliases expand to more than 50 values"):
        load_constitution(write(tmp_path, "bomb.yaml", bomb + GOOD))
