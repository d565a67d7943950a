"""The models PPO trains, as torch modules whose forward reads only response positions.

A causal LM's trunk runs over prompt + response; the LM head (a [hidden × vocab] matmul, ~20% of a small
model's FLOPs) and the value head are applied only to the hidden states that predict response tokens.
Position ids follow the attention mask, so left padding is handled (cai.scoring.position_ids).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cai.rl.ppo_math import entropy_from_logits
from cai.runtime.forward import position_ids


def gathered(params: list):
    """Context in which parameters built already partitioned by DeepSpeed ZeRO-3 (`zero3_init_flag`) are whole
    and writable (changes are kept); a no-op for ordinary parameters."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


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


def logprobs_from_hidden(head, hidden, tokens, temperature: float, entropy: bool = False):
    """log π(token) under softmax(head(hidden)/temperature), and optionally the per-token entropy (no grad)."""
    from trl.trainer.utils import selective_log_softmax

    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = selective_log_softmax(logits, tokens)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = entropy_from_logits(logits.detach())
    return logp, ent


class PolicyModel(nn.Module):
    """A causal LM (optionally peft/LoRA-wrapped) with an optional scalar value head on its trunk."""

    def __init__(self, lm, value_head: bool = False):
        super().__init__()
        self.lm = lm
        self.varlen = varlen_supported(lm)
        self.v_head = None
        if value_head:
            hidden = base_of(lm).config.get_text_config().hidden_size
            self.v_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.v_head.weight)
            nn.init.zeros_(self.v_head.bias)
            self.v_head.to(next(lm.parameters()).device)

    @property
    def config(self):  # read by accelerate / trl when preparing a DeepSpeed engine (hidden size)
        return base_of(self.lm).config

    @property
    def is_gradient_checkpointing(self) -> bool:  # read by trl's unwrap_model_for_generation
        base = base_of(self.lm)
        flag = getattr(base, "is_activation_checkpointing", None)  # transformers 5 name; the old one warns
        return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, **kwargs):
        base_of(self.lm).gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self):
        base_of(self.lm).gradient_checkpointing_disable()

    def forward(
        self,
        input_ids,
        attention_mask,
        n_response: int,
        temperature: float = 1.0,
        logprobs: bool = True,
        values: bool = False,
        entropy: bool = False,
    ):
        """dict(logprobs, values, entropy), each [B, R] for the last R = n_response columns, 0 on padding."""
        _, head = trunk_of(self.lm)
        h = response_states(self.lm, input_ids, attention_mask, n_response, self.varlen)
        out = {}
        if logprobs or entropy:
            R = n_response
            tokens = input_ids[:, -R:][attention_mask[:, -R:].bool()]
            lp, ent = logprobs_from_hidden(head, h, tokens, temperature, entropy)
            out["logprobs"] = scatter_response(lp, attention_mask, R)
            out["entropy"] = scatter_response(ent, attention_mask, R) if ent is not None else None
        if values and self.v_head is not None:
            out["values"] = scatter_response(self.v_head(h).squeeze(-1).float(), attention_mask, n_response)
        return out

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the same base with LoRA adapters disabled (no second copy)."""
        if not hasattr(self.lm, "disable_adapter"):
            raise RuntimeError("reference(): the policy has no adapters; pass a separate reference model")
        with self.lm.disable_adapter():
            yield self


class ActorCritic(nn.Module):
    """The policy and its critic (a separate ValueModel, or the policy's value head) as one module, so that one
    engine and one optimizer hold both: accelerate's DeepSpeed integration drives exactly one model and one
    optimizer. The optimizer gets two parameter groups (`param_groups`), so each keeps its learning rate."""

    def __init__(self, policy: PolicyModel, critic: nn.Module | None = None):
        super().__init__()
        if (critic is None) == (policy.v_head is None):
            raise ValueError("give either a separate critic or a policy with a value head")
        self.policy, self.critic = policy, critic

    @property
    def config(self):
        return self.policy.config

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.policy.is_gradient_checkpointing

    @property
    def _no_split_modules(self) -> list[str]:  # the block classes FSDP shards one by one
        models = [base_of(self.policy.lm)] + ([base_of(self.critic.model)] if self.critic is not None else [])
        return sorted({name for m in models for name in (getattr(m, "_no_split_modules", None) or [])})

    def gradient_checkpointing_enable(self, **kwargs):
        self.policy.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self):
        self.policy.gradient_checkpointing_disable()

    def forward(
        self,
        input_ids,
        attention_mask,
        n_response: int,
        temperature: float = 1.0,
        logprobs: bool = True,
        values: bool = True,
        entropy: bool = False,
        adapters: bool = True,
    ):
        """dict(logprobs, entropy, values) as PolicyModel.forward, the values from whichever critic there is;
        the policy trunk runs only when something of the policy is asked for. `adapters=False` gives the
        reference policy of a LoRA policy (its adapters disabled), through this module's forward as FSDP needs."""
        head_values = values and self.critic is None
        out = {}
        if logprobs or entropy or head_values:
            with contextlib.nullcontext() if adapters else self.policy.reference():
                out = self.policy(
                    input_ids, attention_mask, n_response, temperature, logprobs, head_values, entropy
                )
        if values and self.critic is not None:
            out["values"] = self.critic(input_ids, attention_mask, n_response)
        return out

    def critic_parameters(self) -> list:
        return list((self.critic or self.policy.v_head).parameters())

    def param_groups(self, policy_lr: float, critic_lr: float) -> list[dict]:
        """Trainable parameters in two optimizer groups: 'policy' (the LM or its adapters) and 'critic'."""
        critic = [p for p in self.critic_parameters() if p.requires_grad]
        ids = {id(p) for p in critic}
        policy = [p for p in self.policy.parameters() if p.requires_grad and id(p) not in ids]
        return [
            {"name": "policy", "params": policy, "lr": policy_lr},
            {"name": "critic", "params": critic, "lr": critic_lr},
        ]


class ValueModel(nn.Module):
    """A separate critic: a transformer trunk and a linear head giving one value per response token.

    Wraps a sequence-classification model (AutoModelForSequenceClassification, num_labels=1) and applies its
    `score`/`classifier` Linear to every response position; `zero_head` starts all values at 0.
    """

    def __init__(self, seq_cls_model, zero_head: bool = True):
        super().__init__()
        self.model = seq_cls_model
        base = base_of(seq_cls_model)
        head = getattr(base, "score", None) or getattr(base, "classifier", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"critic: {type(base).__name__} has no Linear score head")
        if zero_head:
            with gathered(list(head.parameters())), torch.no_grad():
                head.weight.zero_()
                if head.bias is not None:
                    head.bias.zero_()
        head.requires_grad_(True)  # a LoRA-wrapped critic still trains its head
        self.varlen = varlen_supported(seq_cls_model)

    def forward(self, input_ids, attention_mask, n_response: int):
        base = base_of(self.model)
        head = getattr(base, "score", None) or getattr(base, "classifier", None)
        h = response_states(self.model, input_ids, attention_mask, n_response, self.varlen)
        return scatter_response(head(h).squeeze(-1).float(), attention_mask, n_response)


def trainable_state(module: nn.Module) -> dict:
    """Trainable parameters by name (shared/tied parameters once), as contiguous CPU tensors."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict) -> None:
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable parameters, e.g. {missing[0]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
