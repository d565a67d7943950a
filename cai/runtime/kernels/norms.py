"""An RMSNorm as one autograd node: y = w * x / sqrt(mean(x^2) + eps) over the last axis.

transformers' RMSNorm forward (the variance by `pow` and `mean`, `rsqrt`, two products) and autograd's backward
of it take some fifteen passes over the hidden states; this takes two forward (the norm of each row, then x times
its scale and the weight, in place) and about six backward, the same maths. SmolLM2's 61 norms, forward and
backward over a 776-token packed row on the CPU: 76-89 ms against 156-168 ms (docs/benchmarks.md)."""

from __future__ import annotations

from cai.runtime.kernels.lazy import LazyFunction

# transformers' norm classes that compute exactly weight * (x / sqrt(mean(x^2) + eps)), the variance in fp32
# (Gemma's 1 + weight and OLMo's unweighted norms are not among them)
PLAIN_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


def rms_norm(x, weight, eps: float):
    """The norm of `x` [..., H] with `weight` [H]: one autograd node, gradients for both."""
    return RMS_NORM.apply(x, weight, float(eps))


def _function():
    import torch

    class RmsNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            H = x.shape[-1]
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            scale = norm.square_().div_(H).add_(eps).rsqrt_()  # 1 / sqrt(mean(x^2) + eps), one per row
            ctx.save_for_backward(x, weight, scale)
            return (x * scale).mul_(weight)

        @staticmethod
        def backward(ctx, grad):
            x, weight, scale = ctx.saved_tensors
            unit = x * scale  # x / rms(x)
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (grad * unit).sum(tuple(range(grad.dim() - 1)))
            # d/dx of w * x / rms(x): (g w - unit * mean(g w unit)) / rms(x)
            gw = grad * weight
            mean = (gw * unit).mean(-1, keepdim=True)
            return torch.addcmul(gw, unit, mean, value=-1).mul_(scale), grad_w, None

    return RmsNorm


RMS_NORM = LazyFunction(_function)
