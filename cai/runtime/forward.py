"""Forward-pass helpers shared by everything that scores text: padding a batch of token sequences, position ids
under left padding, the last real token of each row; log-probabilities at a temperature with their own backward;
and the layers of training and scoring forwards (`training_layers`: LoRA layers' base and adapter products as
one autograd node, the products on oneDNN on AMD's CPUs, RMSNorms as one node; the autograd functions they call
are in cai.runtime.kernels). Generation's own patches of a model (packed linears, merged adapters, grouped keys,
the sampler) are in cai.runtime.decode."""

from __future__ import annotations

import contextlib

from cai.runtime import distributed as dist
from cai.runtime.kernels import logprobs, norms
from cai.runtime.kernels.lazy import LazyFunction

# whether fp32 linears of training and scoring forwards compute their product on oneDNN (`linear_product`): None
# until the first call decides (`onednn_linears`)
ONEDNN = {"linears": None}


def pad(seqs: list[list[int]], pad_id: int, side: str = "left"):
    """(input_ids, attention_mask) LongTensors [B, T] of token sequences padded to the longest one, on the
    left (generation and scoring read the last column) or the right."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.as_tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def position_ids(attention_mask):
    """Positions that start at 0 on the first real token of each row, whatever the left padding."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def selected_logprobs(logits, tokens, temperature: float = 1.0):
    """log softmax(logits / temperature)[token] over the last axis: `logits` [..., V], `tokens` [...] -> [...].

    What dividing, log-softmax and gather give, without their logits-sized tensors (75 MB each at a PPO update's
    384 positions): the log-normaliser is taken a block of rows at a time, and the backward writes the gradient,
    (onehot(token) - softmax) / temperature, into one buffer."""
    flat = logits.reshape(-1, logits.shape[-1])
    return logprobs.SELECTED_LOGPROBS.apply(flat, tokens.reshape(-1), float(temperature)).view(tokens.shape)


def logit_entropy(logits):
    """Entropy (nats, fp32, no gradient) of softmax(logits) over the last axis: [..., V] -> [...]; a block of rows
    at a time (no logits-sized temporaries). The one entropy of cai's metrics (PPO's rollouts, SFT's logs)."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for i in range(0, flat.shape[0], logprobs.ROWS):
            z = flat[i : i + logprobs.ROWS].float()
            lse = torch.logsumexp(z, dim=-1)
            p = (z - lse[:, None]).exp_()
            out[i : i + logprobs.ROWS] = lse - (p * z).sum(-1)  # -sum p log p, with log p = z - lse
    return out.view(logits.shape[:-1])


def last_token_index(attention_mask):
    """Index of the last real token in each row (works for left and right padding)."""
    import torch

    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values


@contextlib.contextmanager
def replaced_forwards(modules: list, forward, **state):
    """Each of `modules` runs `forward` (bound to it) with `state` as its attributes, until the context exits."""
    for m in modules:
        m.forward = forward.__get__(m)
        m.__dict__.update(state)
    try:
        yield
    finally:
        for m in modules:
            for k in ("forward", *state):
                m.__dict__.pop(k, None)


def simple_lora(m) -> bool:
    """Whether a peft LoRA linear is the plain case the decode and training fast paths take: one active adapter,
    no variant (DoRA), an `nn.Linear` base without fan-in-fan-out, fp32 on the CPU, no active dropout."""
    import torch

    base = m.base_layer
    active = list(m.active_adapters)
    if len(active) != 1 or active[0] not in m.lora_A or active[0] in m.lora_variant:
        return False
    dropout = m.lora_dropout[active[0]]
    return (
        type(base) is torch.nn.Linear
        and "forward" not in m.__dict__
        and not m.fan_in_fan_out
        and base.weight.device.type == "cpu"
        and base.weight.dtype == torch.float32
        and m.lora_A[active[0]].weight.dtype == torch.float32
        and (isinstance(dropout, torch.nn.Identity) or not dropout.training)
    )


def cpu_vendor(cpuinfo="/proc/cpuinfo") -> str:
    """The CPU's maker as Linux's /proc/cpuinfo names it ('GenuineIntel', 'AuthenticAMD'); '' when unknown."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def onednn_linears() -> bool:
    """Whether fp32 products of training and scoring forwards run on oneDNN: on AMD's CPUs, where MKL takes its
    AVX2 path. On an AMD EPYC (Zen 4, 2026-12-06) a SmolLM2 forward without gradients ran 1.06x faster so, a policy
    step (forward and backward) 1.02x and a whole PPO update 1.04x (docs/benchmarks.md, "Linear products on oneDNN
    on AMD's CPUs"); on an Intel Xeon oneDNN was the slower at these sizes (a 320-row prefill: 410 against 312
    ms)."""
    if ONEDNN["linears"] is None:
        import torch

        ONEDNN["linears"] = (
            cpu_vendor() == "AuthenticAMD"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    return ONEDNN["linears"]


def linear_product(x, weight, bias=None):
    """`F.linear(x, weight, bias)`; fp32 on the CPU outside autocast, where `onednn_linears()`, computed by
    oneDNN (`torch.ops.mkldnn._linear_pointwise`, the weight as it is), with gradients through `_OneDnnLinear`
    (its backward the products `F.linear`'s own takes). The sums run in another order than MKL's: the last bits
    differ."""
    import torch

    if not (
        onednn_linears()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.dim() >= 2
        and x.numel()
        and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
    ):
        return torch.nn.functional.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDnnLinear.apply(x, weight, bias)
    return _onednn_product(x, weight, bias)


def _onednn_product(x, weight, bias):
    import torch

    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def _onednn_linear_function():
    import torch

    class OneDnnLinear(torch.autograd.Function):
        """y = x W^T + b, the product on oneDNN; the backward's products as `F.linear`'s (MKL)."""

        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            return _onednn_product(x, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1])
            grad_x = grad_w = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight).view(x.shape)
            if ctx.needs_input_grad[1]:
                grad_w = g.t() @ x.reshape(-1, x.shape[-1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum(0)
            return grad_x, grad_w, grad_b

    return OneDnnLinear


@contextlib.contextmanager
def product_linears(*models):
    """While inside, each fp32 `nn.Linear` of `models` on the CPU computes its product by `linear_product` (on
    oneDNN on AMD's CPUs; elsewhere, or under ZeRO-3 or FSDP, nothing changes). A module whose forward is already
    replaced on the instance (accelerate's hooks, an enclosing context) is left alone. Not for generation: its
    decode steps take packed copies of the weights (cai.runtime.decode.packed_linears)."""
    if not onednn_linears() or not dist.whole_weights():
        yield
        return
    with replaced_forwards(cpu_fp32_linears(*models), _product_forward):
        yield


def cpu_fp32_linears(*models) -> list:
    """The plain `nn.Linear`s of `models` (None skipped) with fp32 weights on the CPU whose forward is not
    replaced on the instance already (accelerate's hooks, an enclosing context)."""
    import torch

    return [
        m
        for model in models
        if model is not None
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and "forward" not in m.__dict__
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32
    ]


def _product_forward(self, x):
    return linear_product(x, self.weight, self.bias)


@contextlib.contextmanager
def training_layers(model):
    """The layers of a training forward: LoRA layers as one node each (`fused_lora_linears`), the other fp32
    linears' products by `linear_product` (`product_linears`), the RMSNorms as one node each (`fused_norms`)."""
    with fused_lora_linears(model), product_linears(model), fused_norms(model):
        yield


@contextlib.contextmanager
def fused_norms(model):
    """While inside, each of `model`'s RMSNorms of a known plain kind (`norms.PLAIN_RMS_NORMS`) with an fp32
    weight on the CPU computes as one autograd node (cai.runtime.kernels.norms) when its input is fp32 and no
    autocast is on; elsewhere its own forward. Not under ZeRO-3 or FSDP: with sharded weights it is untested."""
    import torch

    if not dist.whole_weights():
        yield
        return
    layers = [
        m
        for m in model.modules()
        if type(m).__name__ in norms.PLAIN_RMS_NORMS
        and "forward" not in m.__dict__
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32
    ]
    with replaced_forwards(layers, _fused_norm_forward):
        yield


def _fused_norm_forward(self, x):
    import torch

    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return type(self).forward(self, x)
    return norms.rms_norm(x, self.weight, self.variance_epsilon)


@contextlib.contextmanager
def fused_lora_linears(model):
    """While training a LoRA model on the CPU in fp32 (calls with gradients), each LoRA-adapted linear of
    `model` (peft's `lora.Linear`) computes `W x + scaling * B(A x)` as one autograd node (`_FusedLora`): the
    adapter's product is added in place into the base product, and in the backward the adapter's share of the
    input gradient into the base's. Peft's forward writes three more tensors the size of the layer's output
    per call (`B(A x)`, its scaling, the sum) and its backward two more the size of the input and output; the
    same maths, in fewer passes over memory. Same layers as `simple_lora` takes
    (one adapter, no variant, no fan-in-fan-out, no active dropout, fp32 on the CPU); a call without
    gradients, under autocast, with the adapters disabled or merged, or with peft's per-call keywords takes
    peft's forward, and so does a layer whose base weight or bias trains. Not used under ZeRO-3 or FSDP, whose
    hooks gather a module's weights only when that module itself is called. The sums run in another order (the
    scaling is applied to B), so outputs and gradients differ from peft's in the last bits
    (tests/test_generate.py)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        yield
        return
    if not dist.whole_weights():
        yield
        return
    layers = [
        m
        for m in model.modules()
        if isinstance(m, LoraLinear)
        and simple_lora(m)
        and not m.base_layer.weight.requires_grad
        and (m.base_layer.bias is None or not m.base_layer.bias.requires_grad)
    ]
    with replaced_forwards(layers, _fused_lora_forward):
        yield


def _fused_lora_forward(self, x, *args, **kwargs):
    import torch

    if (
        args
        or kwargs
        or not torch.is_grad_enabled()
        or self.disable_adapters
        or self.merged
        or torch.is_autocast_enabled(x.device.type)
        or x.dtype != torch.float32
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    return _FusedLora.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    )


def _fused_lora_function():
    import torch

    class FusedLora(torch.autograd.Function):
        """y = x W^T + b + s (x A^T) B^T, with W and b frozen; gradients for x, A and B."""

        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
            x2 = x.reshape(-1, x.shape[-1])
            xa = x2 @ lora_a.t()  # [N, r]
            sb = lora_b * scaling  # [out, r]
            y = linear_product(x2, weight, bias)
            y.addmm_(xa, sb.t())
            ctx.save_for_backward(x2, xa, weight, lora_a, sb)
            ctx.scaling = scaling
            ctx.x_shape = x.shape
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x2, xa, weight, lora_a, sb = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1])
            gb = g @ sb  # [N, r]: the gradient at A x, scaled
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = g @ weight
                grad_x.addmm_(gb, lora_a)
                grad_x = grad_x.view(ctx.x_shape)
            if ctx.needs_input_grad[3]:
                grad_a = gb.t() @ x2
            if ctx.needs_input_grad[4]:
                grad_b = (g.t() @ xa) * ctx.scaling
            return grad_x, None, None, grad_a, grad_b, None

    return FusedLora


_FusedLora = LazyFunction(_fused_lora_function)
_OneDnnLinear = LazyFunction(_onednn_linear_function)
