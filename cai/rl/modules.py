"""The models PPO trains, as torch modules whose forward reads only response positions.

A causal LM's trunk runs over prompt + response; the LM head (a [hidden × vocab] matmul, ~20% of a small
model's FLOPs) and the value head are applied only to the hidden states that predict response tokens.
The trunk's forward is packed (padding-free, the prompt prefix all rows share computed once: cai.runtime.packing)
when the model allows; `check_varlen` checks that packing is exact on a given model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cai.runtime.forward import logit_entropy, position_ids, selected_logprobs
from cai.runtime.packing import base_of, pack, packed_states, trunk_of, varlen_supported
from cai.runtime.settings import fp32_head

# ---- packed forwards over prompt + response, read at the response positions ----


def response_states(
    model,
    input_ids,
    attention_mask,
    n_response: int,
    varlen: bool = True,
    shift: int = 1,
    tied_head: bool = False,
):
    """Last hidden states at the positions that predict each real response token (the last `n_response`
    columns where `attention_mask` is 1): [n_real, H], in row-major order of the response mask.

    With `varlen`, the real tokens of all rows are packed into one sequence: no padding is computed, the prefix
    that every row shares (a chat template's system prompt) is computed once, and so is each prompt that several
    rows sample (RLOO's and GRPO's groups). Otherwise the padded batch runs with its attention mask. Both give the
    same states, and the same gradients. `shift=0` gives the states at the tokens themselves. `tied_head`: the LM
    head is in the same backward (cai.runtime.packing.packed_states).
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
    # a row's real tokens are contiguous (left-padded prompt, then the response up to EOS): its response tokens
    # are its last r real ones, read at the states `shift` positions earlier. The last `shift` tokens' states
    # are read by nothing (causal: no earlier state depends on them), so they are not packed at all.
    seqs = [input_ids[i][real[i]] for i in range(B)]
    n_prompt = real[:, : T - n_response].sum(1).tolist()
    by_prompt: dict[tuple, list[int]] = {}
    for i in range(B):
        by_prompt.setdefault(tuple(seqs[i][: n_prompt[i]].tolist()), []).append(i)
    groups = list(by_prompt.values())
    packed = pack([[seqs[i][: len(seqs[i]) - shift] for i in g] for g in groups], input_ids.device)
    h = packed_states(model, packed, tied_head)
    where = [None] * B
    for w, i in zip(packed.where, (i for g in groups for i in g)):
        where[i] = w
    r = rmask.sum(1).tolist()
    idx = torch.cat([w[len(w) - n :] for w, n in zip(where, r)]).to(h.device)
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


def logprobs_from_hidden(head, hidden, tokens, temperature: float, entropy: bool = False):
    """log π(token) under softmax(head(hidden)/temperature), and optionally the per-token entropy (no grad)."""
    logits = head(hidden).float()
    logp = selected_logprobs(logits, tokens, temperature)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = logit_entropy(logits.detach() / temperature)
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
            fp32_head(self.v_head.to(next(lm.parameters()).device))  # values in fp32 on any trunk

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
        # the LM head runs in this forward's graph when log-probs are asked for
        h = response_states(self.lm, input_ids, attention_mask, n_response, self.varlen, tied_head=logprobs)
        out = {}
        if logprobs or entropy:
            R = n_response
            tokens = input_ids[:, -R:][attention_mask[:, -R:].bool()]
            lp, ent = logprobs_from_hidden(head, h, tokens, temperature, entropy)
            out["logprobs"] = scatter_response(lp, attention_mask, R)
            out["entropy"] = scatter_response(ent, attention_mask, R) if ent is not None else None
        if values and self.v_head is not None:
            out["values"] = scatter_response(self.v_head(h).squeeze(-1), attention_mask, n_response)
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
    optimizer. The optimizer gets two parameter groups (`param_groups`), so each keeps its learning rate. A
    critic-free learner (RLOO, GRPO: `critic_free`) holds the policy alone, in one group."""

    def __init__(self, policy: PolicyModel, critic: nn.Module | None = None, critic_free: bool = False):
        super().__init__()
        if critic_free and (critic is not None or policy.v_head is not None):
            raise ValueError("a critic-free learner takes neither a critic nor a value head")
        if not critic_free and (critic is None) == (policy.v_head is None):
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
        head_values = values and self.critic is None and self.policy.v_head is not None
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
        critic = self.critic or self.policy.v_head
        return list(critic.parameters()) if critic is not None else []

    def param_groups(self, policy_lr: float, critic_lr: float) -> list[dict]:
        """Trainable parameters in optimizer groups: 'policy' (the LM or its adapters) and 'critic' (none when
        critic-free)."""
        critic = [p for p in self.critic_parameters() if p.requires_grad]
        ids = {id(p) for p in critic}
        policy = [p for p in self.policy.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"name": "policy", "params": policy, "lr": policy_lr}]
        return groups + ([{"name": "critic", "params": critic, "lr": critic_lr}] if critic else [])


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
        fp32_head(head)  # values are fp32 on any trunk
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
