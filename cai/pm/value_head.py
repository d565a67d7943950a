"""A preference model with a value head: a causal LM, its LM head kept, plus a scalar head on its trunk.

`ValueHeadPM` gives one value per token from a Linear(hidden → 1, with bias) on the trunk's last hidden state;
cai.pm.sequence_scores reads it at each sequence's last real token, exactly as for sequence-classifier PMs (it
hooks the module named `v_head`). Because the LM head is kept, the PM can also be trained with a
language-modelling loss on the preferred responses (`preference_model.lm_coef`), which keeps it a language
model, as in Askell et al. (2021). The LM loss applies the model's output embedding to the hidden states (logit
soft-capping or scaling that some architectures add in their own forward is not applied).

Folder (save_pretrained / from_pretrained):
- the causal LM as transformers saves it (config.json, *.safetensors), so AutoModelForCausalLM.from_pretrained
  loads its trunk and LM head;
- value_head.safetensors: {"weight": [1, hidden], "bias": [1]};
- value_head.json: the marker by which RewardScorer tells this folder from a sequence-classifier PM.
A training checkpoint of a LoRA run holds the LoRA adapters (adapter_model.safetensors) instead of the full LM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cai.errors import UserError
from cai.runtime.forward import last_token_index
from cai.runtime.models import load_model, resolve
from cai.runtime.settings import DEFAULT, Settings, fp32_head

MARKER = "value_head.json"
HEAD_WEIGHTS = "value_head.safetensors"
IGNORE_INDEX = -100


def is_value_head_dir(path) -> bool:
    return (Path(path) / MARKER).is_file()


def _base(lm):
    """The transformers model under a peft wrapper (LoRA layers stay injected)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def new_value_head(hidden: int, seed: int = 0, std: float = 0.02) -> nn.Linear:
    """Linear(hidden → 1): weights ~ N(0, std²) from `seed` (as transformers initialises a classifier's score
    head), bias 0."""
    head = nn.Linear(hidden, 1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
        head.bias.zero_()
    return head


def response_lm_labels(input_ids, attention_mask, response_len, rows):
    """Language-modelling targets: each selected row's last `response_len` real tokens (its response), -100
    elsewhere (padding, the prompt, unselected rows). Shapes [B, T], [B, T], [B], bool [B]."""
    last = last_token_index(attention_mask)
    first = last - response_len.to(last.device) + 1
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    keep = (
        (pos >= first[:, None])
        & (pos <= last[:, None])
        & attention_mask.bool()
        & rows.to(last.device)[:, None]
    )
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def preferred_rows(p_a):
    """Which rows of a preference batch (its A sequences, then its B sequences) hold the preferred response:
    A when p_a > 0.5, B when p_a < 0.5, neither on a tie."""
    return torch.cat([p_a > 0.5, p_a < 0.5])


@dataclass
class ValueHeadOutput:
    """values [B, T] (fp32): the value head at every position; with LM labels, lm_nll [B]: each row's mean
    next-token NLL over its labelled tokens (0 for a row without any), and lm_tokens [B]: how many it has."""

    values: torch.Tensor
    lm_nll: torch.Tensor | None = None
    lm_tokens: torch.Tensor | None = None


def pair_lm_nll(lm_nll):
    """Each pair's LM loss from the rows' mean token NLLs (its A rows, then its B rows): its preferred
    response's, 0 for a tie (no row of a pair but the preferred one has LM labels)."""
    a, b = torch.chunk(lm_nll, 2)
    return a + b


def pair_lm_loss(lm_nll, n_pairs: int):
    """The LM loss of a preference batch: the preferred responses' mean token NLLs summed, over the number of
    pairs (a tie has no preferred response and adds 0). A per-pair mean, like the preference loss (training
    sums pair_lm_nll over a step's pairs and divides by their number, as it does the preference loss)."""
    return lm_nll.sum() / max(n_pairs, 1)


class ValueHeadPM(nn.Module):
    """A causal LM (optionally peft/LoRA-wrapped) with a scalar value head on its trunk (see the module doc)."""

    accepts_loss_kwargs = False  # the Trainer must not pass its loss kwargs to forward

    def __init__(self, lm, v_head: nn.Linear):
        super().__init__()
        self.lm = lm
        self.v_head = fp32_head(v_head.to(device=next(lm.parameters()).device))  # fp32 on any trunk
        self.lm.config.num_labels = 1  # one output, the score (TRL's RewardTrainer checks it)

    # ---- what Trainer / RewardTrainer read from a model
    @property
    def config(self):
        return self.lm.config

    @property
    def dtype(self):
        return next(self.lm.parameters()).dtype

    def add_model_tags(self, tags) -> None:
        _base(self.lm).add_model_tags(tags)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        _base(self.lm).gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        _base(self.lm).gradient_checkpointing_disable()

    def merge_and_unload(self):
        """Merge LoRA adapters into the LM weights (in place); returns self."""
        if hasattr(self.lm, "merge_and_unload"):
            self.lm = self.lm.merge_and_unload()
        return self

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, use_cache=False, lm_labels=None, **kwargs
    ):
        """Values [B, T]; with `lm_labels` ([B, T], -100 where ignored) also each row's mean next-token NLL of
        its labelled tokens, the LM head applied only at the positions that predict them. Other keyword
        arguments go to the trunk (a packed forward's layout: cai.runtime.packing)."""
        base = _base(self.lm)
        trunk = getattr(base, base.base_model_prefix)
        h = trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        ).last_hidden_state
        out = ValueHeadOutput(values=self.v_head(h).squeeze(-1))
        if lm_labels is not None:
            target = lm_labels[:, 1:]
            keep = target != IGNORE_INDEX
            logits = base.get_output_embeddings()(h[:, :-1][keep]).float()
            nll = nn.functional.cross_entropy(logits, target[keep], reduction="none")
            out.lm_tokens = keep.sum(1)
            per_row = torch.zeros(h.shape[0], device=h.device, dtype=nll.dtype).index_add(
                0, keep.nonzero()[:, 0], nll
            )
            out.lm_nll = per_row / out.lm_tokens.clamp(min=1)
        return out

    # ---- the folder
    @classmethod
    def from_pretrained(
        cls, ref, settings: Settings = DEFAULT, *, seed: int = 0, device: str | None = None
    ) -> ValueHeadPM:
        """A causal LM through the one model loader, with the value head saved beside it, or a new one
        initialised from `seed` when the folder has none (a plain causal LM to train from)."""
        from safetensors.torch import load_file

        lm = load_model(str(ref), settings, kind="causal_lm", device=device)
        cfg = _base(lm).config.get_text_config()
        hidden = cfg.hidden_size
        r = resolve(str(ref))
        path = Path(r.path) / HEAD_WEIGHTS if r.kind == "dir" else None
        if path is not None and not path.is_file() and is_value_head_dir(path.parent):
            raise UserError(f"{path}: missing, though {MARKER} says the folder is a value-head PM")
        if path is None or not path.is_file():
            return cls(lm, new_value_head(hidden, seed, std=getattr(cfg, "initializer_range", 0.02) or 0.02))
        state = load_file(str(path))
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {"weight": (1, hidden), "bias": (1,)}:
            raise UserError(
                f"{path}: a value head with weight [1, {hidden}] and bias [1] is expected, found {shapes}"
            )
        head = nn.Linear(hidden, 1)
        head.load_state_dict(state)
        return cls(lm, head)

    def save_pretrained(self, save_directory, state_dict: dict | None = None, is_main_process=True, **kwargs):
        """Write the folder. `state_dict` (this module's keys, e.g. gathered by DeepSpeed/FSDP) replaces the
        weights in memory. Other keyword arguments are accepted for Trainer compatibility and ignored."""
        from safetensors.torch import save_file

        if not is_main_process:
            return
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        lm_kwargs, head_state = {}, self.v_head.state_dict()
        if state_dict is not None:
            lm_kwargs["state_dict"] = {k[3:]: v for k, v in state_dict.items() if k.startswith("lm.")}
            head_state = {k[7:]: v for k, v in state_dict.items() if k.startswith("v_head.")} or head_state
        self.lm.save_pretrained(str(out), **lm_kwargs)
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in head_state.items()}, str(out / HEAD_WEIGHTS)
        )
        marker = {
            "head": "value_head",
            "weights": HEAD_WEIGHTS,
            "hidden_size": self.v_head.in_features,
            "score": "v_head(last hidden state) at the last real token (cai.pm.sequence_scores)",
        }
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

    def load_checkpoint(self, directory) -> None:
        """Load the weights of a checkpoint written by save_pretrained into this module, in place (resume):
        the LoRA adapters for a LoRA-wrapped LM, else the whole LM; then the value head."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not is_value_head_dir(d):
            raise UserError(f"{d}: not a value-head preference-model checkpoint (no {MARKER})")
        if hasattr(self.lm, "peft_config"):
            from peft import set_peft_model_state_dict

            adapters = d / "adapter_model.safetensors"
            if not adapters.is_file():
                raise UserError(f"{d}: no adapter_model.safetensors to resume the LoRA adapters from")
            result = set_peft_model_state_dict(self.lm, load_file(str(adapters)))
            if result.unexpected_keys:
                raise UserError(f"{adapters}: unexpected adapter weights {result.unexpected_keys[:3]}")
        else:
            dtype = str(self.dtype).removeprefix("torch.")
            fresh = load_model(str(d), DEFAULT.with_(dtype=dtype), kind="causal_lm", device="cpu")
            self.lm.load_state_dict(fresh.state_dict(), strict=True)
            del fresh
        self.v_head.load_state_dict(load_file(str(d / HEAD_WEIGHTS)))
