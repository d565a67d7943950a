"""Packed (padding-free) forwards that compute a shared beginning once: the one way cai runs a trunk over several
sequences that share their start — PPO's rollouts (a chat template's system prompt, or one prompt sampled k
times), a preference pair's two replies to one conversation, a labeller's two option orders of one question.

Sequences come in groups. The sequences of a packed row share a prefix tree of two levels: the row's root (the
longest beginning every sequence shares: a chat template's system prompt) and each group's prefix after it (a
pair's conversation); every sequence keeps at least one token of its own. Every token goes once into the packed
row: the root, then each group's prefix, then each sequence's own part. Attention (`Packing`): a segment attends
to all of its ancestors' tokens and causally to its own. Position ids continue from the ancestors, so the hidden
states are those of each sequence run alone — the same values and gradients as the padded batch (tested), with no
padding computed and no shared beginning computed twice. Attention runs as one call per segment on the CPU, and
on accelerators as one batched call per layer and tree depth (gathered into a padded batch for attention only).
torch is imported inside the functions: this module is imported by light ones.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from cai.runtime import distributed as dist
from cai.runtime.kernels.attention import segment_attention

VARLEN = "cai_varlen"
# segments' attention: None, one padded batch per depth of the tree on an accelerator and one call per segment on
# the CPU (Packing); True or False: batched or per segment on any device
BATCHED_ATTENTION = None


def base_of(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trunk_of(model):
    """(trunk, lm_head or None) of a transformers model: the backbone that returns hidden states, and its head."""
    base = base_of(model)
    trunk = getattr(base, base.base_model_prefix)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return trunk, head


def common_prefix(seqs: list, min_len: int = 8) -> int:
    """Length of the beginning every token sequence shares (each keeps at least one token of its own); 0 when
    shorter than `min_len` or for a single sequence."""
    if len(seqs) < 2:
        return 0
    limit = min(len(x) for x in seqs) - 1
    first = _ints(seqs[0][:limit])
    n = limit
    for x in seqs[1:]:
        x = _ints(x[:n])
        k = next((i for i, (a, b) in enumerate(zip(x, first)) if a != b), n)
        n = min(n, k)
    return n if n >= min_len else 0


def _ints(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


class _Batch:
    """Some segments of a packed row gathered into a padded batch for one attention call: [S, T] queries (T, the
    longest of them) and [S, P + T] keys (P, the most ancestor tokens of any of them); `mask` [S, 1, T, P + T]
    allows a query its ancestors' tokens and, causally, its own; `out_src` / `out_dst`: its real queries' places in
    the flattened [S * T] output and in the packed row."""

    def __init__(self, segments: list, device):
        import torch

        lengths = torch.tensor([seg[1] for seg in segments], device=device)
        S, T = len(segments), int(lengths.max())
        t = torch.arange(T, device=device)
        valid = t[None, :] < lengths[:, None]
        starts = torch.tensor([seg[0] for seg in segments], device=device)
        q_index = starts[:, None] + torch.where(valid, t, 0)
        above = [[i for a, n in seg[2] for i in range(a, a + n)] for seg in segments]
        P = max(len(x) for x in above)
        p_index = torch.tensor([x + [0] * (P - len(x)) for x in above], dtype=torch.long, device=device)
        pvalid = (
            torch.arange(P, device=device)[None, :]
            < torch.tensor([len(x) for x in above], device=device)[:, None]
        )
        self.shape = (S, T, P)
        self.q_index = q_index.reshape(-1)
        self.k_index = torch.cat([p_index, q_index], 1).reshape(-1)
        own = torch.ones(T, T, dtype=torch.bool, device=device).tril() & valid[:, None, :]
        self.mask = torch.cat([pvalid[:, None, :].expand(-1, T, -1), own], 2).unsqueeze(1)
        self.out_src = torch.arange(S * T, device=device).reshape(S, T)[valid]
        self.out_dst = q_index[valid]


class Packing:
    """The attention layout of a packed row, made once per forward and read by every layer. Segment s owns
    packed positions [start[s], start[s] + length[s]) and attends causally to them, after all the tokens of its
    ancestors: `above[s]`, the (start, length) ranges of the root and the group prefix above it, in order (none
    for the root, or for a sequence that shares nothing).

    `groups`, one attention call each: padded batches (`_Batch`), one per depth in the tree (the root, the group
    prefixes and sequences under the root alone, the replies), or segments alone, (start, length, above, mask).
    Batches are for accelerators, where a call per segment is a launch per segment. On the CPU a call costs next
    to nothing, and padding does: an HH pair's reply padded to the longest reply of its batch, with the keys of
    the longest conversation, made the kernel compute 3.5-7x the query-key pairs needed, and `cai pm eval` took
    1.13x as long (0.99-1.24) as with a call per segment; a PPO step was level either way (docs/benchmarks.md,
    "Packed attention on the CPU: a call per segment"). There the segments' calls of a layer run as one autograd
    node (cai.runtime.kernels.attention). `order` puts the groups' outputs, concatenated, back in packed order
    (None: already in it)."""

    def __init__(self, start: list[int], length: list[int], above: list[list[tuple[int, int]]], device):
        import torch

        segments = list(zip(start, length, above))
        batched = BATCHED_ATTENTION
        if batched is None:
            batched = torch.device(device).type != "cpu"
        grouped = [[seg] for seg in segments]
        if batched:
            depths = sorted({len(seg[2]) for seg in segments})
            grouped = [[seg for seg in segments if len(seg[2]) == d] for d in depths]
        self.groups, dst = [], []
        for group in grouped:
            if len(group) > 1:
                self.groups.append(_Batch(group, device))
                dst.append(self.groups[-1].out_dst)
                continue
            s, n, anc = group[0]
            p = sum(m for _, m in anc)  # its ancestors' tokens, then causally its own
            mask = torch.ones(n, p + n, dtype=torch.bool, device=device).tril(diagonal=p) if p else None
            self.groups.append((s, n, anc, mask))
            dst.append(torch.arange(s, s + n, device=device))
        dst = torch.cat(dst)
        in_order = bool((dst == torch.arange(len(dst), device=device)).all())
        self.order = None if in_order else torch.argsort(dst)
        self._additive = {}

    def additive(self, dtype) -> list:
        """The segments with their masks additive (0 or -inf) in `dtype`, made once per dtype: what the CPU's
        segment attention takes (cai.runtime.kernels.attention)."""

        def add(m):
            return None if m is None else m.new_zeros(m.shape, dtype=dtype).masked_fill_(~m, -float("inf"))

        if dtype not in self._additive:
            self._additive[dtype] = [(s, n, a, add(m)) for s, n, a, m in self.groups]
        return self._additive[dtype]


def _varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, cai_packing=None, **kwargs
):
    """transformers attention function for a packed row ([1, heads, N, D]) laid out by `cai_packing`."""
    import torch
    import torch.nn.functional as F

    if cai_packing is None:  # an ordinary forward while another caller packs (threads sharing a model)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if attention_mask is not None or query.shape[0] != 1:
        raise RuntimeError("cai_varlen attention takes one packed row and no attention mask")
    for key_name in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(key_name) is not None:
            raise NotImplementedError(f"cai_varlen attention does not support {key_name}")
    if query.device.type == "cpu" and not any(isinstance(b, _Batch) for b in cai_packing.groups):
        if torch.is_autocast_enabled("cpu"):  # as F.scaled_dot_product_attention runs under autocast
            low = torch.get_autocast_dtype("cpu")
            query, key, value = query.to(low), key.to(low), value.to(low)
        if query.dtype == key.dtype == value.dtype in (torch.float32, torch.bfloat16, torch.float16):
            segments = cai_packing.additive(query.dtype)
            return segment_attention(query, key, value, segments, scaling), None
    gqa, H, D = query.shape[1] != key.shape[1], query.shape[1], query.shape[3]
    parts = []
    for b in cai_packing.groups:
        if not isinstance(b, _Batch):  # a segment alone: its ancestors' keys and its own, sliced
            s, n, above, mask = b
            k = torch.cat([key[:, :, a : a + m] for a, m in above] + [key[:, :, s : s + n]], 2)
            v = torch.cat([value[:, :, a : a + m] for a, m in above] + [value[:, :, s : s + n]], 2)
            q = query[:, :, s : s + n]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scaling, is_causal=mask is None, enable_gqa=gqa
            )
            parts.append(o[0])
            continue
        S, T, P = b.shape
        q, k, v = (
            _rows(query, b.q_index, S, T),
            _rows(key, b.k_index, S, P + T),
            _rows(value, b.k_index, S, P + T),
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask, scale=scaling, enable_gqa=gqa)
        parts.append(o.transpose(0, 1).reshape(H, S * T, D).index_select(1, b.out_src))
    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    if cai_packing.order is not None:
        out = out.index_select(1, cai_packing.order)
    return out.unsqueeze(0).transpose(1, 2).contiguous(), None


def _rows(x, index, S: int, width: int):
    """[1, H, N, D] -> [S, H, width, D], gathered at `index` by index_select: its backward adds rows (index_add_),
    4x faster on the CPU than advanced indexing's index_put_ with accumulate."""
    return x[0].index_select(1, index).reshape(x.shape[1], S, width, x.shape[3]).transpose(0, 1)


def varlen_supported(model) -> bool:
    """Packed forwards for plain decoder configs: no sliding window, no logit soft-capping, no logit scaling
    outside the LM head (the packed path reads the trunk, then applies the head itself)."""
    cfg = base_of(model).config.get_text_config()
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("logit_scale", "logits_scaling")):
        return False
    soft = ("attn_logit_softcapping", "final_logit_softcapping", "layer_types_sliding")
    return not any(getattr(cfg, k, None) for k in soft)


def chunk_groups(groups: list[list], size: int):
    """Consecutive groups, about `size` sequences per chunk (a group is never split)."""
    chunk, n = [], 0
    for g in groups:
        if chunk and n + len(g) > size:
            yield chunk
            chunk, n = [], 0
        chunk.append(g)
        n += len(g)
    if chunk:
        yield chunk


_LOCK = threading.Lock()
_USERS: dict[int, list] = {}  # id(config) -> [callers inside, the implementation to restore]


@contextlib.contextmanager
def varlen_attention(model):
    """While inside, the model's attention is the packed one (`_varlen_attention`; an unpacked call meanwhile
    runs as sdpa); the model may be wrapped (DDP's `.module`, a value-head PM's `.lm`, peft). Callers may
    nest or overlap (threads sharing a model): the last one out restores the model's own implementation."""
    from transformers import AttentionInterface

    if VARLEN not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN, _varlen_attention)
    inner = getattr(model, "module", model)
    cfg = base_of(getattr(inner, "lm", inner)).config
    with _LOCK:
        users = _USERS.setdefault(id(cfg), [0, cfg._attn_implementation])
        users[0] += 1
        cfg._attn_implementation = VARLEN
    try:
        yield
    finally:
        with _LOCK:
            users[0] -= 1
            if users[0] == 0:
                cfg._attn_implementation = users[1]
                del _USERS[id(cfg)]


@dataclass
class Packed:
    """A packed row: `ids` and `positions` [1, N], the attention layout, and `where[i]`: the packed position of
    every token of sequence i, in order."""

    ids: object
    positions: object
    packing: Packing
    where: list


def pack(groups: list[list], device, min_prefix: int = 8) -> Packed:
    """Pack groups of token sequences (lists or 1-d tensors of ids): the beginning that every sequence of the row
    shares is computed once (the root), and after it the beginning that the sequences of one group share
    (`common_prefix`, each at least `min_prefix` tokens). `where` follows the sequences in group order."""
    import torch

    groups = [[torch.as_tensor(s, dtype=torch.long) for s in g] for g in groups]
    root = common_prefix([s for g in groups for s in g], min_prefix) if len(groups) > 1 else 0
    ids, pos, start, length, above, where = [], [], [], [], [], []

    def segment(tokens, first: int, ancestors: list) -> tuple[int, int]:
        at = sum(length)
        ids.append(tokens), pos.append(torch.arange(first, first + len(tokens)))
        start.append(at), length.append(len(tokens)), above.append(ancestors)
        return at, len(tokens)

    top = [segment(groups[0][0][:root], 0, [])] if root else []
    for group in groups:
        rest = [s[root:] for s in group]
        p = common_prefix(rest, min_prefix)
        chain = top + [segment(rest[0][:p], root, top)] if p else top
        for s in rest:
            at, n = segment(s[p:], root + p, chain)
            where.append(torch.cat([torch.arange(a, a + m) for a, m in chain] + [torch.arange(at, at + n)]))
    packing = Packing(start, length, above, device)
    return Packed(torch.cat(ids)[None].to(device), torch.cat(pos)[None].to(device), packing, where)


def packed_states(model, packed: Packed, tied_head: bool = False):
    """The trunk's last hidden states over a packed row: [N, H].

    `tied_head`: the caller puts the LM head in the same backward. Where that head's weight is the input
    embedding's (tied, as in SmolLM2) and trains, the embedding's own gradient is taken sparse (the rows of the
    row's tokens): autograd adds those rows to a copy of the head's dense gradient, instead of filling a dense
    zero gradient of the vocabulary's size (113 MB for SmolLM2) and adding the two, which cost about 8% of a
    policy forward and backward on the CPU. The sum, and the `.grad` the optimizer reads, stay dense. Only where the
    weights are whole (`dist.whole_weights`: not ZeRO-3 or FSDP)."""
    import torch

    trunk, head = trunk_of(model)
    emb = trunk.get_input_embeddings()
    sparse = (
        tied_head
        and torch.is_grad_enabled()
        and type(emb) is torch.nn.Embedding
        and head is not None
        and head.weight is emb.weight
        and emb.weight.requires_grad
        and dist.whole_weights()
    )
    inputs = {"input_ids": packed.ids}
    if sparse:
        embeds = torch.nn.functional.embedding(packed.ids, emb.weight, emb.padding_idx, sparse=True)
        inputs = {"inputs_embeds": embeds}
    with varlen_attention(model):
        out = trunk(**inputs, position_ids=packed.positions, use_cache=False, cai_packing=packed.packing)
    return out.last_hidden_state[0]


def labelled_logits(model, input_ids, attention_mask, labels, groups: list[list[int]] | None = None):
    """(logits [M, V], targets [M], rows [M]) at the M positions of a padded batch whose next token is labelled
    (`labels` -100 elsewhere, as Hugging Face trainers mark prompts and padding), in one packed forward: the shared
    beginning of the rows (a chat template's system prompt) runs once, padding not at all, and the LM head only
    at those positions (`logits_to_keep`). `groups`: rows that share more of their beginning (a DPO pair's chosen
    and rejected rows, the same prompt), as lists of row indices; by default each row alone. The M positions come
    row by row in row order, each row's in order; `rows` holds each one's row. The model's own forward runs, so
    DDP, ZeRO and FSDP see the call. The same logits and gradients as the padded forward's at those positions
    (tested)."""
    import torch

    real = attention_mask.bool()
    seqs = [row[m] for row, m in zip(input_ids, real)]
    groups = groups or [[i] for i in range(len(seqs))]
    packed = pack([[seqs[i] for i in g] for g in groups], input_ids.device)
    where = dict(zip((i for g in groups for i in g), packed.where))
    keep, targets, rows = [], [], []
    for i, (lab, m) in enumerate(zip(labels, real)):
        nxt = lab[m][1:]
        j = (nxt != -100).nonzero().squeeze(-1)  # position j predicts token j + 1
        keep.append(where[i].to(input_ids.device)[j])
        targets.append(nxt[j])
        rows.append(torch.full_like(j, i))
    with varlen_attention(model):
        out = model(
            input_ids=packed.ids,
            position_ids=packed.positions,
            use_cache=False,
            cai_packing=packed.packing,
            logits_to_keep=torch.cat(keep),
        )
    return out.logits[0], torch.cat(targets), torch.cat(rows)


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` and a packed row (`labelled_logits`)."""
    base = base_of(getattr(model, "module", model))
    return varlen_supported(base) and takes_logits_to_keep(base)


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (Hugging Face causal LMs do; it saves the head's
    product at every position)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
