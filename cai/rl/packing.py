"""Packed (padding-free) forwards for PPO: the real tokens of a batch run as one sequence through the trunk, with
a prefix shared by every row (a chat template's system prompt, one prompt sampled several times) computed once
and attended to by every row. Exact: the same hidden states, and gradients, as the padded batch with its
attention mask (tested). Position ids follow the attention mask, so left padding is handled.
"""

from __future__ import annotations

import contextlib

import torch

from cai.runtime.forward import position_ids


def base_of(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trunk_of(model):
    """(trunk, lm_head or None) of a transformers model: the backbone that returns hidden states, and its head."""
    base = base_of(model)
    trunk = getattr(base, base.base_model_prefix)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return trunk, head


VARLEN = "cai_varlen"


def _varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, cai_packing=None, **kwargs
):
    """Causal attention over sequences packed into one row ([1, heads, N, D]).

    `cai_packing` = (prefix, cu): the first `prefix` tokens are a prefix shared by every sequence (computed once),
    then sequence i's own tokens occupy [cu[i], cu[i+1]); each attends to the prefix and causally to itself.
    """
    import torch.nn.functional as F

    if cai_packing is None or attention_mask is not None or query.shape[0] != 1:
        raise RuntimeError("cai_varlen attention needs packed inputs (use cai.rl.modules.response_states)")
    for key_name in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(key_name) is not None:
            raise NotImplementedError(f"cai_varlen attention does not support {key_name}")
    prefix, cu = cai_packing
    gqa = query.shape[1] != key.shape[1]
    outs = []
    if prefix:
        kp, vp = key[:, :, :prefix], value[:, :, :prefix]
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, :prefix], kp, vp, is_causal=True, scale=scaling, enable_gqa=gqa
            )
        )
    for s, e in zip(cu[:-1], cu[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        if not prefix:
            outs.append(
                F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
            )
            continue
        n = e - s
        allowed = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
        outs.append(
            F.scaled_dot_product_attention(
                q,
                torch.cat([kp, k], 2),
                torch.cat([vp, v], 2),
                attn_mask=allowed,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


def shared_prefix(seqs: list, min_len: int = 8) -> int:
    """Length of the prefix common to all token sequences (each keeps at least one token of its own); 0 when
    shorter than `min_len` or for a single sequence."""
    if len(seqs) < 2:
        return 0
    limit = min(len(x) for x in seqs) - 1
    first = seqs[0][:limit]
    n = limit
    for x in seqs[1:]:
        diff = (x[:limit] != first).nonzero()
        if len(diff):
            n = min(n, int(diff[0]))
    return n if n >= min_len else 0


def varlen_supported(model) -> bool:
    """Packed (padding-free) forwards for plain decoder configs: no sliding window, no logit soft-capping."""
    cfg = base_of(model).config.get_text_config()
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    return not any(getattr(cfg, k, None) for k in ("attn_logit_softcapping", "layer_types_sliding"))


@contextlib.contextmanager
def _attention(model, name: str):
    from transformers import AttentionInterface

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _varlen_attention)
    cfg = base_of(model).config
    old = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = old


def response_states(model, input_ids, attention_mask, n_response: int, varlen: bool = True, shift: int = 1):
    """Last hidden states at the positions that predict each real response token (the last `n_response`
    columns where `attention_mask` is 1): [n_real, H], in row-major order of the response mask.

    With `varlen`, the real tokens of all rows are packed into one sequence: no padding is computed, and a
    prefix that every row shares (a chat template's system prompt, or one prompt sampled several times) is
    computed once and attended to by every row. Otherwise the padded batch runs with its attention mask.
    Both give the same states, and the same gradients. `shift=0` gives the states at the tokens themselves.
    """
    trunk, _ = trunk_of(model)
    B, T = input_ids.shape
    rmask = attention_mask[:, T - n_response :].bool()
    if not varlen:
        out = trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state[:, T - n_response - shift : T - shift][rmask]
    real = attention_mask.bool()
    seqs = [input_ids[i][real[i]] for i in range(B)]
    prefix = shared_prefix(seqs)
    lengths = [len(x) - prefix for x in seqs]
    cu = [prefix]
    for n in lengths:
        cu.append(cu[-1] + n)
    ids = torch.cat([seqs[0][:prefix]] + [x[prefix:] for x in seqs]).unsqueeze(0)
    pos = (
        torch.cat([torch.arange(prefix)] + [torch.arange(prefix, prefix + n) for n in lengths])
        .to(input_ids.device)
        .unsqueeze(0)
    )
    # packed index of every real column: shared prefix positions map into the prefix, the rest to the row's own part
    rel = real.long().cumsum(1) - 1  # position within the row
    start = torch.tensor(cu[:-1], device=input_ids.device).unsqueeze(1)
    packed_index = torch.where(rel < prefix, rel, start + rel - prefix)
    with _attention(model, VARLEN):
        h = trunk(
            input_ids=ids, position_ids=pos, use_cache=False, cai_packing=(prefix, cu)
        ).last_hidden_state[0]
    return h[packed_index[:, T - n_response - shift : T - shift][rmask]]


@torch.no_grad()
def check_varlen(models, rows: list[list[int]], pad_id: int, device) -> bool:
    """Compare packed and padded log-probs of the first model on left-padded `rows`; on a mismatch turn packing
    off in every model. Returns whether packing stays on."""
    models = [m for m in models if getattr(m, "varlen", False)]
    if not models:
        return True
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)
    probe = models[0]
    packed = probe(ids, mask, 3)["logprobs"]
    probe.varlen = False
    padded = probe(ids, mask, 3)["logprobs"]
    probe.varlen = True
    if torch.allclose(packed, padded, rtol=1e-3, atol=1e-3):
        return True
    for m in models:
        m.varlen = False
    return False


def scatter_response(values, attention_mask, n_response: int):
    """[n_real] values back to [B, n_response], zero on padding."""
    rmask = attention_mask[:, attention_mask.shape[1] - n_response :].bool()
    out = values.new_zeros(rmask.shape)
    out[rmask] = values
    return out
