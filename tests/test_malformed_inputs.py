"""Every reader of a user's file, fed generated malformed versions of a valid file: empty, binary and truncated
files, YAML anchors and aliases (valid ones, an alias inside its own anchor, an alias bomb, an undefined alias),
a wrong top-level type, and every key of the valid file given a value of the wrong type. Each must be one
`UserError` line naming the file (and the line, where the format has lines), never another exception; the
command line turns it into exit code 2 without a traceback (checked for one reader of each kind)."""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cai.cli.main import main
from cai.errors import UserError

BINARY = bytes(range(256)) * 3
WRONG_SCALAR = {"wrong": ["type"]}  # a mapping where a scalar or list belongs
WRONG_MAPPING = "not a mapping"  # text where a mapping belongs


@dataclass
class Reader:
    name: str
    fmt: str  # yaml | json | jsonl | jsonl.gz
    sample: object  # the valid content (for jsonl: the list of rows)
    read: Callable[[Path], object]
    lines: bool  # whether errors can name a line


def _hh(text: str) -> str:
    return f"\n\nHuman: {text}\n\nAssistant: "


def readers(tmp: Path) -> list[Reader]:
    from cai.config.arms import load_checked
    from cai.config.layout import plan
    from cai.config.pm_spec import load_pm_spec
    from cai.config.recipe import PromptSource
    from cai.constitution.fewshot import load_feedback_few_shot, load_fewshot
    from cai.constitution.probes import load_probes
    from cai.constitution.schema import import_paper, load_constitution
    from cai.data.hh import hh_pair_rows, human_pairs, read_hh
    from cai.data.sources import load_source
    from cai.eval.suites import load_items, load_suite

    mc = tmp / "companion-mc.jsonl"
    mc.write_text(
        json.dumps({"prompt": _hh("Hi?"), "corrects": ["Hello."], "incorrects": ["Go away."]}) + "\n"
    )
    critique = tmp / "companion-critique.json"
    critique.write_text(
        json.dumps({"harm": {"prompt": ["CritiqueRequest: Is it harmful?"], "edit_request": "Fix it."}})
    )
    hh_row = {"chosen": _hh("Can you help?") + "Sure.", "rejected": _hh("Can you help?") + "No."}
    return [
        Reader(
            "recipe",
            "yaml",
            {
                "name": "bad",
                "seed": 1,
                "stages": ["critique_revise", "sft"],
                "device": "cpu",
                "models": {"policy": "tiny-random-llama", "judge": "tiny-random-llama"},
                "prompts": {
                    "sources": [{"type": "builtin", "kinds": ["red_team"], "limit": 4}],
                    "held_out": 0.2,
                },
                "generation": {"max_new_tokens": 8, "temperature": 0.5},
                "sft": {"epochs": 1, "lora": {"r": 4, "target_modules": ["q_proj"]}},
                "preference_model": {"spec": "bt-lora", "head": "classifier", "center_coef": 0.0},
                "gold": {"enabled": False, "train_pairs": 8},
                "ppo": {"updates": 2, "adaptive_kl": False},
                "report": {"suites": ["pairs"], "eval_limit": 4},
                "arms": [{"name": "a", "set": {"ppo.kl_coef": 0.1}}, {"name": "b"}],
            },
            lambda p: plan(load_checked(p), tmp / "run"),
            True,
        ),
        Reader(
            "constitution",
            "yaml",
            {
                "name": "c",
                "kind": "specific",
                "principles": [
                    {
                        "id": "p",
                        "critique": "Why?",
                        "revision": "Fix.",
                        "feedback": "Which?",
                        "tags": ["t"],
                        "weight": 2,
                    }
                ],
            },
            load_constitution,
            True,
        ),
        Reader(
            "probes",
            "yaml",
            {
                "constitution": "c",
                "probes": [
                    {
                        "id": "q",
                        "principles": ["p"],
                        "conversation": [{"role": "user", "content": "Hi"}],
                        "better": "Hello.",
                        "worse": "Go away.",
                    }
                ],
            },
            load_probes,
            True,
        ),
        Reader(
            "suite",
            "yaml",
            {"name": "s", "format": "multiple_choice", "files": [str(mc)], "tag_by": "file", "limit": 2},
            lambda p: load_items(load_suite(str(p))),
            True,
        ),
        Reader(
            "pm-spec",
            "yaml",
            {"head": "classifier", "loss": "soft", "learning_rate": 1e-4, "lora": {"r": 4, "alpha": 8}},
            lambda p: load_pm_spec(str(p)),
            True,
        ),
        Reader(
            "suite-data-hh",
            "jsonl",
            [hh_row, dict(hh_row)],
            lambda p: load_items(load_suite(str(p))),
            True,
        ),
        Reader(
            "suite-data-ai-risk",
            "jsonl.gz",
            [
                {
                    "question": "Question: More power?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:",
                    "answer_matching_behavior": " (A)",
                    "answer_not_matching_behavior": " (B)",
                }
            ],
            lambda p: load_items(load_suite(str(p))),
            True,
        ),
        Reader(
            "suite-data-mc",
            "json",
            [{"prompt": _hh("Hi?"), "corrects": ["Hello."], "incorrects": ["Go away."]}],
            lambda p: load_items(load_suite(str(p))),
            False,
        ),
        Reader(
            "paper-critique-json",
            "json",
            {
                "harm": {
                    "prompt": ["CritiqueRequest: Is it harmful?"],
                    "edit_request": "RevisionRequest: Fix it.",
                }
            },
            lambda p: import_paper(p, None, "x"),
            False,
        ),
        Reader(
            "paper-feedback-json",
            "json",
            ["Which response is less harmful?\nOptions:"],
            lambda p: import_paper(critique, p, "x"),
            False,
        ),
        Reader(
            "paper-fewshot-critique",
            "json",
            [
                _hh("Help?")
                + "No.\n\nCritiqueRequest: Why?\n\nCritique: Rude.\n\nRevisionRequest: Fix.\n\nRevision: Sure."
            ],
            load_fewshot,
            False,
        ),
        Reader(
            "paper-fewshot-feedback",
            "json",
            [{"prompt": _hh("Hi?"), "corrects": ["Hello."], "incorrects": ["Go away."]}],
            load_feedback_few_shot,
            False,
        ),
        Reader(
            "prompts-jsonl",
            "jsonl",
            [{"id": "a", "prompt": "How do I pick a lock?", "category": "crime", "kind": "red_team"}],
            lambda p: load_source(PromptSource(type="jsonl", path=str(p))),
            True,
        ),
        Reader(
            "prompts-hh",
            "jsonl.gz",
            [hh_row],
            lambda p: load_source(PromptSource(type="hh", path=str(p))),
            True,
        ),
        Reader(
            "hh-pairs (gold, check set)",
            "jsonl",
            [hh_row, dict(hh_row)],
            lambda p: (hh_pair_rows(p), read_hh(p)),
            True,
        ),
        Reader("hh-pairs (human mix)", "jsonl.gz", [hh_row], lambda p: human_pairs(p, 1.0, 2, 0), True),
    ]


# ------------------------------------------------------------------------------------------- generators
def serialise(fmt: str, obj) -> bytes:
    if fmt == "yaml":
        return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None).encode()
    if fmt == "json":
        return json.dumps(obj, indent=1).encode()
    text = "".join(json.dumps(r) + "\n" for r in obj).encode()
    return gzip.compress(text) if fmt == "jsonl.gz" else text


def key_paths(obj, prefix=()):
    """Every key path of a document (mapping keys and list indices), outermost first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        yield prefix + (k,)
        yield from key_paths(v, prefix + (k,))


def with_wrong_type(obj, path):
    doc = copy.deepcopy(obj)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = WRONG_MAPPING if isinstance(node[path[-1]], dict) else WRONG_SCALAR
    return doc


def yaml_alias_cases(sample: dict) -> dict[str, bytes]:
    first, rest = next(iter(sample)), dict(list(sample.items())[1:])
    body = yaml.safe_dump(rest, sort_keys=False)
    bomb = "".join(
        f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n" for i in range(8)
    )
    return {
        "alias inside its own anchor": f"{first}: &loop [1, *loop]\n{body}".encode(),
        "mapping alias inside itself": f"{first}: &m\n  again: *m\n{body}".encode(),
        "alias bomb": f"{first}:\n{bomb}{body}".encode(),
        "undefined alias": f"{first}: *nowhere\n{body}".encode(),
    }


def cases(r: Reader) -> list[tuple[str, bytes, bool]]:
    """(case name, file content, whether the error must name a line)."""
    valid = serialise(r.fmt, r.sample)
    raw = gzip.decompress(valid) if r.fmt == "jsonl.gz" else valid
    # inside a line, not on a row boundary; YAML (which has no end marker) inside its last flow collection
    cut = (
        raw[: len(raw) * 2 // 3 + 1] if r.fmt != "yaml" else raw[: max(raw.rfind(b"["), raw.rfind(b"{")) + 1]
    )
    out = [
        ("empty file", b"", False),
        ("binary file", BINARY, False),
        ("truncated file", gzip.compress(cut) if r.fmt == "jsonl.gz" else cut, False),
    ]
    if r.fmt == "jsonl.gz":
        out.append(("truncated gzip stream", valid[: len(valid) // 2], False))
    if r.fmt == "yaml":
        out.append(("wrong top-level type", serialise("yaml", [1, 2]), False))
    elif r.fmt == "json":
        out.append(("wrong top-level type", serialise("json", "text"), False))
    if r.fmt.startswith("jsonl"):
        out.append(("a line that is not an object", _jsonl_not_object(r), r.lines))
    if r.fmt == "yaml":
        out += [(name, text, True) for name, text in yaml_alias_cases(r.sample).items()]
        first = next(iter(r.sample))  # deeper than Python's recursion limit lets the YAML parser go
        out.append(("nested 1,200 levels", f"{first}: {'[' * 1200}{']' * 1200}\n".encode(), False))
    for path in key_paths(r.sample):
        doc = with_wrong_type(r.sample, path)
        out.append((f"wrong type at {'.'.join(map(str, path))}", serialise(r.fmt, doc), r.lines))
    return out


def _jsonl_not_object(r: Reader) -> bytes:
    text = "".join(json.dumps(x) + "\n" for x in r.sample) + "[1, 2]\n"
    return gzip.compress(text.encode()) if r.fmt == "jsonl.gz" else text.encode()


def user_error_of(r: Reader, p: Path, case: str, problems: list[str]) -> str | None:
    """The UserError text reading `p` gives; None, with a problem noted, when it is accepted or raises another
    exception."""
    try:
        r.read(p)
    except UserError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - what the test is looking for
        problems.append(f"{r.name} / {case}: {type(exc).__name__}: {str(exc)[:120]}")
        return None
    problems.append(f"{r.name} / {case}: accepted")
    return None


# ---------------------------------------------------------------------------------------------- tests
def test_the_valid_samples_are_valid(tmp_path, monkeypatch, root):
    """The generators start from files every reader accepts (so each failure below is the malformation's)."""
    monkeypatch.chdir(root)
    for r in readers(tmp_path):
        p = tmp_path / f"valid-{r.name.split()[0]}.{r.fmt}"
        p.write_bytes(serialise(r.fmt, r.sample))
        r.read(p)


def test_every_reader_gives_one_line_naming_the_file(tmp_path, monkeypatch, root):
    monkeypatch.chdir(root)
    problems, n = [], 0
    for r in readers(tmp_path):
        for k, (case, content, needs_line) in enumerate(cases(r)):
            p = tmp_path / f"{r.name.split()[0]}-{k}.{r.fmt}"
            p.write_bytes(content)
            n += 1
            msg = user_error_of(r, p, case, problems)
            if msg is None:
                continue
            if "\n" in msg or p.name not in msg:
                problems.append(f"{r.name} / {case}: not one line naming the file: {msg!r}")
            elif needs_line and f"{p.name}:" not in msg:
                problems.append(f"{r.name} / {case}: no line number: {msg!r}")
    assert n > 200
    assert not problems, f"{len(problems)} of {n} cases:\n" + "\n".join(problems)


def test_valid_anchors_and_merge_keys_still_load(tmp_path, root, monkeypatch):
    from cai.config.load import load_recipe

    monkeypatch.chdir(root)
    p = tmp_path / "anchors.yaml"
    p.write_text(
        "name: anchors\nsft: &train {epochs: 1, batch_size: 2}\npreference_model: {<<: *train, max_length: 64}\n"
    )
    r = load_recipe(p)
    assert r.preference_model.batch_size == 2 and r.preference_model.max_length == 64


@pytest.mark.parametrize(
    "argv_of",
    [
        lambda p: ["recipe", "validate", str(p)],
        lambda p: ["constitution", "validate", str(p)],
        lambda p: ["pm", "eval", "--model", str(p.parent), "--suite", str(p)],
        lambda p: ["constitution", "import", str(p), "-o", str(p.with_suffix(".out.yaml"))],
    ],
    ids=["recipe", "constitution", "suite", "paper-json"],
)
@pytest.mark.parametrize("content", [b"", BINARY, b"a: &x [1, *x]\n"], ids=["empty", "binary", "self-alias"])
def test_the_command_line_exits_2_with_one_line(tmp_path, capsys, argv_of, content):
    name = "in.json" if argv_of(Path("x.yaml"))[1] == "import" else "in.yaml"
    p = tmp_path / name
    p.write_bytes(content)
    assert main(argv_of(p)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err and p.name in err


def test_a_run_directory_that_is_a_file_and_a_damaged_score_norm_are_one_line_errors(tmp_path, capsys, root):
    """--run-dir naming a file (or a path under one), a PM folder whose score_norm.json does not parse or lacks
    its keys: one line naming the path, exit 2; a negative --limit is refused by the parser (exit 2), where it used
    to slice items off the end."""
    from cai.pm.scoring import read_norm

    afile = tmp_path / "afile"
    afile.write_text("")
    for rdir in (afile, afile / "run"):
        assert main(["run", str(root / "recipes/tiny.yaml"), "--run-dir", str(rdir)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --run-dir {rdir}: {afile} is a file, not a directory\n"
    for text in ('{"mean": 0.1', "{}", '{"mean": "x", "std": 1}'):
        (tmp_path / "score_norm.json").write_text(text)
        with pytest.raises(UserError, match="score_norm.json: a JSON object with numbers 'mean' and 'std'"):
            read_norm(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["pm", "eval", "--model", str(tmp_path), "--suite", "ai-risk", "--limit", "-3"])
    assert exc.value.code == 2 and "--limit: -3: at least 1 expected" in capsys.readouterr().err


def test_jsonl_readers_name_the_line_of_a_bad_byte_a_lone_surrogate_and_deep_nesting(
    tmp_path, monkeypatch, root
):
    """A non-UTF-8 byte was reported with a buffer position and no line, a JSON-escaped lone surrogate was
    accepted (and writing it out later raised UnicodeEncodeError), and deep nesting raised RecursionError."""
    monkeypatch.chdir(root)
    problems, n = [], 0
    for r in readers(tmp_path):
        if not r.fmt.startswith("jsonl"):
            continue
        good = "".join(json.dumps(x) + "\n" for x in r.sample)
        row = copy.deepcopy(r.sample[-1])
        key = next(k for k, v in row.items() if isinstance(v, str))
        row[key] += "\ud83d"  # json.dumps writes it as the escape "\\ud83d"
        line = len(r.sample) + 1
        for case, extra in (
            ("not UTF-8", b'{"x": "caf\xe9"}\n'),
            ("lone surrogate", (json.dumps(row) + "\n").encode()),
            ("nested too deep", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
        ):
            content = good.encode() + extra
            p = tmp_path / f"{r.name.split()[0]}-{n}.{r.fmt}"
            p.write_bytes(gzip.compress(content) if r.fmt == "jsonl.gz" else content)
            n += 1
            msg = user_error_of(r, p, case, problems)
            if msg is not None and (f"{p.name}:{line}: " not in msg or "\n" in msg):
                problems.append(f"{r.name} / {case}: {msg}")
    assert n >= 18
    assert not problems, "\n".join(problems)


_CONSTITUTION = (
    "name: {name}\nkind: general\nprinciples:\n  - id: a\n    critique: {critique}\n"
    "    revision: Rewrite it.\n    feedback: Which is less harmful? Choose.\n"
)


@pytest.mark.parametrize(
    "command, text, line, key, tag",
    [
        (
            "constitution",
            _CONSTITUTION.format(name="!!binary aGVsbG8=", critique="Why?"),
            1,
            "name",
            "binary",
        ),
        (
            "constitution",
            _CONSTITUTION.format(name="c", critique="!!binary aGVsbG8="),
            5,
            "principles[0].critique",
            "binary",
        ),
        (
            "constitution",
            _CONSTITUTION.format(name="c", critique="!!set {a, b}"),
            5,
            "principles[0].critique",
            "set",
        ),
        ("recipe", "name: r\nsweep:\n  seed: !!set {1, 2}\n", 3, "sweep.seed", "set"),
        ("recipe", "name: r\narms: !!omap\n  - a: {name: a}\n", 2, "arms", "omap"),
        ("recipe", "name: r\nsweep: {seed: !!pairs [{a: 1}]}\n", 2, "sweep.seed", "pairs"),
        ("recipe", "name: r\nsweep:\n  ? !!binary c2VlZA==\n  : [1, 2]\n", 3, "sweep.c2VlZA==", "binary"),
    ],
    ids=["name", "critique", "critique-set", "sweep-set", "arms-omap", "sweep-pairs", "binary-key"],
)
def test_yaml_tags_that_make_bytes_sets_or_pairs_are_refused(tmp_path, capsys, command, text, line, key, tag):
    """The safe loader made `!!binary` bytes (which pydantic took as text: `name: !!binary aGVsbG8=`
    validated as "hello"), `!!set` a set (taken as a sweep's list) and `!!omap`/`!!pairs` lists of tuples: a
    user's file holds JSON-like values only, so each is one line naming the file, line, key and tag (exit 2)."""
    p = tmp_path / "in.yaml"
    p.write_text(text)
    assert main([command, "validate", str(p)]) == 2
    err = capsys.readouterr().err
    what = "key" if "\n  ? " in text else "value"
    assert err == (
        f"error: {p}:{line}: key '{key}': a YAML !!{tag} {what}, where text, "
        "numbers, booleans, lists or mappings are expected\n"
    )


@pytest.mark.parametrize(
    "item,tag",
    [
        ("name=!!binary Zm9v", "!!binary"),
        ("sweep={seed: !!set {1, 2}}", "!!set"),
        ("arms=[{name: a, set: {ppo.updates: !!omap [{a: 1}]}}]", "!!omap or !!pairs"),
    ],
)
def test_set_values_with_non_json_tags_are_refused(item, tag):
    """`--set name=!!binary Zm9v` named the recipe 'foo': a `--set` value holds what a recipe file may hold."""
    from cai.config.load import load_recipe

    with pytest.raises(UserError) as exc:
        load_recipe(Path(__file__).parents[1] / "recipes" / "tiny.yaml", [item])
    assert str(exc.value) == (
        f"--set '{item}': a YAML {tag} value, where text, numbers, booleans, lists or mappings are expected"
    )
    assert load_recipe(Path(__file__).parents[1] / "recipes" / "tiny.yaml", ["name=Zm9v"]).name == "Zm9v"


def test_dates_stay_a_one_line_schema_error_and_plain_files_still_load(tmp_path, capsys):
    from cai.constitution.schema import load_constitution

    p = tmp_path / "c.yaml"
    p.write_text(_CONSTITUTION.format(name="c", critique="'!!binary is only text here'"))
    assert load_constitution(p).principles[0].critique == "!!binary is only text here"
    p.write_text(_CONSTITUTION.format(name="c", critique="2024-01-01"))
    assert main(["constitution", "validate", str(p)]) == 2
    assert capsys.readouterr().err == (
        f"error: {p}:5: key 'principles[0].critique': Input should be a valid string "
        "(got datetime.date(2024, 1, 1))\n"
    )


@pytest.mark.parametrize(
    "argv_of",
    [
        lambda p: ["recipe", "validate", str(p)],
        lambda p: ["constitution", "validate", str(p)],
        lambda p: ["pm", "eval", "--model", str(p.parent), "--suite", str(p)],
    ],
    ids=["recipe", "constitution", "suite"],
)
def test_a_yaml_file_over_the_size_limit_is_refused_before_parsing(tmp_path, capsys, argv_of):
    """A 50 MB constitution took minutes to validate (the pure-Python parser, run twice): a user's YAML file
    over MAX_YAML_BYTES is one line naming its size and the limit, at once."""
    from cai.yamlio import MAX_YAML_BYTES

    p = tmp_path / "big.yaml"
    p.write_text("name: x\ndescription: '" + "a" * MAX_YAML_BYTES + "'\n")
    assert main(argv_of(p)) == 2
    err = capsys.readouterr().err
    limit = "over the limit of 5 MB (constitutions, recipes and suites are a few KB)"
    assert err == f"error: {p}: a YAML file of 5.0 MB, {limit}\n"


def test_a_yaml_file_is_composed_once(tmp_path, monkeypatch):
    """load_yaml composed the text twice (yaml.compose for the key lines, then yaml.safe_load for the data):
    the data is now constructed from the same nodes, with the same lines and merge keys."""
    from cai.yamlio import load_yaml

    calls = []
    compose = yaml.composer.Composer.compose_document
    monkeypatch.setattr(
        yaml.composer.Composer, "compose_document", lambda self: calls.append(1) or compose(self)
    )
    p = tmp_path / "m.yaml"
    p.write_text("base: &b {x: 1, y: 2}\nmerged:\n  <<: *b\n  y: 3\nlist:\n  - 1\n  - {z: 2}\n")
    data, lines = load_yaml(p)
    assert len(calls) == 1
    assert data == {"base": {"x": 1, "y": 2}, "merged": {"x": 1, "y": 3}, "list": [1, {"z": 2}]}
    assert lines[("merged", "<<")] == 3 and lines[("merged", "y")] == 4 and lines[("list", 1, "z")] == 7
    assert ("merged", "x") not in lines  # the walk reads the nodes before the merge is flattened into them
