"""The CPU's hand-written autograd functions (cai.runtime.kernels) against the layers they stand in for, on
hand-made tensors and through the tiny model: the same outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cai.runtime import forward, packing
from cai.runtime.kernels import attention, norms
from cai.runtime.models import load_model


def test_rms_norm_by_hand():
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    y = norms.rms_norm(x, w, 0.0)
    rms = math.sqrt((9 + 16) / 2)
    assert y.tolist()[0] == pytest.approx([3 / rms, 8 / rms], rel=1e-6)
    y[0, 0].backward()  # d(x0 / rms)/dx = (1 - x0^2 / (2 rms^2), -x0 x1 / (2 rms^2)) / rms
    assert x.grad.tolist()[0] == pytest.approx([(1 - 9 / 25) / rms, -(12 / 25) / rms], rel=1e-5)
    assert w.grad.tolist() == pytest.approx([3 / rms, 0.0], abs=1e-7)
    x64 = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: norms.rms_norm(a, b, 1e-5), (x64, w64))


@pytest.mark.parametrize("weight_trains", [True, False])
def test_rms_norm_equals_transformers_norm(weight_trains):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    layer = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, generator=g))
    layer.weight.requires_grad_(weight_trains)
    x = torch.randn(1, 40, 32, generator=g, requires_grad=True)
    up = torch.randn(1, 40, 32, generator=g)
    results = []
    for fn in (layer, lambda t: norms.rms_norm(t, layer.weight, layer.variance_epsilon)):
        x.grad = layer.weight.grad = None
        y = fn(x)
        (y * up).sum().backward()
        results.append((y.detach(), x.grad, layer.weight.grad))
    (y0, gx0, gw0), (y1, gx1, gw1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-5)
    else:
        assert gw1 is None


def test_training_layers_run_the_models_norms_as_one_node_and_give_them_back(tiny_dir, monkeypatch):
    """In a training forward every RMSNorm of the tiny Llama (2 per layer and the final one) is the fused node,
    with the model's own gradients; under autocast, or after the context, the model's own forward."""
    model = load_model("tiny-random-llama")
    calls = []
    apply = norms.RMS_NORM.apply
    monkeypatch.setattr(norms.RMS_NORM, "apply", lambda *a: calls.append(1) or apply(*a))
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with forward.training_layers(model) if fused else torch.enable_grad():
            model(input_ids=ids).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers + 1
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with forward.training_layers(model), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    assert len(calls) == 2 * layers + 1


def _reference(query, key, value, segments):
    """Each segment by F.scaled_dot_product_attention over its ancestors' keys and its own, in packed order."""
    gqa = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(gqa, 1), value.repeat_interleave(gqa, 1)
    out = []
    for s, n, above, _ in segments:
        index = torch.cat([torch.arange(a, a + m) for a, m in above] + [torch.arange(s, s + n)])
        p = len(index) - n
        allowed = torch.ones(n, p + n, dtype=torch.bool).tril(diagonal=p)
        o = F.scaled_dot_product_attention(query[:, :, s : s + n], k[:, :, index], v[:, :, index], allowed)
        out.append(o.transpose(1, 2))
    return torch.cat(out, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_attention_equals_attention_segment_by_segment(dtype):
    """A root, a group prefix under it and three sequences: the root's keys take gradients from every segment
    below it. Grouped keys (4 query heads, 2 key heads)."""
    start, length = [0, 5, 9, 15, 18], [5, 4, 6, 3, 7]
    above = [[], [(0, 5)], [(0, 5), (5, 4)], [(0, 5), (5, 4)], [(0, 5)]]
    layout = packing.Packing(start, length, above, "cpu")
    segments = layout.additive(dtype)
    g = torch.Generator().manual_seed(2)
    N = sum(length)
    shapes = {"query": (1, 4, N, 8), "key": (1, 2, N, 8), "value": (1, 2, N, 8)}
    inputs = {k: torch.randn(*s, generator=g).to(dtype).requires_grad_() for k, s in shapes.items()}
    up = torch.randn(1, N, 4, 8, generator=g).to(dtype)
    results = []
    ways = (
        lambda q, k, v: _reference(q, k, v, layout.groups),
        lambda q, k, v: attention.segment_attention(q, k, v, segments, None),
    )
    for fn in ways:
        for t in inputs.values():
            t.grad = None
        out = fn(*inputs.values())
        (out.float() * up.float()).sum().backward()
        results.append([out.detach().float()] + [t.grad.float() for t in inputs.values()])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **tol)
    assert results[1][2][:, :, :5].abs().sum() > 0  # the root's keys: gradients from the segments below
    assert segments[0][3] is None and segments[1][3].dtype == dtype  # the root is causal, the rest masked


def test_the_cpus_packed_attention_is_one_node_per_layer(tiny_dir, monkeypatch):
    """On the CPU a packed forward's attention is one segment-attention node per layer; batched (as on an
    accelerator) it is not taken."""
    calls = []
    apply = attention.SEGMENT_ATTENTION.apply
    monkeypatch.setattr(attention.SEGMENT_ATTENTION, "apply", lambda *a: calls.append(1) or apply(*a))
    model = load_model("tiny-random-llama")
    g = torch.Generator().manual_seed(3)
    system = torch.randint(5, 250, (9,), generator=g)
    groups = [[torch.cat([system, torch.randint(5, 250, (n,), generator=g)]) for n in (6, 11)]]
    for batched, expected in ((None, model.config.num_hidden_layers), (True, 0)):
        calls.clear()
        monkeypatch.setattr(packing, "BATCHED_ATTENTION", batched)
        packing.packed_states(model, packing.pack(groups, "cpu")).sum().backward()
        assert len(calls) == expected
