"""A packed row's attention on the CPU, one flash kernel call per segment, as one autograd node.

Segment s (cai.runtime.packing.Packing) owns the packed positions [start, start + length) and attends to its
ancestors' keys, then causally to its own. Sliced through autograd, each segment's slices of the queries, keys
and values fill a zero gradient the size of the whole row in the backward, and autograd adds those up: a third
of the attention's time on the CPU. Here the backward writes each segment's gradients into the row's own. SmolLM2's
30 layers, forward and backward over a 776-token packed row: 0.29-0.31 s against 0.40-0.46 s
(docs/benchmarks.md)."""

from __future__ import annotations

from cai.runtime.kernels.lazy import LazyFunction


def segment_attention(query, key, value, segments: list, scale):
    """query [1, H, N, D], key and value [1, H_kv, N, D] (H a multiple of H_kv), all of one dtype (fp32, bf16 or
    fp16) on the CPU -> [1, N, H, D]. `segments`: (start, length, ancestors' (start, length) ranges, additive mask
    [length, ancestors' tokens + length] or None for a causal segment without ancestors)."""
    return SEGMENT_ATTENTION.apply(query, key, value, segments, scale)


def _function():
    import torch

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    def seen(x, s: int, n: int, above: list):  # a segment's keys or values: its ancestors', then its own
        own = x[:, :, s : s + n]
        return torch.cat([x[:, :, a : a + m] for a, m in above] + [own], 2) if above else own

    class SegmentAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, segments, scale):
            out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
            ctx.kept = []
            for s, n, above, mask in segments:
                k, v = seen(key, s, n, above), seen(value, s, n, above)
                o, lse = flash(query[:, :, s : s + n], k, v, 0.0, mask is None, attn_mask=mask, scale=scale)
                out[:, s : s + n] = o.transpose(1, 2)
                ctx.kept.append((k, v, o, lse))
            ctx.save_for_backward(query, key, value)
            ctx.segments, ctx.scale = segments, scale
            return out

        @staticmethod
        def backward(ctx, grad):
            query, key, value = ctx.saved_tensors
            dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
            for (s, n, above, mask), (k, v, o, lse) in zip(ctx.segments, ctx.kept):
                go, q = grad[:, s : s + n].transpose(1, 2), query[:, :, s : s + n]
                gq, gk, gv = flash_backward(
                    go, q, k, v, o, lse, 0.0, mask is None, attn_mask=mask, scale=ctx.scale
                )
                dq[:, :, s : s + n] = gq
                at = 0
                for a, m in [*above, (s, n)]:  # the keys' and values' gradients back to their own positions
                    dk[:, :, a : a + m] += gk[:, :, at : at + m]
                    dv[:, :, a : a + m] += gv[:, :, at : at + m]
                    at += m
            return dq, dk, dv, None, None

    return SegmentAttention


SEGMENT_ATTENTION = LazyFunction(_function)
