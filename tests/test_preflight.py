"""Preflight: `cai recipe validate` and `cai run` check every file and model a recipe names (all arms, the
stages to run) before anything runs; each problem is one line naming the recipe file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai import pipeline
from cai.cli import main as cli
from cai.config.load import load_recipe
from cai.errors import UserError
from cai.preflight import check

ROOT = Path(__file__).resolve().parents[1]

BAD = """\
name: bad
models:
  policy: tiny-random-llama
  feedback: tiny-randm-llama
  judge: ./no-such-model-folder
constitution: nope.yaml
prompts:
  sources:
    - {type: builtin, kinds: [red_team], limit: 4}
    - {type: jsonl, path: data/prompts.jsonl}
report:
  suites: [pairs, nosuite]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_validate_names_file_line_and_key_of_every_problem(tmp_path, capsys):
    p = write(tmp_path, BAD)
    assert cli.main(["recipe", "validate", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith(f"error: {p}:") for line in err), err
    want = {
        6: "key 'constitution': file not found",
        10: "key 'prompts.sources[1].path': file not found",
        4: "key 'models.feedback': model 'tiny-randm-llama': not found",
        5: f"key 'models.judge': model '{tmp_path / 'no-such-model-folder'}': not found",
        12: "key 'report.suites[1]': suite 'nosuite': not a file and not a shipped name",
    }
    for line, text in want.items():
        assert any(e.startswith(f"error: {p}:{line}: {text}") for e in err), (line, err)
    assert len(err) == len(want)
    assert "did you mean the alias 'tiny-random-llama'" in "\n".join(err)


def test_run_fails_before_any_stage_on_a_bad_model_an_arm_or_a_set_value(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    ran = []
    monkeypatch.setattr(pipeline, "_load_stage", lambda s: ran.append(s))
    rdir = tmp_path / "run"
    base = [f"run_dir={rdir}"]
    # a typo in the feedback model, which only the third stage loads
    with pytest.raises(UserError) as info:
        pipeline.run(load_recipe(ROOT / "recipes/tiny.yaml", [*base, "models.feedback=tiny-randm-llama"]))
    assert str(info.value).startswith("--set models.feedback=tiny-randm-llama: key 'models.feedback': model")
    assert ran == [] and not rdir.exists()
    # an arm's own constitution: the arm's line in the recipe
    text = (ROOT / "recipes/tiny.yaml").read_text().replace("../constitutions", str(ROOT / "constitutions"))
    text = text.rstrip("\n") + "\n"
    arm_line = text.count("\n") + 3  # after "arms:" and arm a
    p = write(
        tmp_path, text + "arms:\n  - {name: a}\n  - {name: b, set: {feedback_constitution: missing.yaml}}\n"
    )
    lines = check(load_recipe(p))
    assert len(lines) == 1 and lines[0].startswith(
        f"{p}:{arm_line}: arm 'b': key 'feedback_constitution': file not found"
    )
    # only the stages to run: sft reads no constitution
    assert check(load_recipe(p, ["constitution=gone.yaml"]), ["sft"]) == []
    assert "constitution" in check(load_recipe(p, ["constitution=gone.yaml"]), ["critique_revise"])[0]


def test_a_constitution_that_does_not_load_and_a_model_folder_without_config(tmp_path):
    (tmp_path / "c.yaml").write_text("name: c\nkind: specific\nprinciples: []\n")
    (tmp_path / "empty-model").mkdir()
    p = write(tmp_path, "name: x\nconstitution: c.yaml\nmodels:\n  policy: empty-model\n")
    lines = check(load_recipe(p))
    assert lines[0].startswith(
        f"{p}:4: key 'models.policy': model '{tmp_path / 'empty-model'}': directory has no"
    )
    assert any(
        ln.startswith(f"{p}:2: key 'constitution': the constitution does not load: {tmp_path}")
        for ln in lines
    )


def test_an_adapter_only_sft_folder_is_refused_before_the_stages_that_load_it_whole(tmp_path):
    """`sft.merge_lora: false` saves adapters alone: the policy stage refused that folder only after SFT,
    feedback and the PM had run. Preflight names the key; running the sft stage alone is fine."""
    text = "name: x\nmodels:\n  policy: tiny-random-llama\nsft:\n  lora: {r: 4}\n  merge_lora: false\n"
    p = write(tmp_path, text + f"constitution: {ROOT / 'constitutions' / 'harmless-specific.yaml'}\n")
    lines = check(load_recipe(p))
    assert len(lines) == 1 and lines[0].startswith(
        f"{p}:6: key 'sft.merge_lora': false writes an adapter-only"
    )
    assert "policy and report" in lines[0]
    assert check(load_recipe(p), stages=["sft"]) == []
    assert check(load_recipe(p, ["sft.merge_lora=true"])) == []


def test_what_would_stop_the_policy_stage_late_is_found_first(tmp_path, monkeypatch):
    """Each of these failed only at the policy stage, after critique_revise, SFT, feedback and the PM had run."""
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, responses, **kwargs):\n    return [len(r) for r in responses]\n\n"
        "def no_kwargs(prompts, responses):\n    return [0.0] * len(responses)\n\n"
        "import functools\n\ndef adapt(fn):\n    @functools.wraps(fn)\n"
        "    def wrapper(prompts, responses, **kwargs):\n        return fn(prompts, responses)\n"
        "    return wrapper\n\nwrapped = adapt(no_kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    base = f"name: x\nmodels:\n  policy: tiny-random-llama\nconstitution: {ROOT / 'constitutions/harmless-specific.yaml'}\n"
    p = write(tmp_path, base + "stages: [critique_revise, sft, feedback, policy, report]\n")
    assert check(load_recipe(p)) == [
        f"{p}:5: key 'stages': stage 'policy' needs 'preference_model' (ppo.reward: pm), which the stages leave out"
    ]
    p = write(tmp_path, base + "ppo:\n  reward: cai.rl.rewardz:length\n")
    (line,) = check(load_recipe(p))
    assert line.startswith(f"{p}:6: key 'ppo.reward': cannot import module 'cai.rl.rewardz'")
    p = write(tmp_path, base + "ppo:\n  reward: my_rewards:no_kwargs\n")  # it is called with keywords too
    (line,) = check(load_recipe(p))
    assert line.startswith(
        f"{p}:6: key 'ppo.reward': 'my_rewards:no_kwargs' cannot be called as fn(prompts, "
    )
    assert line.endswith("a reward function takes the prompts and responses and accepts **kwargs")
    p = write(
        tmp_path, base + "ppo:\n  reward: my_rewards:wrapped\n"
    )  # its own signature counts, not the inner one's
    assert check(load_recipe(p)) == []
    p = write(tmp_path, base + "ppo:\n  reward: my_rewards:length\npolicy:\n  rounds: 2\n")
    rounds = "online rounds train the PM further each round; they need ppo.reward: pm"
    assert check(load_recipe(p)) == [f"{p}:8: key 'policy.rounds': {rounds}"]
    assert check(load_recipe(p), stages=["critique_revise", "sft"]) == []
    p = write(
        tmp_path,
        base + "ppo:\n  rollout_batch_size: 6\npolicy:\n  algorithm: grpo\n  samples_per_prompt: 4\n",
    )
    assert check(load_recipe(p)) == [
        f"{p}:6: key 'ppo.rollout_batch_size': 6 is not a multiple of policy.samples_per_prompt (4); an update "
        "samples k responses to each of its prompts"
    ]
    assert check(load_recipe(p, ["policy.algorithm=ppo"])) == []
    with pytest.raises(UserError, match=r"key 'ppo'.*\(2 × 4\).*rollout_batch_size is 6"):
        load_recipe(p, ["ppo.num_minibatches=2", "ppo.grad_accum=4"])
    with pytest.raises(UserError, match=r"\(8 × 1\).*rollout_batch_size is 6"):  # grad_accum left at 1
        load_recipe(p, ["ppo.num_minibatches=8"])


def test_shipped_cpu_recipes_pass_and_gpu_recipes_name_their_downloads(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    ok = ["recipes/tiny.yaml", "recipes/quickstart.yaml", "recipes/compare-specific-general.yaml"]
    assert cli.main(["recipe", "validate", *ok]) == 0
    assert capsys.readouterr().out.count("ok  ") == 3
    lines = check(load_recipe(ROOT / "recipes/gpu-1b-single.yaml"))
    # data the user downloads first and hub models (not in this machine's cache, no hub here): named, with lines
    assert all(
        ": key 'prompts.sources[" in ln or "check_set.path': file not found" in ln or "Qwen/" in ln
        for ln in lines
    ), lines


BASE = f"name: x\nmodels:\n  policy: tiny-random-llama\nconstitution: {ROOT / 'constitutions/harmless-specific.yaml'}\n"


def test_a_lora_target_that_matches_no_module_of_the_model_is_named(tmp_path, tiny_dir):
    """peft refused a misspelt target module only inside the stage, after the stages before it had run; the
    model is built from its config on the meta device, so no weights are read."""
    p = write(tmp_path, BASE + "sft:\n  lora: {r: 4, target_modules: [q_proj, q_projj]}\n")
    (line,) = check(load_recipe(p), stages=["sft"])
    assert line.startswith(f"{p}:6: key 'sft.lora.target_modules': 'q_projj' matches no module of model")
    assert "q_proj, up_proj, v_proj" in line  # the linear layers it has
    assert check(load_recipe(p, ["sft.lora.target_modules=[q_proj, self_attn.v_proj]"]), stages=["sft"]) == []
    pm = load_recipe(p, ["preference_model.lora={target_modules: [score, lm_head]}"])  # a classifier PM
    (line,) = check(pm, stages=["preference_model"])
    assert "key 'preference_model.lora.target_modules': 'lm_head' matches no module" in line
    ppo = load_recipe(p, ["ppo.lora={target_modules: [qproj]}"])
    assert ["'qproj' matches no module" in ln for ln in check(ppo, stages=["policy"])] == [True]
    # the tiny model ties its LM head to the input embedding: a merged lm_head adapter changed the embedding
    # of the saved model and of the weights sent to vLLM (greedy rows 0/8 equal to HF's after 2 updates)
    tied = load_recipe(p, ["ppo.lora={target_modules: [q_proj, lm_head]}"])
    (line,) = check(tied, stages=["policy"])
    assert line.endswith(
        "key 'ppo.lora.target_modules': 'lm_head' is tied to the input embedding in model 'tiny-random-llama': "
        "merging its adapter (when the model is saved, and when weights go to vLLM) would change the embedding "
        "too; leave it out"
    )


def test_a_folder_or_an_empty_value_where_a_file_or_model_is_needed_is_named(tmp_path):
    """Preflight asked only whether a path existed, and skipped empty values: a folder for check_set, human
    data or few-shot, or feedback.policy '', failed only in the stage that read it."""
    p = write(tmp_path, BASE)
    folder = str(tmp_path)
    cases = {
        f"feedback.check_set={{path: {folder}}}": "key 'feedback.check_set.path': a folder, where a file",
        f"preference_model.human_data={{path: {folder}}}": "key 'preference_model.human_data.path': a folder",
        f"feedback.few_shot={folder}": "key 'feedback.few_shot': a folder, where a file is expected",
        "feedback.policy=''": "key 'feedback.policy': empty; a model reference is expected",
        "feedback.few_shot=''": "key 'feedback.few_shot': empty; a file is expected",
    }
    for override, want in cases.items():
        lines = check(load_recipe(p, [override]), stages=["feedback", "preference_model"])
        assert any(want in ln for ln in lines), (override, lines)
    # a `dataset` prompt source may name a folder (a dataset saved to disk)
    src = f"prompts={{sources: [{{type: dataset, path: {folder}}}]}}"
    assert check(load_recipe(p, [src]), stages=["critique_revise"]) == []
    src = f"prompts={{sources: [{{type: jsonl, path: {folder}}}]}}"
    assert "a folder, where a file is expected" in check(load_recipe(p, [src]), stages=["critique_revise"])[0]


def test_pair_files_and_prompt_files_of_the_wrong_format_are_named_with_their_first_row(
    tmp_path, shared_data
):
    """A file of another format for check_set, human_mix, human_data or gold.data, or an hh/jsonl prompt source
    whose rows lack the transcript or the column, passed validate and failed only in the stage that read it,
    after the stages before it had run. Its first row is read as the stage reads it."""
    p = write(tmp_path, BASE)
    hh = shared_data / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
    other = tmp_path / "mc.jsonl"
    other.write_text('{"question": "Q?", "answer_matching_behavior": " (A)"}\n')
    plain = tmp_path / "plain.jsonl"  # chosen/rejected, but not HH transcripts: every row would be skipped
    plain.write_text('{"chosen": "yes", "rejected": "no"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    stages = ["gold", "critique_revise", "feedback", "preference_model"]
    expected = "an object with 'chosen' and 'rejected' transcript strings is expected"
    for key in ("feedback.check_set", "feedback.human_mix", "preference_model.human_data"):
        (line,) = check(load_recipe(p, [f"{key}={{path: {other}}}"]), stages)
        assert line == f"--set {key}={{path: {other}}}: key '{key}.path': {other}:1: {expected}"
        assert check(load_recipe(p, [f"{key}={{path: {hh}}}"]), stages) == []
    gold = load_recipe(write(tmp_path, BASE + f"gold:\n  enabled: true\n  data: {plain}\n"))
    (line,) = check(gold, stages)
    assert line.startswith(f"{tmp_path / 'r.yaml'}:7: key 'gold.data': {plain}:1: not an HH preference pair")
    skipped = tmp_path / "skipped.jsonl"  # a first row the stages skip (it ends on a human turn), then a pair
    pair = '"\\n\\nHuman: Hi\\n\\nAssistant: Hello"'
    skipped.write_text(
        '{"chosen": "\\n\\nHuman: Hi", "rejected": "\\n\\nHuman: Hi"}\n'
        + f'{{"chosen": {pair}, "rejected": {pair[:-1]}!"}}\n'
    )
    p = write(tmp_path, BASE)
    assert check(load_recipe(p, [f"feedback.check_set={{path: {skipped}}}"]), stages) == []
    (line,) = check(load_recipe(p, [f"gold={{enabled: true, data: {empty}}}"]), stages)
    assert line.endswith(f"key 'gold.data': {empty}: no preference pairs (the file has no rows)")
    # prompt sources: the jsonl column, the hh transcript; the category filter is not a format problem
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "How do I bake bread?", "category": "food"}\n')
    cases = {
        f"{{type: jsonl, path: {prompts}}}": f"{prompts}:1: key 'prompt' (prompts column) is missing",
        f"{{type: hh, path: {prompts}}}": f"{prompts}:1: an HH transcript in 'chosen'",
        f"{{type: hh, path: {other}}}": f"{other}:1: an HH transcript in 'chosen'",
    }
    for source, want in cases.items():
        (line,) = check(load_recipe(p, [f"prompts={{sources: [{source}]}}"]), ["critique_revise"])
        assert f"key 'prompts.sources[0].path': {want}" in line, line
    good = [
        f"{{type: jsonl, path: {prompts}, column: text, categories: [other]}}",
        f"{{type: hh, path: {hh}}}",
    ]
    for source in good:
        assert check(load_recipe(p, [f"prompts={{sources: [{source}]}}"]), ["critique_revise"]) == []


def test_a_model_folder_whose_config_does_not_parse_or_needs_its_own_code_is_named(tmp_path):
    """A local model folder: a config.json that is not JSON, or an auto_map (custom code) while trust_remote_code
    is off, passed validate and failed when the stage loaded the model."""
    broken, custom, known = tmp_path / "broken", tmp_path / "custom", tmp_path / "known"
    for folder, config in [
        (broken, "{bad"),
        (custom, '{"model_type": "my_custom", "auto_map": {"AutoConfig": "cfg.MyConfig"}}'),
        (known, '{"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling.M"}}'),
    ]:
        folder.mkdir()
        (folder / "config.json").write_text(config)
    p = write(tmp_path, BASE.replace("tiny-random-llama", "broken"))
    (line,) = check(load_recipe(p), ["sft"])
    assert line == (
        f"{p}:3: key 'models.policy': model '{broken}': {broken / 'config.json'}:1: invalid JSON in the model "
        "config (Expecting property name enclosed in double quotes)"
    )
    p = write(tmp_path, BASE.replace("tiny-random-llama", "custom"))
    (line,) = check(load_recipe(p), ["sft"])
    assert line == (
        f"{p}:3: key 'models.policy': model '{custom}': it has custom code; if you trust it, set "
        "trust_remote_code (recipe) or --trust-remote-code"
    )
    assert check(load_recipe(p, ["trust_remote_code=true"]), ["sft"]) == []
    # an auto_map beside a model type transformers has: it loads with transformers' own code
    assert check(load_recipe(write(tmp_path, BASE.replace("tiny-random-llama", "known"))), ["sft"]) == []
