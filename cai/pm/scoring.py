"""Preference-model scoring: how a conversation is rendered and scored, and `RewardScorer`.

The score of a conversation is the scalar head's output at its last real token (by attention mask, so left
and right padding give the same score, and a final token that equals the pad id is still read). The head is a
sequence classifier's `score`, or the `v_head` of a causal LM with a value head (cai.pm.value_head). Training
(cai.pm.trainer), PPO and evaluation all go through `sequence_scores`, so they agree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cai.errors import UserError
from cai.runtime.forward import last_token_index, pad, position_ids, product_linears
from cai.runtime.models import load_model, load_tokenizer
from cai.runtime.packing import chunk_groups, pack, varlen_attention, varlen_supported
from cai.runtime.settings import DEFAULT, Settings, fp32_head

NORM_FILE = "score_norm.json"
PACKED = True  # packed, prefix-shared scoring where the model allows (cai.runtime.packing)


def conversation_ids(tokenizer, conversation: list[dict], max_length: int | None = None) -> list[int]:
    """Token ids of a full conversation (ending with the assistant response) through the chat template.

    Over `max_length`, tokens are dropped from the left: the score is read at the end, so the response stays."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


def scalar_head(model):
    """The scalar head module (score/classifier of a sequence classifier, v_head of a cai.pm.value_head PM), under
    peft or DDP wrappers or not."""
    inner = model
    for _ in range(4):
        for name in ("score", "classifier", "v_head"):
            mod = getattr(inner, name, None)
            if mod is not None and hasattr(mod, "register_forward_hook"):
                return mod
        nxt = (
            getattr(inner, "module", None)
            or getattr(inner, "base_model", None)
            or getattr(inner, "model", None)
        )
        if nxt is None or nxt is inner:
            break
        inner = nxt
    return None


def sequence_scores(model, input_ids, attention_mask, return_output: bool = False, **forward_kwargs):
    """Scalar score of each row, read at its last real token (attention mask), shape [B]; keeps gradients.

    `forward_kwargs` go to the model's forward (a value-head PM takes `lm_labels`); with `return_output`, the
    forward's output comes too: (scores, output)."""
    import torch

    head = scalar_head(model)
    captured = {}
    hook = (
        head.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
        if head is not None
        else None
    )
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
            **forward_kwargs,
        )
    finally:
        if hook is not None:
            hook.remove()
    per_token = captured.get("out")
    if per_token is None or per_token.dim() != 3:  # no hookable head: trust the model's own pooling
        scores = out.logits.squeeze(-1)
    else:
        idx = last_token_index(attention_mask)
        scores = per_token[torch.arange(per_token.shape[0], device=per_token.device), idx, 0].float()
    return (scores, out) if return_output else scores


def packed_scores(model, packed):
    """Scores of packed sequences (cai.runtime.packing.pack: a pair's or an item's replies share their
    conversation, computed once), read at each sequence's last token; keeps gradients. The model's own forward
    runs (so a DDP wrapper sees the call), with the packed layout passed to its trunk; the scalar head's output
    is read where `sequence_scores` reads it for a padded batch, so the scores are the same."""
    import torch

    head = scalar_head(model)
    captured = {}
    hook = head.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    try:
        with varlen_attention(model):
            model(
                input_ids=packed.ids,
                position_ids=packed.positions,
                use_cache=False,
                cai_packing=packed.packing,
            )
    finally:
        hook.remove()
    last = torch.tensor([int(w[-1]) for w in packed.where], device=packed.ids.device)
    return captured["out"][0, last, 0].float()


def can_pack(model) -> bool:
    """Whether a PM's scores may come from a packed forward: a plain decoder trunk and a hookable head (and
    `PACKED`, the switch the benchmark turns off to time the padded forward)."""
    return PACKED and scalar_head(model) is not None and varlen_supported(_unwrapped(model))


def pair_scores(model, input_ids, attention_mask):
    """Scores [2B] of a stacked pair batch (rows 0..B-1 the A sides, B..2B-1 the B sides; either padding), in a
    packed forward where each pair's shared conversation is computed once; keeps gradients."""
    import torch

    B = input_ids.shape[0] // 2
    seqs = [row[m.bool()] for row, m in zip(input_ids, attention_mask)]
    scores = packed_scores(model, pack([[seqs[i], seqs[B + i]] for i in range(B)], input_ids.device))
    return torch.cat([scores[0::2], scores[1::2]])


def _unwrapped(model):
    """Under a DDP (or similar) wrapper, the module it wraps; a ValueHeadPM, its LM."""
    model = getattr(model, "module", model)
    return getattr(model, "lm", model)


def read_norm(model_dir: str | Path) -> dict:
    p = Path(model_dir) / NORM_FILE
    if not p.is_file():
        return {"mean": 0.0, "std": 1.0}
    try:
        data = json.loads(p.read_text())
        return {"mean": float(data["mean"]), "std": float(data["std"]) or 1.0}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{p}: a JSON object with numbers 'mean' and 'std' expected ({exc})") from None


def load_saved_head(model, model_dir: Path) -> None:
    """Put the classifier's scalar head back as it was saved, in fp32 (cai.runtime.settings): loading the model
    in the recipe's dtype rounded it to bf16 with the trunk. A folder whose weights hold no head is refused: the
    loader would have scored with a randomly initialised one."""
    import contextlib

    from safetensors import safe_open

    head = fp32_head(scalar_head(model))
    name = next(n for n, m in model.named_modules() if m is head)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    state = {}
    for f in files or ["model.safetensors"]:
        with safe_open(str(model_dir / f), framework="pt") as st:
            state.update(
                {k[len(name) + 1 :]: st.get_tensor(k) for k in st.keys() if k.startswith(name + ".")}
            )
    if set(state) != set(head.state_dict()):
        raise UserError(
            f"preference model '{model_dir}': its weights hold no trained score head ('{name}'); a "
            "preference_model/model folder is expected"
        )
    params, whole = list(head.parameters()), contextlib.nullcontext()
    if any(hasattr(q, "ds_id") for q in params):  # loaded partitioned (ZeRO-3): whole while it is set
        import deepspeed

        whole = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with whole:
        head.load_state_dict({k: v.float() for k, v in state.items()})


def check_finite(scores: list[float], model, suite: str) -> list[float]:
    """The scores, or a one-line UserError naming the PM, the suite and how many scores are NaN or infinite (a
    diverged or broken head), which no accuracy, calibration or correlation can be computed from."""
    bad = sum(not math.isfinite(x) for x in scores)
    if bad:
        raise UserError(
            f"preference model '{model}': {bad} of {len(scores)} scores on suite '{suite}' are not finite "
            "(NaN or inf): its weights or head are broken; retrain it or check its dtype"
        )
    return scores


def pm_model_dir(model_dir) -> Path:
    """The model folder of a preference model given as it or as its preference_model stage folder; a folder
    without config.json is a UserError (checked before any model loads)."""
    model_dir = Path(model_dir)
    if (model_dir / "model" / "config.json").is_file():  # a preference_model stage folder
        model_dir = model_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"preference model '{model_dir}': no config.json (expected a preference_model/model folder)"
        )
    return model_dir


class RewardScorer:
    """A trained preference model loaded for scoring (PPO rewards, evaluation): a sequence classifier
    (num_labels=1) or, when the folder has the marker of cai.pm.value_head, a causal LM with a value head."""

    def __init__(self, model_dir, settings: Settings = DEFAULT, device: str | None = None):
        from cai.pm.value_head import ValueHeadPM, is_value_head_dir

        self.model_dir = model_dir = pm_model_dir(model_dir)
        self.tokenizer = load_tokenizer(str(model_dir), settings)
        self.head = "value_head" if is_value_head_dir(model_dir) else "classifier"
        if self.head == "value_head":
            self.model = ValueHeadPM.from_pretrained(model_dir, settings, device=device)
        else:
            self.model = load_model(str(model_dir), settings, kind="seq_cls", device=device)
            load_saved_head(self.model, model_dir)
        self.model.eval()
        norm = read_norm(model_dir)
        self.mean, self.std = norm["mean"], norm["std"]
        self.device = next(self.model.parameters()).device
        self.max_length = None

    @classmethod
    def wrap(cls, model, tokenizer, name: str, mean: float = 0.0, std: float = 1.0) -> RewardScorer:
        """A scorer around a PM already in memory (an untrained baseline, a model just trained)."""
        self = cls.__new__(cls)
        self.model_dir, self.model, self.tokenizer = name, model, tokenizer
        self.head = "value_head" if hasattr(model, "v_head") else "classifier"
        self.mean, self.std, self.max_length = mean, std, None
        self.device = next(model.parameters()).device
        return self

    def score_ids(self, input_ids, attention_mask):
        """Raw fp32 scores [B] for already tokenised rows (same tokenizer; left or right padding), on the
        device of `input_ids`; no gradients."""
        import torch

        with torch.no_grad(), product_linears(self.model):
            scores = sequence_scores(self.model, input_ids.to(self.device), attention_mask.to(self.device))
        return scores.to(input_ids.device)

    def score(
        self,
        conversations: list[list[dict]],
        batch_size=8,
        max_length: int | None = None,
        desc: str | None = None,
        groups: list[list[int]] | None = None,
    ):
        """Raw scores of conversations that end with the assistant response, shape [N] (CPU). `groups` (lists of
        indices) names conversations that share their beginning (an item's candidate replies): each group's
        shared part is computed once, in a packed forward of about `batch_size` conversations. With `desc`, a
        progress bar shows sequences per second."""
        import torch
        from tqdm.auto import tqdm

        seqs = [conversation_ids(self.tokenizer, c, max_length or self.max_length) for c in conversations]
        out = torch.zeros(len(seqs))
        bar = tqdm(total=len(seqs), desc=desc, unit="seq", disable=desc is None, dynamic_ncols=True)
        if can_pack(
            self.model
        ):  # conversations grouped as given (an item's replies), each group's start once
            groups = groups or [[i] for i in range(len(seqs))]
            # longest first, as the padded path: a chunk's segments are alike in length, little is padded
            groups = sorted(groups, key=lambda g: -max(len(seqs[i]) for i in g))
            for chunk in chunk_groups(groups, batch_size):
                packed = pack([[seqs[i] for i in g] for g in chunk], self.device)
                with torch.no_grad(), product_linears(self.model):
                    scores = packed_scores(self.model, packed).cpu()
                out[[i for g in chunk for i in g]] = scores
                bar.update(len(scores))
        else:
            order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                ids, mask = pad([seqs[i] for i in chunk], self.tokenizer.pad_token_id)
                out[chunk] = self.score_ids(ids, mask)
                bar.update(len(chunk))
        bar.close()
        return out

    def __repr__(self) -> str:
        return f"RewardScorer({self.model_dir}, head={self.head})"

    def normalize(self, raw):
        """(raw − mean) / std with the statistics stored beside the model."""
        return (raw - self.mean) / self.std
