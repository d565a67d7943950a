"""sft on the tiny model: completion-only labels, likelihood of the revisions rises, resume, LoRA merge."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cai.config.layout import stage_view
from cai.runtime.rundir import StageContext, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def recipe_with(run_dir, *sets):
    from cai.config.load import load_recipe

    return load_recipe(ROOT / "recipes/tiny.yaml", [f"run_dir={run_dir}", *sets])


@pytest.fixture(scope="module")
def cr_dir(tmp_path_factory, tiny_dir):
    """critique_revise output of the tiny recipe, made once for this module."""
    from cai import pipeline

    run_dir = tmp_path_factory.mktemp("sft") / "run"
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        pipeline.run(recipe_with(run_dir), only=["critique_revise"])
    finally:
        os.chdir(old)
    return run_dir / "critique_revise"


def run_sft(cr_dir, out_dir, *sets):
    from cai.stages import sft

    ctx = StageContext(
        config=stage_view(recipe_with(out_dir.parent, *sets), "sft"),
        stage="sft",
        out_dir=out_dir,
        inputs={"critique_revise": cr_dir},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    sft.run(ctx)
    return ctx


def mean_loglik(model, tok, records) -> float:
    """Mean per-token log-likelihood of each record's final text (plus end of turn) after its prompt."""
    from cai.feedback.options import continuation_logprob

    prompts = [
        tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in records
    ]
    conts = [r["final"] + tok.eos_token for r in records]
    total = sum(continuation_logprob(model, tok, prompts, conts))
    return total / sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in conts)


def test_loss_is_on_the_completion_only(tiny, cr_dir, tmp_path):
    from cai.stages.sft import build_trainer, sft_examples

    model, tok = tiny
    records = read_jsonl(cr_dir / "data.jsonl")
    examples = sft_examples(records)
    assert len(examples) == len(records)
    assert len(sft_examples(records, include_helpful=False)) == sum(r["kind"] == "red_team" for r in records)
    import copy

    r = recipe_with(tmp_path)
    trainer = build_trainer(r.sft, r.settings, copy.deepcopy(model), tok, examples[:3], tmp_path / "ck")
    for ex, row in zip(examples[:3], trainer.train_dataset):
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, x in enumerate(labels) if x != -100)
        assert all(x != -100 for x in labels[first:])  # one contiguous span at the end
        prompt_text = tok.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
        assert tok.decode(ids[:first]) == prompt_text
        assert tok.decode(labels[first:]) == ex["completion"][0]["content"] + "<|im_end|>\n"  # learns to stop


@pytest.mark.parametrize("lora", [False, True])
def test_packed_loss_equals_trls_loss_metrics_and_gradients(tiny, cr_dir, tmp_path, monkeypatch, lora):
    """The SFT loss from one packed forward (no padding, the rows' shared beginning once, the LM head at the
    completion's positions only) equals TRL's on a padded batch of rows of different lengths: loss, the logged
    metrics and every gradient; LoRA runs through the fused adapters as in the stage."""
    import copy

    import torch
    from trl import SFTTrainer

    from cai.runtime import packing
    from cai.stages import sft

    model, tok = tiny
    system = {"role": "system", "content": "You are a careful assistant. Answer briefly and kindly."}
    examples = [  # a shared system prompt, as SmolLM2's chat template adds: the packed row computes it once
        {**e, "prompt": [system, *e["prompt"]]}
        for e in sft.sft_examples(read_jsonl(cr_dir / "data.jsonl"))[:6]
    ]
    r = recipe_with(tmp_path, *(["sft.lora={r: 4, alpha: 8}"] if lora else []))
    trainer = sft.build_trainer(r.sft, r.settings, copy.deepcopy(model), tok, examples, tmp_path / "ck")
    trainer.model.train()
    if lora:  # adapters that change the output
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    batch = next(iter(trainer.get_train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert len(lengths) > 1 and lengths.unique().numel() > 1  # padding in the batch
    packed, pack = [], packing.pack
    monkeypatch.setattr(packing, "pack", lambda *a: packed.append(pack(*a)) or packed[-1])

    def loss_grads_metrics(compute_loss):
        trainer.model.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        trainer._total_train_tokens = 0
        loss = compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return float(loss), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours = loss_grads_metrics(trainer.compute_loss)
    assert len(packed) == 1 and packed[0].ids.shape[1] < int(lengths.sum())  # the system prompt ran once
    theirs = loss_grads_metrics(SFTTrainer.compute_loss.__get__(trainer))
    assert len(packed) == 1  # TRL's own loss did not pack
    assert abs(ours[0] - theirs[0]) <= 1e-5 * abs(theirs[0]), (ours[0], theirs[0])
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) > 0
    for name, g in theirs[1].items():
        diff = float((ours[1][name] - g).abs().max())
        assert diff <= 1e-4 * float(g.abs().max()) + 1e-7, (name, diff)
    assert ours[2].keys() == theirs[2].keys() == {"entropy", "mean_token_accuracy", "num_tokens"}
    for k, v in theirs[2].items():
        assert ours[2][k] == pytest.approx(v, rel=1e-5), k


def test_sft_raises_the_likelihood_of_the_revisions(tiny, cr_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from cai.runtime.models import load_model

    base, tok = tiny
    ctx = run_sft(cr_dir, tmp_path / "sft")
    out = tmp_path / "sft"
    revisions = [r for r in read_jsonl(cr_dir / "data.jsonl") if r["kind"] == "red_team"]
    assert revisions
    trained = load_model(str(out / "model"))
    before, after = mean_loglik(base, tok, revisions), mean_loglik(trained, tok, revisions)
    assert after > before + 0.05, (before, after)
    hf = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert hf.config.vocab_size == base.config.vocab_size
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"loss", "learning_rate", "grad_norm", "epoch"} <= set(r)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "loss.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()  # removed once the model is saved
    assert ctx.summary["steps"] == 4 and ctx.summary["examples"] == len(read_jsonl(cr_dir / "data.jsonl"))


def test_interrupted_sft_resumes_from_its_last_checkpoint(cr_dir, tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import load_file

    from cai.stages import sft

    original = sft.metrics_callback

    def stopping_callback(log):
        cb = original(log)

        class StopAtThree(type(cb)):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:  # after checkpoint-2 was written, before step 3 is logged
                    raise KeyboardInterrupt

        cb.__class__ = StopAtThree
        return cb

    out = tmp_path / "sft"
    monkeypatch.setattr(sft, "metrics_callback", stopping_callback)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cr_dir, out)
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "model").exists()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    monkeypatch.setattr(sft, "metrics_callback", original)
    run_sft(cr_dir, out)
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    # the resumed run ends where an uninterrupted one does
    ref = tmp_path / "ref" / "sft"
    run_sft(cr_dir, ref)
    a, b = (
        load_file(str(out / "model" / "model.safetensors")),
        load_file(str(ref / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # and logs the same token counts: the count goes on from its checkpoint's (sft.TOKENS_FILE), not from 0
    tokens = [[r["num_tokens"] for r in read_jsonl(d / "metrics.jsonl")] for d in (out, ref)]
    assert tokens[0] == tokens[1] and 0 < tokens[0][1] < tokens[0][2] < tokens[0][3], tokens


def test_lora_is_merged_on_save(tiny, cr_dir, tmp_path, monkeypatch):
    import torch

    from cai.runtime import forward
    from cai.runtime.models import load_model

    base, _ = tiny
    out = tmp_path / "sft"
    fused = []
    apply = forward._FusedLora.apply
    monkeypatch.setattr(forward._FusedLora, "apply", lambda *a: fused.append(1) or apply(*a))
    run_sft(cr_dir, out, "sft.lora={r: 4, alpha: 8}", "sft.learning_rate=1.0e-2")
    assert fused  # the adapted linears trained as one node each (cai.runtime.forward.fused_lora_linears)
    files = {p.name for p in (out / "model").iterdir()}
    assert "config.json" in files and "model.safetensors" in files and "adapter_config.json" not in files
    merged = load_model(str(out / "model"))
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    assert base_sd.keys() == merged_sd.keys()  # plain weights, no lora_A/lora_B left
    changed = [k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])]
    assert any("q_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed)  # LoRA touches the linear layers only
    shutil.rmtree(out)


def test_unmerged_lora_saves_an_adapter_both_loaders_open(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from cai.config.fields import LoraConfig
    from cai.runtime.models import load_model, load_tokenizer, wrap_lora
    from cai.runtime.training import save_trained

    model = wrap_lora(load_model("tiny-random-llama"), LoraConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # a non-zero adapter
    save_trained(None, model, load_tokenizer("tiny-random-llama"), tmp_path / "model", merge=False)
    assert (tmp_path / "model" / "adapter_config.json").is_file()
    ids = torch.tensor([[5, 6, 7, 8]])
    want = model(input_ids=ids).logits
    for loaded in (
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")),
        load_model(str(tmp_path / "model")),
    ):
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)


@pytest.mark.parametrize("dtype,mixed", [("float32", "no"), ("bfloat16", "bf16")])
def test_the_recipes_precision_wins_over_the_launchers(tiny, tmp_path, monkeypatch, request, dtype, mixed):
    """`accelerate launch` with a config's mixed_precision (multi_gpu.yaml, fsdp.yaml: bf16) exports
    ACCELERATE_MIXED_PRECISION; the trainer still runs in the recipe's precision: no autocast for an fp32
    recipe, bf16 for a bf16 one. The launcher's value is left in the environment as it was."""
    import copy

    from accelerate.state import AcceleratorState

    from cai.stages.sft import build_trainer

    # accelerate's one process-wide state cannot change its mixed precision: fresh here, and left fresh for the
    # tests after this one (a run does not switch: one recipe, one dtype)
    AcceleratorState._reset_state()
    request.addfinalizer(AcceleratorState._reset_state)
    model, tok = tiny
    launcher = "no" if mixed == "bf16" else "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    r = recipe_with(tmp_path)
    examples = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
        }
    ] * 2
    trainer = build_trainer(
        r.sft, r.settings.with_(dtype=dtype), copy.deepcopy(model), tok, examples, tmp_path / "ck"
    )
    assert trainer.args.mixed_precision == mixed
    assert trainer.accelerator.mixed_precision == mixed
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == launcher


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path):
    """SFT, the PM and DPO resume only with the number of processes that wrote the checkpoint, as PPO does:
    token_callback records it beside the run token, and resume_point refuses another count in one line."""
    from types import SimpleNamespace

    from cai.errors import UserError
    from cai.runtime.rundir import append_jsonl
    from cai.runtime.training import STATE_FILE, WORLD_FILE, resume_point, token_callback

    hf = tmp_path / "hf"
    state = SimpleNamespace(global_step=2, is_world_process_zero=True)
    token_callback("token-a").on_step_end(
        SimpleNamespace(output_dir=str(hf)), state, SimpleNamespace(should_save=True)
    )
    ck = hf / "checkpoint-2"
    assert (ck / WORLD_FILE).read_text().strip() == "1"
    (ck / STATE_FILE).write_text("{}")
    metrics = tmp_path / "m.jsonl"
    append_jsonl(metrics, [{"step": s} for s in (1, 2, 3)])
    assert resume_point(hf, metrics, "sft", "token-a") == str(ck)  # written by one process, resumed by one
    (ck / WORLD_FILE).write_text("2\n")  # as a 2-process run writes it
    append_jsonl(metrics, [{"step": 3}])
    with pytest.raises(UserError, match=r"written by a run of 2 process\(es\), resumed with 1") as err:
        resume_point(hf, metrics, "sft", "token-a")
    assert "\n" not in str(err.value)
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2, 3]  # refused before anything was dropped
