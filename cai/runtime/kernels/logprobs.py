"""log softmax(logits / T)[token] per row, with its own backward: cai.runtime.forward.selected_logprobs."""

from __future__ import annotations

from cai.runtime.kernels.lazy import LazyFunction

ROWS = 32  # rows of logits per block: 32 x 49,152 fp32 is 6 MB, reused from block to block


def log_normaliser(logits, temperature: float):
    """logsumexp(logits / temperature) per row of a [N, V] tensor, a block of rows at a time."""
    import torch

    # at least fp32 (bf16 logits are normalised in fp32), fp64 kept for gradcheck
    lse = logits.new_empty(logits.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32))
    for i in range(0, logits.shape[0], ROWS):
        block = logits[i : i + ROWS].to(lse.dtype)
        if temperature != 1.0:
            block = block / temperature
        torch.logsumexp(block, dim=-1, out=lse[i : i + ROWS])
    return lse


def _function():
    import torch

    class SelectedLogprobs(torch.autograd.Function):
        """log softmax(z / T)[token] per row of z [N, V]; the gradient (onehot - softmax(z / T)) g / T."""

        @staticmethod
        def forward(ctx, logits, tokens, temperature):
            lse = log_normaliser(logits, temperature)
            picked = logits.gather(-1, tokens[:, None]).squeeze(-1).to(lse.dtype)
            if temperature != 1.0:
                picked = picked / temperature
            ctx.save_for_backward(logits, tokens, lse)
            ctx.temperature = temperature
            return picked - lse

        @staticmethod
        def backward(ctx, grad):
            # formed in at least fp32 a block of rows at a time and rounded once into the logits' dtype: in bf16
            # onehot - softmax cancels for a confident target (1 - p), losing its gradient
            logits, tokens, lse = ctx.saved_tensors
            T = ctx.temperature
            g = grad.to(lse.dtype) / T
            out, same = torch.empty_like(logits), logits.dtype == lse.dtype
            for i in range(0, logits.shape[0], ROWS):
                rows = slice(i, i + ROWS)  # fp32 (fp64) logits in place in `out`, else one block's copy
                block = out[rows].copy_(logits[rows]) if same else logits[rows].to(lse.dtype)
                if T != 1.0:
                    block.div_(T)
                block.sub_(lse[rows, None]).exp_().mul_(-g[rows, None])
                block.scatter_add_(-1, tokens[rows, None], g[rows, None])
                if not same:
                    out[rows] = block
            return out, None, None

    return SelectedLogprobs


SELECTED_LOGPROBS = LazyFunction(_function)
