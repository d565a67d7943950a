"""Soft-label DPO on the AI-labelled pairs, built on TRL's DPOTrainer, and the probe that gives it the same
metrics as the on-policy learners.

`SoftDPOTrainer` is TRL's DPOTrainer (its dataset tokenisation through the chat template, collator, reference
handling — a frozen SFT copy, or with LoRA the adapters switched off — training loop, checkpoints and engines)
with two new pieces: every pair carries its own target p, the AI label, and the loss is
−[p·log σ(βΔ) + (1−p)·log σ(−βΔ)] (cai.pm.loss.dpo_loss): DPO at p ∈ {0, 1}, conservative DPO at a uniform p;
and the sequence log-probs of the policy and the reference come from one packed forward each (each pair's prompt
once, no padding, the LM head at the completions only), TRL's padded forward being the fallback.
Each pair is oriented so that the preferred response (p ≥ 0.5) is TRL's 'chosen', so its reward metrics
(rewards/chosen, rewards/accuracies, rewards/margins) keep their meaning.

DPO samples nothing, so a `Probe` does it every `dpo.probe_every` steps (and before the first and after the
last): responses to a fixed set of training prompts, sampled as the `ppo` block samples (one engine, fixed
seeds), scored by `ppo.reward` (the PM's raw score when the run has one, as PPO logs it) with the KL to the
reference, logged as objective/score, objective/kl, objective/kl_k3 and objective/sqrt_kl — what the report and
`cai analyze kl-reward` read from every algorithm. Training rows add time/train and tokens_per_s (response
tokens of both sides of each pair, per second).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from cai.pm.loss import dpo_loss, soft_targets
from cai.rl import ppo_math as pm
from cai.rl.modules import PolicyModel
from cai.rl.rollout import encode_prompt, sample, seed_of
from cai.runtime.forward import selected_logprobs
from cai.runtime.generate import HFBackend
from cai.runtime.models import peft_config
from cai.runtime.packing import keeps_logits, labelled_logits
from cai.runtime.rundir import read_json, read_jsonl, write_json
from cai.runtime.training import step_batches, training_args, with_training_layers

REAL = "dpo_real"  # the batch key get_batch_samples adds: which pairs are real (not accelerate's repeats)
PROMPT = "prompt_index"  # each pair's prompt, an index into the sorted prompt keys of the rows (dpo_rows)
TOKENS_FILE = "cai_policy_tokens.json"  # in each checkpoint: the policy tokens trained on so far

PACKED = True  # False: every sequence log-prob from TRL's padded forward (bench/dpo_step.py compares the two)


def dpo_rows(pairs: list[dict], hard: bool = False) -> list[dict]:
    """TRL's conversational preference rows from feedback pairs: the preferred side (p_a ≥ 0.5) as 'chosen',
    'p', the target probability that it is the better one (≥ 0.5; 1 for hard labels unless tied), and PROMPT,
    its prompt (`prompt_id`, else `id`, as split_pairs groups them) as an index into the rows' sorted prompts."""
    keys = {k: i for i, k in enumerate(sorted({r.get("prompt_id", r["id"]) for r in pairs}, key=str))}
    out = []
    for r in pairs:
        p = float(soft_targets(torch.tensor(float(r["p_a"])), hard))
        a_first = p >= 0.5
        chosen, rejected = (
            (r["response_a"], r["response_b"]) if a_first else (r["response_b"], r["response_a"])
        )
        out.append(
            {
                "prompt": r["messages"],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "p": p if a_first else 1.0 - p,
                PROMPT: keys[r.get("prompt_id", r["id"])],
            }
        )
    return out


class TargetCollator(DataCollatorForPreference):
    """TRL's preference collator plus each pair's target `p` and its prompt (PROMPT)."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        out["p"] = torch.tensor([float(e["p"]) for e in examples], dtype=torch.float)
        out[PROMPT] = torch.tensor([int(e[PROMPT]) for e in examples], dtype=torch.long)
        return out


class SoftDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer whose loss takes each pair's target p (see the module docstring). A step's loss is the
    mean over its global batch's real pairs however it is split into micro-batches and processes (the pairs
    accelerate repeats to even out an epoch's last batches under DDP are left out), as the PM trainer's."""

    loss_is_scaled_for_ga = True  # divided by the step's real pair count, not by the accumulation count

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokens, self._tokens_total, self._t_last, self.probe_seconds = 0, 0, None, 0.0

    def _save_checkpoint(self, model, trial):
        """The checkpoint, with the policy tokens trained on so far (TOKENS_FILE) written into it first, so a
        resumed run's policy_tokens continues (every process takes part in the count)."""
        pending = int(
            self.accelerator.reduce(torch.tensor(self._tokens, device=self.accelerator.device), "sum")
        )
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / TOKENS_FILE, {"policy_tokens": self._tokens_total + pending})
        super()._save_checkpoint(model, trial)

    def resume_tokens(self, checkpoint: str | None) -> None:
        """Continue the policy_tokens count of the run that wrote `checkpoint` (0 without its file)."""
        if checkpoint:
            self._tokens_total = int(
                (read_json(Path(checkpoint) / TOKENS_FILE) or {}).get("policy_tokens", 0)
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in ("p", PROMPT) if c not in self._signature_columns]
        self._signature_columns = list(self._signature_columns) + extra

    def sequence_logps(self, model, inputs) -> torch.Tensor:
        """Summed log-probabilities of each row's completion tokens ([2B]: the chosen rows, then the rejected).

        Packed where it can be (`packs`): one forward over each pair's prompt once and its two completions, no
        padding, the LM head at the completions' positions only (cai.runtime.packing.labelled_logits). TRL's way
        scores every padded position in vocabulary tiles, with the prompt twice. The same values and gradients
        (tests/test_policy.py)."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        if self.packs(model, inputs):
            ids = inputs["input_ids"]
            n = ids.shape[0] // 2
            pairs = [[i, i + n] for i in range(n)]
            logits, targets, rows = labelled_logits(
                model, ids, inputs["attention_mask"], labels, groups=pairs
            )
            logp = selected_logprobs(logits, targets)
            return logp.new_zeros(2 * n).index_add(0, rows.to(logp.device), logp)
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        mask = inputs["completion_mask"][..., 1:]
        return (out.log_probs[:, -mask.size(1) :] * mask).sum(1)

    def packs(self, model, inputs) -> bool:
        """Whether `sequence_logps` runs packed: the collator's plain inputs (no padding-free position ids, no
        images), no length-desensitised weighting (`ld_alpha`), a model that takes a packed row."""
        return (
            PACKED
            and set(inputs) <= {"input_ids", "attention_mask", "completion_mask", "p", PROMPT}
            and self.ld_alpha is None
            and keeps_logits(model)
        )

    def compute_ref_log_probs(self, model, inputs):
        """The reference's (chosen, rejected) sequence log-probs, as TRL takes them (the frozen copy, or the
        policy with its adapters off), through `sequence_logps`."""
        if not self.packs(model, inputs):
            return super().compute_ref_log_probs(model, inputs)
        off = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            peft = self.accelerator.unwrap_model(self.model)
            off = use_adapter(peft, adapter_name="ref" if "ref" in peft.peft_config else None)
        no_ckpt = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
        with torch.no_grad(), no_ckpt, off, self.accelerator.autocast():
            return self.sequence_logps(model, inputs).chunk(2)

    def pair_logps(self, model, inputs):
        """((policy chosen, policy rejected), (reference chosen, reference rejected)) sequence log-probs."""
        batch = {k: v for k, v in inputs.items() if k not in ("p", PROMPT)}
        policy = self.sequence_logps(model, batch).chunk(2)
        if "ref_chosen_logps" in batch:
            return policy, (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
        # TRL's reference forward: the frozen copy, or the policy with its adapters off
        ref = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model, batch)
        return policy, ref

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return step_batches(self, epoch_iterator, num_batches, device, REAL, "p")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        real = inputs.pop(REAL, None)
        (pc, pr), (rc, rr) = self.pair_logps(model, inputs)
        target = inputs["p"].to(pc.device, pc.dtype)
        real = torch.ones_like(target, dtype=torch.bool) if real is None else real.to(pc.device)
        total = (dpo_loss(pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), target, self.beta) * real).sum()
        if num_items_in_batch is None:  # evaluation: this batch's mean
            loss = total / real.sum().clamp(min=1)
        else:  # the step's mean over its global batch; DDP averages the processes' gradients, hence the factor
            n = torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
            loss = total / n * self.accelerator.num_processes
        if mode == "train":
            self._tokens += int(inputs["completion_mask"][real.repeat(2).to(pc.device)].sum())
        with torch.no_grad():
            chosen, rejected = self.beta * (pc - rc), self.beta * (pr - rr)
            gather = self.accelerator.gather_for_metrics if mode == "eval" else self.accelerator.gather
            rows = gather(torch.stack([chosen, rejected, pc, pr, target, real.to(pc.dtype)], 1).float())
            c, r, lc, lr, t, _ = rows[rows[:, 5] > 0].unbind(1)
            m = self._metrics[mode]
            values = {"rewards/chosen": c, "rewards/rejected": r, "rewards/accuracies": (c > r).float()}
            values.update(
                {"rewards/margins": c - r, "logps/chosen": lc, "logps/rejected": lr, "target/mean": t}
            )
            for (
                k,
                v,
            ) in values.items():  # one value per real pair: TRL's log averages them, pooled over the step
                m[k].extend(v.tolist())
        return (loss, {}) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        if self._t_last is None:
            self._t_last = time.perf_counter()
        return super().training_step(*args, **kwargs)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs and self._t_last is not None:
            now = time.perf_counter()
            seconds = max(now - self._t_last - self.probe_seconds, 1e-9)
            # every process's tokens (each logs; the main process writes), as PPO counts them
            tokens = int(
                self.accelerator.reduce(torch.tensor(self._tokens, device=self.accelerator.device), "sum")
            )
            self._tokens_total += tokens
            logs.update(
                {
                    "time/train": seconds,
                    "tokens_per_s": tokens / seconds,
                    "policy_tokens": self._tokens_total,
                }
            )
            self._tokens, self._t_last, self.probe_seconds = 0, now, 0.0
        super().log(logs, start_time)


def build_trainer(cfg, seed: int, device: str, precision, model, ref, tok, train, held, ckpt_dir, callbacks):
    """A SoftDPOTrainer as a `dpo` block asks, on feedback pairs `train` (and `held` for evaluation): `ref` a
    frozen reference, or None with `dpo.lora` (TRL wraps the model; the reference is the adapters off)."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig

    args = training_args(
        TRLConfig,
        cfg,
        ckpt_dir,
        seed,
        device,
        precision,
        beta=cfg.beta,
        max_length=cfg.max_length,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        per_device_eval_batch_size=cfg.batch_size,
    )
    hard = cfg.labels == "hard"
    trainer = SoftDPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        data_collator=TargetCollator(pad_token_id=tok.pad_token_id, max_length=cfg.max_length),
        train_dataset=Dataset.from_list(dpo_rows(train, hard)),
        eval_dataset=Dataset.from_list(dpo_rows(held, hard)) if held else None,
        processing_class=tok,
        callbacks=callbacks,
        peft_config=peft_config(cfg.lora) if cfg.lora is not None else None,
    )
    return with_training_layers(trainer)  # cai.runtime.forward.training_layers


class Probe:
    """Samples the current policy on fixed prompts and measures what the on-policy learners log each update:
    score (`reward`, or None without one), KL to the reference (k1 and k3 per sequence), entropy, length."""

    def __init__(self, cfg, tokenizer, prompts: list[dict], reward, seed: int, autocast=None):
        self.cfg, self.tok, self.reward, self.seed, self.autocast = cfg, tokenizer, reward, seed, autocast
        self.msgs = [p["messages"] for p in prompts]
        self.ids = [encode_prompt(tokenizer, m, cfg.max_prompt_length) for m in self.msgs]

    @torch.no_grad()
    def __call__(self, lm, ref_lm=None) -> dict:
        """Metrics of `lm` against `ref_lm` (None: `lm` with its LoRA adapters switched off)."""
        cfg, t0 = self.cfg, time.perf_counter()
        device = next(lm.parameters()).device
        gen, texts, mask, finished, ids, attn = sample(
            HFBackend(lm, self.tok),
            self.ids,
            cfg,
            [seed_of(self.seed, "probe", j) for j in range(len(self.ids))],  # each row its own seed
            with_logits=False,
            autocast=self.autocast,
            device=device,
        )
        t_gen, t0 = time.perf_counter() - t0, time.perf_counter()
        R = mask.shape[1]
        with self.autocast or contextlib.nullcontext():  # both forwards as sampling's: KL 0 at the start
            out = PolicyModel(lm)(ids, attn, R, cfg.temperature, entropy=True)
            if ref_lm is None:
                with lm.disable_adapter():
                    ref = PolicyModel(lm)(ids, attn, R, cfg.temperature)["logprobs"]
            else:
                ref = PolicyModel(ref_lm)(ids, attn, R, cfg.temperature)["logprobs"]
        logp = out["logprobs"]
        k3 = float(pm.kl_per_token(logp, ref, mask, "k3").sum(1).mean())
        row = {
            "objective/kl": float(pm.kl_per_token(logp, ref, mask, "k1").sum(1).mean()),
            "objective/kl_k3": k3,
            "objective/sqrt_kl": math.sqrt(max(k3, 0.0)),
            "objective/entropy": float((out["entropy"] * mask).sum(1).mean()),
            "response/length": float(mask.sum(1).mean()),
            "response/eos_fraction": float(finished.float().mean()),
            "time/generate": t_gen,
        }
        if self.reward is not None:
            resp = ids[:, -R:]
            raw, _ = self.reward(
                self.msgs,
                texts,
                finished=finished.tolist(),
                tokenizer=self.tok,
                response_ids=[resp[j, : int(mask[j].sum())].tolist() for j in range(len(texts))],
            )
            row["objective/score"] = float(raw.float().mean())
        row["time/score"] = time.perf_counter() - t0
        return row


def probe_callback(probe: Probe, metrics, every: int, ref_lm=None):
    """A TrainerCallback that runs the probe before the first step, every `every` steps and after the last, on
    every process (the same prompts and seeds: sharded weights (ZeRO-3, FSDP) need every rank in each forward,
    and under DDP the others would wait for it anyway); the main process logs its row at the step it ran. A
    resumed run skips the steps the log already has a probe row for; `finish` runs the last probe where a kill
    after the last checkpoint left training nothing to do (so no on_train_end)."""
    from transformers import TrainerCallback

    class Probing(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.done = {r.get("step") for r in read_jsonl(metrics.path) if "objective/kl" in r}

        def _run(self, state, model):
            if state.global_step in self.done:
                return
            t0 = time.perf_counter()
            row = probe(model, ref_lm)
            if state.is_world_process_zero:
                metrics.log(row, step=state.global_step)
            self.done.add(state.global_step)
            if self.trainer is not None and self.trainer._t_last is not None:  # inside a timed stretch
                self.trainer.probe_seconds += time.perf_counter() - t0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self._run(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                self._run(state, model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._run(state, model)

        def finish(self, trainer):
            self._run(trainer.state, trainer.model)

    return Probing()
