"""The preference model's trainer: TRL's RewardTrainer with cai's loss, used by the preference_model stage for
both heads.

`PreferenceTrainer` replaces RewardTrainer.compute_loss with the soft-label / Bradley–Terry loss on p_a plus
optional reward centring (cai.pm.loss), read at each sequence's last real token (cai.pm.scoring). For a
value-head PM (cai.pm.value_head.ValueHeadPM) it adds `lm_coef` × the LM loss on the preferred responses, and saves and
resumes checkpoints in that model's own folder format (the LM or its LoRA adapters, plus the value head).
"""

from __future__ import annotations

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from cai.pm.loss import pair_accuracy, preference_loss
from cai.pm.scoring import can_pack, pair_scores, sequence_scores
from cai.pm.value_head import ValueHeadPM, pair_lm_loss, preferred_rows, response_lm_labels


class SoftLabelCollator(DataCollatorForPreference):
    def torch_call(self, examples):
        out = super().torch_call([{k: e[k] for k in ("chosen_ids", "rejected_ids")} for e in examples])
        out["p_a"] = torch.tensor([float(e["p_a"]) for e in examples], dtype=torch.float)
        # value-head PM: the response lengths, rows ordered as stacked above (the A sequences, then the B ones)
        if "chosen_response_len" in examples[0]:
            lens = [e[f"{k}_response_len"] for k in ("chosen", "rejected") for e in examples]
            out["response_len"] = torch.tensor(lens, dtype=torch.long)
        return out


class PreferenceTrainer(RewardTrainer):
    """RewardTrainer with cai's loss; also trains a cai.pm_value_head.ValueHeadPM (its own checkpoint
    format: the LM or its LoRA adapters, plus value_head.safetensors) with an optional LM loss."""

    def __init__(self, *args, loss: str = "soft", center_coef: float = 0.0, lm_coef: float = 0.0, **kwargs):
        self.pm_loss, self.pm_center, self.pm_lm_coef = loss, center_coef, lm_coef
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "chosen_ids",
                "rejected_ids",
                "p_a",
                "chosen_response_len",
                "rejected_response_len",
            ]

    def _value_head_pm(self, model=None):
        inner = self.accelerator.unwrap_model(model if model is not None else self.model)
        return inner if isinstance(inner, ValueHeadPM) else None

    def _save(self, output_dir=None, state_dict=None):
        pm = self._value_head_pm()
        if pm is None:
            return super()._save(output_dir, state_dict)
        if self.args.should_save:  # the LM (or its adapters) + value head + marker, all safetensors
            output_dir = output_dir or self.args.output_dir
            pm.save_pretrained(output_dir, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        pm = self._value_head_pm(model)
        if pm is None or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        pm.load_checkpoint(resume_from_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        p_a = inputs["p_a"]
        kwargs = {}
        if self.pm_lm_coef > 0:  # value-head PM: LM loss on the preferred responses
            rows = preferred_rows(p_a.to(inputs["input_ids"].device))
            kwargs["lm_labels"] = response_lm_labels(
                inputs["input_ids"], inputs["attention_mask"], inputs["response_len"], rows
            )
        if not kwargs and can_pack(model):  # each pair's conversation computed once (same scores and grads)
            scores = pair_scores(model, inputs["input_ids"], inputs["attention_mask"])
        else:
            scores, out = sequence_scores(
                model, inputs["input_ids"], inputs["attention_mask"], return_output=True, **kwargs
            )
        r_a, r_b = torch.chunk(scores, 2)
        p_a = p_a.to(r_a.device)
        loss = preference_loss(
            r_a, r_b, p_a, hard=self.pm_loss == "bradley_terry", center_coef=self.pm_center
        )
        if kwargs:
            lm_loss = pair_lm_loss(out.lm_nll, r_a.shape[0])
            loss = loss + self.pm_lm_coef * lm_loss
        with torch.no_grad():
            m = self._metrics[mode]
            if kwargs:  # the mean over every process's pairs (equal numbers of pairs per process)
                m["lm_loss"].append(float(self.accelerator.gather_for_metrics(lm_loss.detach()[None]).mean()))
            # metrics over the global batch: every process's pairs (equal shapes: accelerate evens batches)
            r_a, r_b, p_a = self.accelerator.gather_for_metrics(
                torch.stack([r_a.detach().float(), r_b.detach().float(), p_a.float()], 1)
            ).unbind(1)
            both = torch.cat([r_a, r_b])
            m["accuracy"].append(pair_accuracy(r_a, r_b, p_a))
            m["margin"].append(float(((r_a - r_b) * torch.sign(p_a - 0.5)).mean()))
            m["mean_reward"].append(float(both.mean()))
            if both.numel() > 1:
                m["reward_std"].append(float(both.std()))
        return (loss, {"scores": scores}) if return_outputs else loss
