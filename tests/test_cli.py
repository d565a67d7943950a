"""The command line: every (sub)command has --help; the issue's contract is there; errors are one line, exit 2."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cai.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser, found by walking its subparsers (so later commands are covered)."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths.extend(command_paths(sub, prefix + (name,)))
    return paths


COMMANDS = command_paths(cli.build_parser())

# The contract of issue 2, and the commands later issues add through cai.cli.EXTENSIONS.
CONTRACT = [
    ("run",),
    ("recipe", "validate"),
    ("recipe", "schema"),
    ("constitution", "validate"),
    ("constitution", "show"),
    ("constitution", "diff"),
    ("constitution", "import"),
    ("constitution", "schema"),
    ("models", "list"),
    ("models", "prepare"),
]
LATER = {
    "cai.eval.measure": [("pm", "eval"), ("feedback", "eval")],
    "cai.report.klfit": [("analyze", "kl-reward")],
    "cai.stages.report": [("report",)],
    "cai.cli.constitution": [
        ("constitution", "test"),
        ("constitution", "lint"),
        ("constitution", "effect"),
    ],
}


def cai_proc(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cai", *argv], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_console_script_help():
    exe = Path(sys.executable).parent / "cai"
    cmd = (
        [str(exe)]
        if exe.exists()
        else [shutil.which("cai") or pytest.fail("the `cai` console script is not installed")]
    )
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: cai")
    for name in ("run", "recipe", "constitution", "models"):
        assert name in proc.stdout


def test_contract_commands_exist():
    missing = [" ".join(c) for c in CONTRACT if c not in COMMANDS]
    assert not missing, f"missing commands: {missing}"


def test_later_commands_exist_once_their_module_does():
    for module, commands in LATER.items():
        if importlib.util.find_spec(module) is None:
            continue  # that issue has not landed yet
        missing = [" ".join(c) for c in commands if c not in COMMANDS]
        assert not missing, f"{module} is there but these commands are not: {missing}"


@pytest.mark.parametrize("path", [()] + COMMANDS, ids=lambda p: " ".join(p) or "cai")
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*path, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cai" + "".join(f" {p}" for p in path))


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_argument_has_help_positionals_too():
    missing = [
        f"{' '.join(path)}: {a.dest}"
        for path, parser in _parsers(cli.build_parser())
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction) and not a.help
    ]
    assert not missing, missing


def test_every_command_that_loads_a_model_has_the_same_model_flags():
    from cai.cli.options import add_model_flags

    probe = argparse.ArgumentParser()
    add_model_flags(probe)
    model_flags = {o for a in probe._actions for o in a.option_strings if o not in ("-h", "--help")}
    loaders = [
        path
        for path, parser in _parsers(cli.build_parser())
        if any("--model" in a.option_strings for a in parser._actions) or path == ("models", "prepare")
    ]
    assert ("constitution", "lint") in loaders and len(loaders) >= 6
    for path, parser in _parsers(cli.build_parser()):
        if path in loaders:
            flags = {o for a in parser._actions for o in a.option_strings}
            assert model_flags <= flags, (path, model_flags - flags)


def test_stage_names_in_the_help_and_version_with_commit(capsys):
    from cai.config.recipe import STAGES

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--only STAGE", "--from STAGE"):
        text = out[out.index(flag, out.index("options:")) :][:300]
        assert all(s in text for s in STAGES), (flag, text)
    assert "--force" in out
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    version = capsys.readouterr().out
    assert version.startswith("cai ") and ("(commit " in version) == (ROOT / ".git").exists()


def test_a_new_score_head_is_one_line_naming_the_role(capfd, tiny_dir):
    from cai.runtime.models import load_model

    load_model("tiny-random-llama", kind="seq_cls", role="preference model backbone")
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err  # the library's table is gone
    lines = [ln for ln in (out + err).splitlines() if "score.weight" in ln]
    assert lines == [
        "[cai] preference model backbone 'tiny-random-llama': new scalar head (score.weight), randomly "
        "initialised, to be trained"
    ]


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage: cai" in capsys.readouterr().err


def test_models_list():
    proc = cai_proc("models", "list")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert set(rows) >= {"smollm2-135m-instruct", "tiny-random-llama"}
    for line in rows.values():
        assert " cached " in line or " not cached " in line


def test_run_help_has_the_contract_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for option in ("--run-dir", "--only", "--from", "--set"):
        assert option in out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "recipe.yaml").write_text("name: x\nsft:\n  lerning_rate: 0.1\n")
    (d / "constitution.yaml").write_text("name: x\nkind: specific\nprinciples: []\n")
    (d / "notjson.json").write_text("{oops")
    (d / "tabs.yaml").write_text("name: x\n\tkind: general\n")
    return d


ERRORS = [
    (("constitution", "validate", "{d}/missing.yaml"), "file not found"),
    (("recipe", "validate", "{d}"), "a folder, where a file is expected"),
    (("constitution", "validate", "{d}"), "a folder, where a file is expected"),
    (("constitution", "validate", "{d}/constitution.yaml"), "constitution.yaml:3:"),
    (("constitution", "validate", "{d}/tabs.yaml"), "YAML does not parse"),
    (("constitution", "show", "{d}/constitution.yaml"), "principles"),
    (
        ("constitution", "diff", "constitutions/harmless-specific.yaml", "{d}/constitution.yaml"),
        "constitution.yaml:3:",
    ),
    (("constitution", "import", "{d}/notjson.json", "-o", "{d}/out.yaml"), "notjson.json"),
    (("recipe", "validate", "{d}/recipe.yaml"), "did you mean 'learning_rate'"),
    (("run", "{d}/recipe.yaml"), "recipe.yaml:3: unknown key 'sft.lerning_rate'"),
    (
        ("run", "recipes/tiny.yaml", "--set", "ppo.kl=0.1", "--run-dir", "{d}/run"),
        "--set ppo.kl=0.1: unknown key",
    ),
    (
        (
            "run",
            "recipes/tiny.yaml",
            "--set",
            "arms=[{{name: a, set: {{ppo.kl_coef: abc}}}}]",
            "--run-dir",
            "{d}/run",
        ),
        "error: --set arms=[{name: a, set: {ppo.kl_coef: abc}}]: arms.0 (a)",  # it named tiny.yaml:3
    ),
    (("models", "prepare", "gpt-17"), "unknown model alias 'gpt-17'"),
]


@pytest.mark.parametrize(
    "argv, expected", ERRORS, ids=lambda v: " ".join(v[:2]) if isinstance(v, tuple) else None
)
def test_errors_are_one_line_exit_2_no_traceback(bad_files, argv, expected):
    proc = cai_proc(*[a.format(d=bad_files) for a in argv])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not (bad_files / "run").exists()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_flag_out_of_range_is_a_user_error_naming_the_flag(seed):
    """--seed -1 reached transformers' set_seed (a numpy traceback); Settings now refuses it, and the model
    flags turn that into one line naming the flag."""
    from cai.cli.options import settings_of
    from cai.errors import UserError

    args = argparse.Namespace(device="cpu", dtype="auto", trust_remote_code=False, seed=seed)
    with pytest.raises(UserError, match=r"^--seed: Input should be"):
        settings_of(args)
    assert settings_of(argparse.Namespace(**{**vars(args), "seed": 7})).seed == 7


def test_a_closed_stdout_pipe_ends_quietly():
    """`cai ... | head` printed a BrokenPipeError traceback, exit code 1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cai", "recipe", "schema"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    proc.stdout.close()  # the reader is gone before cai writes a line (`cai ... | head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_an_os_error_is_one_line_exit_2(monkeypatch, capsys):
    """An OSError a check did not foresee (a folder that cannot be made) was a traceback with exit code 1."""

    def fail(a):
        raise FileNotFoundError(2, "No such file or directory", "/proc/no/run")

    monkeypatch.setattr(cli, "_cmd_recipe_schema", fail)
    assert cli.main(["recipe", "schema"]) == 2
    assert capsys.readouterr().err == "error: /proc/no/run: No such file or directory\n"


@pytest.fixture
def finished_looking_run(tmp_path, tiny_recipe):
    """A run folder with only its recipe.json (what `cai report` reads first)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text(tiny_recipe().model_dump_json())
    return run


def test_every_out_is_checked_before_any_work(tmp_path, finished_looking_run, capsys):
    """pm eval, feedback eval, analyze kl-reward and report crashed with a FileExistsError traceback on an
    --out that is a file, the eval commands only after scoring; they now refuse it first, in one line."""
    occupied = tmp_path / "occupied"
    occupied.write_text("a file\n")
    for argv, out in (
        (["pm", "eval", "--model", "no-such-pm", "--suite", "pairs"], occupied),
        (["feedback", "eval", "--model", "no-such-model", "--suite", "harmful-vs-ethical"], occupied),
        (["feedback", "eval", "--model", "no-such-model", "--suite", "pairs"], occupied / "sub"),
        (["analyze", "kl-reward", str(tmp_path / "no-run")], occupied),
        (["report", str(finished_looking_run)], occupied),
    ):
        assert cli.main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out {out}: ") and "\n" not in err, err
    (finished_looking_run / "report").write_text("in the way\n")  # the default --out, RUN/report
    assert cli.main(["report", str(finished_looking_run)]) == 2
    assert "an existing file; a folder" in capsys.readouterr().err
