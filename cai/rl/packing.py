"""PPO's forwards over prompt + response that read only the response positions, packed (padding-free) with the
prompt prefix all rows share computed once (cai.runtime.packing), and the check that packing is exact on a
given model.
"""

from __future__ import annotations

import torch

from cai.runtime.forward import position_ids
from cai.runtime.packing import pack, packed_states, trunk_of


def response_states(model, input_ids, attention_mask, n_response: int, varlen: bool = True, shift: int = 1):
    """Last hidden states at the positions that predict each real response token (the last `n_response`
    columns where `attention_mask` is 1): [n_real, H], in row-major order of the response mask.

    With `varlen`, the real tokens of all rows are packed into one sequence: no padding is computed, and a
    prefix that every row shares (a chat template's system prompt, or one prompt sampled several times) is
    computed once and attended to by every row. Otherwise the padded batch runs with its attention mask.
    Both give the same states, and the same gradients. `shift=0` gives the states at the tokens themselves.
    """
    B, T = input_ids.shape
    rmask = attention_mask[:, T - n_response :].bool()
    if not varlen:
        trunk, _ = trunk_of(model)
        out = trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state[:, T - n_response - shift : T - shift][rmask]
    real = attention_mask.bool()
    seqs = [input_ids[i][real[i]] for i in range(B)]
    packed = pack([seqs], input_ids.device)
    h = packed_states(model, packed)
    # a row's real tokens are contiguous (left-padded prompt, then the response up to EOS): its response tokens
    # are its last r real ones, predicted by the states one position earlier
    r = rmask.sum(1).tolist()
    idx = torch.cat([w[len(w) - n - shift : len(w) - shift] for w, n in zip(packed.where, r)]).to(h.device)
    return h[idx]


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
