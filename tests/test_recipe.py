"""Recipes: every shipped recipe parses (and points at files that exist); errors name key, suggestion and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai.cli import main as cli
from cai.config.load import load_recipe, parse_value, validate_dotted_key
from cai.config.recipe import STAGES, Recipe
from cai.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))  # a glob, so recipes added later are covered too

MINI = """\
name: mini
seed: 3
models:
  policy: tiny-random-llama
prompts:
  sources:
    - {type: builtin, kinds: [red_team], limit: 4}
sft:
  batch_size: 2
  learning_rate: 1.0e-3
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(path: Path, overrides=None) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- every recipe in the repository -------------------------------------------------------------------


def test_the_two_foundation_recipes_exist():
    assert {"tiny.yaml", "quickstart.yaml"} <= {p.name for p in RECIPES}


def _local_model_ref(ref: str | None) -> Path | None:
    """A model reference that names a local file or folder (not an alias or hub id)."""
    from cai.runtime.models import ALIASES

    if not ref or ref in ALIASES or ref in ("sft", "base"):
        return None
    if ref.startswith((".", "/", "~")) or ref.endswith(".gguf") or ref.count("/") != 1:
        return Path(ref).expanduser()
    return None


def _shipped(f: str) -> bool:
    """A path into the repository (a folder it has) or into the shared data beside it."""
    parts = Path(f).parts
    return parts[:2] == ("..", "shared") or (not Path(f).is_absolute() and (ROOT / parts[0]).is_dir())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_its_files_exist(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their files relative to the repository root
    r = load_recipe(path)
    assert r.name
    assert list(r.stages) == [s for s in STAGES if s in r.stages]
    files = [r.constitution, r.feedback_constitution, r.critique_revise.few_shot, r.feedback.few_shot]
    data = [
        s.path for s in r.prompts.sources if s.type in ("hh", "jsonl") or (s.type == "dataset" and s.path)
    ]
    data += [x.path for x in (r.feedback.check_set, r.feedback.human_mix) if x is not None]
    # Data the user downloads first (GPU recipes say how, e.g. into data/) is not checked; data the
    # project ships or reads from ../shared/data must be there.
    files += [f for f in data if f and _shipped(f)]
    for f in filter(None, files):
        assert Path(f).exists(), f"{path.name}: {f} does not exist"
    for c in filter(None, [r.constitution, r.feedback_constitution]):
        from cai.constitution.schema import load_constitution

        load_constitution(c)
    for ref in [
        r.models.policy,
        r.models.feedback,
        r.models.reward_backbone,
        r.models.judge,
        r.feedback.policy,
    ]:
        local = _local_model_ref(ref)
        assert local is None or local.exists(), f"{path.name}: model {ref} does not exist"
    for arm in r.arms or []:
        for key in arm.set:
            validate_dotted_key(key)
    for key in r.sweep or {}:
        validate_dotted_key(key)


def test_recipe_validate_cli_on_all_cpu_recipes(capsys, monkeypatch):
    """The CPU recipes run here, so they validate; the GPU ones name their downloads (tests/test_preflight.py)."""
    monkeypatch.chdir(ROOT)
    cpu = [str(p.relative_to(ROOT)) for p in RECIPES if not p.name.startswith("gpu-")]
    rc = cli.main(["recipe", "validate", *cpu])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.count("ok  ") == len(cpu)


def test_defaults_are_safe():
    r = Recipe(name="x")
    assert r.trust_remote_code is False
    assert r.device == "auto" and r.dtype == "auto"
    assert list(r.stages) == list(STAGES)


def test_the_default_policy_is_the_embedded_smollm2():
    """The README calls SmolLM2 the embedded default; a recipe without models.policy trained the random 2-layer
    test model, and validate said ok. (Tests name tiny-random-llama in their recipes.)"""
    assert Recipe(name="x").models.policy == "smollm2-135m-instruct"
    assert Recipe(name="x", models={"feedback": "tiny-random-llama"}).models.policy == "smollm2-135m-instruct"


# --- misspelt keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "old, new, line, key, suggestion",
    [
        ("sft:\n  batch_size: 2", "sft:\n  batchsize: 2", 9, "sft.batchsize", "batch_size"),
        ("models:", "modles:", 3, "modles", "models"),
        (
            "kinds: [red_team], limit: 4}",
            "kinds: [red_team], limt: 4}",
            7,
            "prompts.sources[0].limt",
            "limit",
        ),
        ("seed: 3", "sed: 3", 2, "sed", "seed"),
    ],
)
def test_misspelt_key_names_key_line_and_suggestion(tmp_path, old, new, line, key, suggestion):
    assert old in MINI
    p = write(tmp_path, MINI.replace(old, new))
    msg = error_of(p)
    assert msg.startswith(f"{p}:{line}:"), msg
    assert f"unknown key '{key}'" in msg and f"did you mean '{suggestion}'" in msg


def test_misspelt_key_through_the_process_exits_2(tmp_path):
    p = write(tmp_path, MINI.replace("learning_rate", "lerning_rate"))
    proc = subprocess.run(
        [sys.executable, "-m", "cai", "recipe", "validate", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {p}:10: unknown key 'sft.lerning_rate'; did you mean 'learning_rate'?"
    ]


def test_duplicate_key_is_an_error(tmp_path):
    p = write(tmp_path, MINI + "seed: 4\n")
    assert error_of(p) == f"{p}:11: duplicate key 'seed' (first on line 2)"


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    msg = error_of(write(tmp_path, MINI + "ppo:\n  zzzzzz: 1\n"))
    assert "unknown key 'ppo.zzzzzz'" in msg and "valid keys:" in msg and "kl_coef" in msg


@pytest.mark.parametrize(
    "text, line, expected",
    [
        ("name: x\nseed: many\n", 2, "key 'seed'"),
        ("name: x\nsft:\n  batch_size: 0\n", 3, "greater than or equal to 1"),
        ("name: x\ndevice: tpu\n", 2, "'auto', 'cpu' or 'cuda'"),
        ("seed: 1\n", 1, "missing key 'name'"),
        ("name: x\nsft: [1, 2\n", 2, "YAML does not parse"),
    ],
)
def test_other_errors_name_line_and_key(tmp_path, text, line, expected):
    p = write(tmp_path, text)
    msg = error_of(p)
    assert msg.startswith(f"{p}:{line}:") and expected in msg, msg


def test_every_recipe_given_is_checked(tmp_path, capsys):
    bad = write(tmp_path, MINI.replace("seed", "sede"), "bad.yaml")
    good = write(tmp_path, MINI + f"constitution: {ROOT}/constitutions/harmless-specific.yaml\n", "good.yaml")
    bad2 = write(tmp_path, "- a list\n", "bad2.yaml")
    rc = cli.main(["recipe", "validate", str(bad), str(good), str(bad2)])
    out = capsys.readouterr()
    assert rc == 2
    assert f"ok  {good}" in out.out
    assert [line.split(":")[1].strip() for line in out.err.strip().splitlines()] == [str(bad), str(bad2)]


# --- --set overrides -------------------------------------------------------------------------------------


def test_set_overrides_with_parsed_types(tmp_path):
    p = write(tmp_path, MINI)
    r = load_recipe(
        p,
        [
            "seed=7",
            "sft.learning_rate=3e-4",
            "trust_remote_code=true",
            "models.feedback=null",
            "models.judge=smollm2-135m-instruct",
            "report.suites=[pairs, mine]",
            "sft.lora.r=4",  # creates the sft.lora block
            "ppo.kl_coef = 0.2",
        ],
    )
    assert r.seed == 7 and isinstance(r.seed, int)
    assert r.sft.learning_rate == pytest.approx(3e-4)
    assert r.trust_remote_code is True
    assert r.models.feedback is None and r.models.judge == "smollm2-135m-instruct"
    assert r.report.suites == ["pairs", "mine"]
    assert r.sft.lora is not None and r.sft.lora.r == 4 and r.sft.lora.alpha == 32
    assert r.ppo.kl_coef == pytest.approx(0.2)
    assert r.sft.batch_size == 2  # untouched keys keep the file's values


def test_set_values_are_read_safely(tmp_path):
    marker = tmp_path / "pwned"
    value = f'!!python/object/apply:os.system ["touch {marker}"]'
    assert parse_value(value) == value  # not a YAML tag that runs code: just a string
    r = load_recipe(write(tmp_path, MINI), [f"ppo.stop_string={value}"])
    assert r.ppo.stop_string == value
    assert not marker.exists()
    assert parse_value("[1, 2]") == [1, 2] and parse_value("0.5") == 0.5 and parse_value("no") is False


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sft.batchsize=1", "--set sft.batchsize=1: unknown key 'sft.batchsize'; did you mean 'batch_size'?"),
        ("sft.batch_size=abc", "--set sft.batch_size=abc: key 'sft.batch_size'"),
        ("sedd=1", "--set sedd=1: unknown key 'sedd'; did you mean 'seed'?"),
        ("seed", "--set 'seed': key.path=value is expected"),
        ("=5", "--set '=5': key.path=value is expected"),  # it blamed the recipe file's first line
        ("sft..lr=1", "--set 'sft..lr=1': key.path=value is expected"),
        ("name.first=x", "'name' is not a mapping"),
    ],
)
def test_bad_set_is_an_error_naming_the_override(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, MINI), [override])


def test_bad_set_through_cai_run_exits_2_before_running(tmp_path, capsys):
    p = write(tmp_path, MINI)
    rc = cli.main(["run", str(p), "--run-dir", str(tmp_path / "run"), "--set", "ppo.kl_coeff=0.1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown key 'ppo.kl_coeff'; did you mean 'kl_coef'?" in err
    assert not (tmp_path / "run").exists()


def test_validate_dotted_key():
    validate_dotted_key("ppo.kl_coef")
    validate_dotted_key("sft.lora.r")
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        validate_dotted_key("sft.learning_rat")


# --- stage order ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stages, ok",
    [
        ("[critique_revise, sft]", True),
        ("[preference_model, policy, report]", True),
        ("[sft, critique_revise]", False),
        ("[sft, sft]", False),
        ("[ppo, feedback]", False),
        ("[critique_revise, rlhf]", False),
    ],
)
def test_stage_order(tmp_path, stages, ok):
    p = write(tmp_path, MINI + f"stages: {stages}\n")
    if ok:
        assert load_recipe(p).stages == [s.strip() for s in stages.strip("[]").split(",")]
    else:
        msg = error_of(p)
        assert msg.startswith(f"{p}:11:") and "stages" in msg


def test_the_policy_stages_former_name_still_works(tmp_path):
    """Recipes written when the policy stage was 'ppo' keep working: `stages`, `--only` and `--from`."""
    from cai.config.layout import select_stages

    recipe = load_recipe(write(tmp_path, MINI + "stages: [sft, preference_model, ppo, report]\n"))
    assert recipe.stages == ["sft", "preference_model", "policy", "report"]
    assert select_stages(recipe, ["ppo"], None) == ["policy"]
    assert select_stages(recipe, None, "ppo") == ["policy", "report"]


def test_stage_order_error_says_the_order(tmp_path):
    msg = error_of(write(tmp_path, MINI + "stages: [sft, critique_revise]\n"))
    assert ", ".join(STAGES) in msg


# --- schema export ----------------------------------------------------------------------------------------


def test_recipe_schema_export(capsys):
    assert cli.main(["recipe", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == Recipe.model_json_schema()
    assert set(schema["properties"]) == set(Recipe.model_fields)
    assert {"critique_revise", "sft", "feedback", "preference_model", "policy", "report"} <= set(
        schema["properties"]
    )
    # every field of every block is documented for editors
    for name, block in schema["$defs"].items():
        for key, prop in block.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{key} has no description"


def test_a_stage_view_reads_only_its_declared_keys():
    from cai.config.layout import stage_view
    from cai.config.view import UndeclaredRead

    recipe = Recipe(name="x", sft={"epochs": 3}, policy={"algorithm": "dpo"})
    view = stage_view(recipe, "sft")
    assert view.sft.epochs == 3 and view.models.policy == recipe.models.policy
    with pytest.raises(UndeclaredRead, match=r"stage 'sft' read recipe key 'ppo'"):
        getattr(view, "ppo")  # noqa: B009
    with pytest.raises(AttributeError, match="read-only"):
        view.sft = None
    # what the policy stage reads depends on its algorithm: DPO's block only for DPO
    assert stage_view(recipe, "policy").dpo.beta == recipe.dpo.beta
    with pytest.raises(UndeclaredRead):
        getattr(stage_view(Recipe(name="y"), "policy"), "dpo")  # noqa: B009


def test_a_constitutions_few_shot_files_count_in_the_stage_fingerprints(tmp_path):
    """A constitution names its few-shot files; editing one re-runs the stages that read it (critique_revise,
    feedback), like an edit to the constitution itself. One without few-shot files keeps its plain digest."""
    from cai.config.layout import stage_config

    plain = (ROOT / "constitutions" / "harmless-specific.yaml").read_text()
    (tmp_path / "plain.yaml").write_text(plain)
    (tmp_path / "c.yaml").write_text(
        plain.replace(
            "\nprinciples:", "\nfew_shot:\n  critique_revise: cr.json\n  feedback: fb.json\nprinciples:", 1
        )
    )
    assert "few_shot:" in (tmp_path / "c.yaml").read_text()
    for name in ("cr.json", "fb.json"):
        (tmp_path / name).write_text("[]")
    recipe = Recipe(name="x", constitution=str(tmp_path / "c.yaml"))
    before = {s: stage_config(recipe, s) for s in ("critique_revise", "feedback", "sft")}
    assert set(before["critique_revise"]["constitution"]["few_shot"]) == {"critique_revise", "feedback"}
    (tmp_path / "cr.json").write_text('[{"edited": true}]')
    after = {s: stage_config(recipe, s) for s in before}
    assert after["critique_revise"] != before["critique_revise"] and after["feedback"] != before["feedback"]
    assert after["sft"] == before["sft"]
    cfg = stage_config(Recipe(name="x", constitution=str(tmp_path / "plain.yaml")), "critique_revise")
    assert set(cfg["constitution"]) == {"file", "content"}  # its parsed YAML: a comment edit reruns nothing


def test_feedback_policy_names_a_model_folder_relative_to_the_recipe(tmp_path, monkeypatch):
    """feedback.policy held its path as written, so the same recipe named another folder (or none) when run
    from another directory; 'sft' and 'base' stay the run's own models, even beside folders of those names."""
    from cai.preflight import check

    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "config.json").write_text("{}")
    (tmp_path / "sub" / "sft").mkdir(parents=True)
    r = tmp_path / "sub" / "r.yaml"
    r.write_text("name: x\nmodels:\n  policy: tiny-random-llama\nfeedback:\n  policy: ../models/mine\n")
    monkeypatch.chdir(tmp_path / "models")  # elsewhere
    recipe = load_recipe(r)
    assert recipe.feedback.policy == str(tmp_path / "models" / "mine")
    assert not [
        ln for ln in check(recipe, stages=["feedback"]) if "feedback.policy" in ln and "not found" in ln
    ]
    r.write_text("name: x\nmodels:\n  policy: tiny-random-llama\nfeedback:\n  policy: sft\n")
    assert load_recipe(r).feedback.policy == "sft"
    bad = load_recipe(r, ["feedback.policy=./no-such-folder"])
    assert any("key 'feedback.policy': model" in ln for ln in check(bad, stages=["feedback"]))


# --- values the schema refused only later ------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_out_of_numpys_range_is_refused_by_the_recipe(tmp_path, seed):
    """seed -1 or 2**32 validated, then the sft stage died in transformers' set_seed with a traceback."""
    from pydantic import ValidationError

    from cai.runtime.settings import Settings

    assert "key 'seed'" in error_of(write(tmp_path, MINI), [f"seed={seed}"])
    with pytest.raises(ValidationError):
        Settings(seed=int(seed))
    assert load_recipe(write(tmp_path, MINI), [f"seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize(
    "override, key",
    [
        ("sft.lora.target_modules=[]", "sft.lora.target_modules"),  # peft raised inside the stage
        ("feedback.cot_clamp=[0.6, 0.4]", "feedback.cot_clamp"),  # the labeller refused it, after SFT
        ("feedback.cot_clamp=[-0.1, 0.5]", "feedback.cot_clamp"),
        ("ppo.learning_rate=.inf", "ppo.learning_rate"),
        ("ppo.reward_clip=.inf", "ppo.reward_clip"),
        ("ppo.missing_eos_penalty=.nan", "ppo.missing_eos_penalty"),
        ("ppo.updates=true", "ppo.updates"),
        ("sft.learning_rate=yes", "sft.learning_rate"),
        ("name=''", "name"),  # the run directory was runs/ itself
        ("name=../../escaped", "name"),  # ... or outside it
        ("name=..", "name"),
        ("name=/abs/elsewhere", "name"),
        ("ppo.stop_string=''", "ppo.stop_string"),  # every response would be cut to nothing
    ],
)
def test_values_a_stage_would_refuse_or_misread_are_refused_by_the_schema(tmp_path, override, key):
    assert f"key '{key}'" in error_of(write(tmp_path, MINI), [override])


def test_the_schema_still_takes_the_values_next_to_the_refused_ones(tmp_path):
    r = load_recipe(
        write(tmp_path, MINI),
        ["sft.lora.target_modules=[q_proj]", "feedback.cot_clamp=[0.5, 0.5]", "name=run-2.b_c+d=e"],
    )
    assert r.sft.lora.target_modules == ["q_proj"] and r.feedback.cot_clamp == (0.5, 0.5)
    assert r.ppo.missing_eos_penalty is None and r.name == "run-2.b_c+d=e"


@pytest.mark.parametrize(
    "text, value",
    [
        ("###", "###"),  # was None: YAML read it as a comment
        ("</s> # end", "</s> # end"),  # was '</s>'
        ("#", "#"),
        ("'a #b'", "a #b"),  # a quoted '#' was always kept
        ("null", None),
        ("~", None),
        ("", None),
        ("a#b", "a#b"),
    ],
)
def test_a_set_value_is_not_cut_at_a_yaml_comment(text, value):
    assert parse_value(text) == value


# --- --set errors are blamed on the --set ----------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "ppo.kl_coef.x=1",  # the error is at ppo.kl_coef, a prefix of the --set key
        "feedback.check_set.limit=5",  # missing feedback.check_set.path: the block the --set made
        "sweep.ppo.kl_coef=[0.1, 0.2]",  # the error is at sweep.ppo
    ],
)
def test_a_bad_set_is_blamed_on_the_set_not_a_line_of_the_file(tmp_path, override):
    """The error's key was matched against the --set key one way only: these named an unrelated recipe line."""
    msg = error_of(write(tmp_path, MINI), [override])
    assert msg.startswith(f"--set {override}: "), msg


def test_an_error_the_file_made_is_still_blamed_on_the_file(tmp_path):
    p = write(tmp_path, MINI.replace("batch_size: 2", "batch_size: 0"))
    assert error_of(p, ["sft.learning_rate=1e-4"]).startswith(f"{p}:9:")


# --- preference-model specs merge key by key -------------------------------------------------------------


def test_a_nested_key_over_a_spec_keeps_the_specs_other_nested_keys(tmp_path):
    """--set preference_model.lora.r=8 over a spec with lora {r: 16, alpha: 64, dropout: 0.1} gave alpha 32
    and dropout 0.0: the recipe's lora block replaced the spec's whole, its unset keys at their defaults."""
    from cai.config.view import value_of

    (tmp_path / "spec.yaml").write_text("loss: bradley_terry\nlora: {r: 16, alpha: 64, dropout: 0.1}\n")
    p = write(tmp_path, MINI + "preference_model:\n  spec: spec.yaml\n  lora: {r: 8}\n")
    pm = value_of(load_recipe(p), "preference_model")
    assert (pm.lora.r, pm.lora.alpha, pm.lora.dropout, pm.loss) == (8, 64, 0.1, "bradley_terry")
    pm = value_of(load_recipe(p, ["preference_model.lora=null"]), "preference_model")
    assert pm.lora is None  # a key the recipe sets to null still wins


# --- a suite file's content counts in the report's fingerprint ---------------------------------------------


def test_editing_a_suite_yaml_the_report_names_changes_its_fingerprint(tmp_path):
    """A suite YAML was hashed by its path: an edit to it (its format, its data file) left the report 'up to
    date' with the old numbers."""
    from cai.config.layout import stage_config

    rows = '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n'
    (tmp_path / "a.jsonl").write_text(rows)
    (tmp_path / "b.jsonl").write_text(rows)
    suite = tmp_path / "mine.yaml"
    suite.write_text("name: mine\nformat: hh_pairs\nfiles: [a.jsonl]\n")
    r = load_recipe(write(tmp_path, MINI), [f"report.suites=[pairs, {suite}]"])
    before = stage_config(r, "report")
    assert stage_config(r, "report") == before
    assert before["report"]["suites"][0] == "pairs"
    suite.write_text("# a comment\nname: mine\nformat: hh_pairs\nfiles: [a.jsonl]\n")
    assert stage_config(r, "report") == before  # the suite's settings and its data count, not its text
    suite.write_text("name: mine\nformat: hh_pairs\nfiles: [a.jsonl]\ntemplate: plain\n")
    edited = stage_config(r, "report")
    assert edited != before
    (tmp_path / "a.jsonl").write_text(rows * 2)
    assert stage_config(r, "report") != edited
    suite.write_text("name: mine\nformat: hh_pairs\nfiles: [b.jsonl]\ntemplate: plain\n")
    assert stage_config(r, "report") != edited  # another data file


# --- model references with a path anchored at the recipe ---------------------------------------------------


def test_a_model_folder_of_three_parts_is_relative_to_the_recipe_not_the_current_directory(
    tmp_path, monkeypatch
):
    """'runs/q/sft/model' cannot be a hub id (org/name): it was left as written when no such folder was beside
    the recipe, so it named a folder under the current directory."""
    (tmp_path / "runs" / "q" / "sft" / "model").mkdir(parents=True)
    (tmp_path / "recipes").mkdir()
    r = write(tmp_path / "recipes", "name: r\nmodels:\n  policy: runs/q/sft/model\n")
    monkeypatch.chdir(tmp_path)
    want = str(tmp_path / "recipes" / "runs" / "q" / "sft" / "model")
    assert load_recipe(r).models.policy == want
    assert load_recipe(r, ["models.feedback=org/name"]).models.feedback == "org/name"  # a hub id stays


# --- arms cannot change a one-per-run key by writing a block ---------------------------------------------


@pytest.mark.parametrize(
    "arm_set",
    ["{models: {judge: smollm2-135m-instruct}}", "{gold: {enabled: true}}", "{models: {policy: x}, name: y}"],
)
def test_an_arm_cannot_set_a_one_per_run_key_inside_a_block(tmp_path, arm_set):
    from cai.config.arms import expand_arms

    r = load_recipe(write(tmp_path, MINI), [f"arms=[{{name: a, set: {arm_set}}}]"])
    with pytest.raises(UserError, match="cannot differ between arms"):
        expand_arms(r)
    ok = load_recipe(
        write(tmp_path, MINI), ["arms=[{name: a, set: {models: {feedback: tiny-random-llama}}}]"]
    )
    assert expand_arms(ok)[0][1].models.feedback == "tiny-random-llama"


def test_a_run_recipe_this_version_cannot_read_names_the_key(tmp_path):
    """`cai report` on a run whose recipe.json has a key this version lacks said only "(ValidationError)"."""
    from cai.config.load import load_run_recipe

    (tmp_path / "recipe.json").write_text(json.dumps({"name": "x", "ppo": {"bogus_setting": 1}}))
    with pytest.raises(
        UserError, match=r"recipe.json: not a recipe this version can read: key 'ppo.bogus_setting'"
    ):
        load_run_recipe(tmp_path)
    (tmp_path / "recipe.json").write_text("{bad")
    with pytest.raises(UserError, match=r"not a recipe this version can read \(JSONDecodeError\)"):
        load_run_recipe(tmp_path)


def test_a_setting_added_later_counts_in_the_fingerprint_only_when_set():
    """loss_mean and scale_rewards came with 2026-12-06: at their defaults they are left out of the policy
    stage's fingerprint, so upgrading cai did not rerun a finished policy stage or reset an interrupted one."""
    from cai.config.layout import stage_config

    plain = stage_config(Recipe(name="x", policy={"algorithm": "grpo"}), "policy")
    assert "loss_mean" not in plain["policy"] and "scale_rewards" not in plain["policy"]
    assert plain["policy"]["samples_per_prompt"] == 4  # older fields are hashed at their defaults as before
    set_ = stage_config(Recipe(name="x", policy={"algorithm": "grpo", "loss_mean": "sequence"}), "policy")
    assert set_["policy"]["loss_mean"] == "sequence" and set_ != plain


# --- an arm that overrides a --set item says so -------------------------------------------------------------


def test_an_arm_overriding_a_command_line_set_says_so_on_stderr(tmp_path, capsys, monkeypatch):
    """`--set ppo.updates=1` reached every arm but one that sets ppo.updates itself, without a word: the arm's
    value still wins, with one line per clash (the same key, or a block above or below it); none without one."""
    from cai.config.arms import load_checked

    arms = "\narms:\n  - {name: a, set: {policy.algorithm: rloo}}\n  - {name: b, set: {ppo.updates: 4}}\n"
    arms += "  - {name: c, set: {ppo: {updates: 3, learning_rate: 0.5}}}\n"
    path = write(tmp_path, MINI + arms)
    recipe = load_checked(path, ["ppo.updates=1", "ppo.learning_rate=0.5", "policy.algorithm=grpo"])
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "[cai] arm 'a': its policy.algorithm=rloo overrides --set policy.algorithm=grpo "
        "(an arm's own settings win: the arms are the recipe's experiment)",
        "[cai] arm 'b': its ppo.updates=4 overrides --set ppo.updates=1 "
        "(an arm's own settings win: the arms are the recipe's experiment)",
        "[cai] arm 'c': its ppo.updates=3 overrides --set ppo.updates=1 "
        "(an arm's own settings win: the arms are the recipe's experiment)",
    ]  # c's learning_rate equals the --set value: no clash
    assert recipe.ppo.updates == 1
    load_checked(path, ["ppo={updates: 2}"])  # a --set block above the arm's key
    assert "its ppo.updates=4 overrides --set ppo={updates: 2}" in capsys.readouterr().err
    load_checked(path, ["ppo.rollout_batch_size=4"])
    load_checked(path)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # the other processes of a launch stay quiet
    load_checked(path, ["ppo.updates=1"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "algorithm,unread,read",
    [
        (
            "dpo",
            ["ppo.vf_coef=0.3", "ppo.ppo_epochs=3", "ppo.lora={r: 4}", "policy.samples_per_prompt=8"],
            ["ppo.temperature=0.5", "ppo.response_length=7", "ppo.rollout_batch_size=2", "dpo.beta=0.2"],
        ),
        (
            "rloo",
            [
                "ppo.vf_coef=0.3",
                "ppo.critic=value_head",
                "ppo.whiten_advantages=false",
                "policy.round_prompts=3",
            ],
            ["policy.samples_per_prompt=2", "ppo.ppo_epochs=3", "ppo.kl_coef=0.3"],
        ),
        (
            "ppo",
            ["policy.samples_per_prompt=2", "policy.round_prompts=3"],
            ["ppo.vf_coef=0.3", "policy.rounds=2"],
        ),
    ],
)
def test_the_policy_stage_fingerprints_only_what_its_algorithm_reads(algorithm, unread, read):
    """A setting the arm's algorithm does not read (`policy.round_prompts` with one round, PPO's critic keys
    for RLOO, the `ppo` training keys for DPO) reran every arm of compare-algorithms: the stage now sees it at
    its default, so its fingerprint does not move; a setting it reads still does."""
    from cai.config.layout import stage_config, stage_view

    tiny = ROOT / "recipes" / "tiny.yaml"
    base = [f"policy.algorithm={algorithm}"]
    fingerprint = stage_config(load_recipe(tiny, base), "policy")
    for item in unread:
        recipe = load_recipe(tiny, base + [item])
        assert stage_config(recipe, "policy") == fingerprint, item
        block, name = item.split("=")[0].split(".")
        view = getattr(stage_view(recipe, "policy"), block)
        default = (
            type(view).model_fields[name].get_default(call_default_factory=True, validated_data=dict(view))
        )
        assert getattr(view, name) == default, item
        assert name in view.model_fields_set  # the stage can still say that the recipe set it
    for item in read:
        assert stage_config(load_recipe(tiny, base + [item]), "policy") != fingerprint, item
