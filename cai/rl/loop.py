"""What every on-policy trainer of a language model shares, whatever its algorithm: the accelerator and precision
policy, the prompts, sampling with the policy's current weights, scoring the samples, stopping every process
together on a non-finite value, the first-step check, the update loop with its metrics and progress, and
checkpoints (cai.rl.checkpoint). A subclass (cai.rl.trainer.PPOTrainer) adds its models, `rollout(update)` and
`train_on(batch, update)`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cai.errors import UserError
from cai.rl import checkpoint as ckpt
from cai.rl import engine
from cai.rl import ppo_math as pm
from cai.rl.colocate import VLLMRollouts
from cai.rl.rollout import encode_prompt, row_seeds, sample
from cai.runtime import distributed as dist
from cai.runtime import vllm_engine
from cai.runtime.forward import training_layers
from cai.runtime.generate import HFBackend
from cai.runtime.rundir import SAMPLES, append_jsonl, read_jsonl, rewrite_jsonl
from cai.runtime.settings import Precision, keep_freed_memory


class OnPolicyTrainer:
    """The shared part of an on-policy trainer; `cfg` is a block with the rollout settings of cai.config.policy
    (PPOConfig), `reward(prompts, responses, **kw) -> (raw [B], reward [B])` (cai.rl.rewards)."""

    name = "ppo"

    def __init__(
        self,
        cfg,
        *,
        tokenizer,
        reward,
        prompts: list[dict],
        out_dir,
        accelerator=None,
        seed: int = 0,
        metrics=None,
        show_progress: bool = True,
        precision: Precision | None = None,
        run_token: str | None = None,
    ):
        from accelerate import Accelerator

        self.cfg, self.tok, self.reward, self.seed = cfg, tokenizer, reward, seed
        self.out_dir = Path(out_dir)
        self.precision = precision or Precision(compute="float32")
        if accelerator is None:
            dist.skip_deepspeed_shm_kernel()  # as `cai run` does, for a trainer driven from Python
            accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=self.precision.mixed)
        self.acc = accelerator
        if self.acc.device.type == "cpu":  # the update's large tensors reuse freed memory (no page faults)
            keep_freed_memory()
        self.show_progress, self.metrics, self.run_token = show_progress, metrics, run_token
        # old log-probs: from the sampling logits where that is exact (fp32), else from a training-like forward;
        # always from the forward when vLLM samples (cai.rl.colocate)
        lfg, self.vllm = cfg.logprobs_from_generation, None
        self.use_vllm = getattr(cfg, "rollout_backend", "hf") == "vllm"
        self.logprobs_from_generation = (
            self.precision.compute == "float32" and not self.use_vllm if lfg is None else lfg
        )
        tol = cfg.first_step_tolerance
        self.first_step_tolerance = tol or (1e-6 if self.precision.compute == "float32" else 1e-3)
        if self.use_vllm:
            vllm_engine.require(f"{self.name}.rollout_backend 'vllm'")
            if engine.is_fsdp(self.acc):
                raise UserError(
                    f"{self.name}.rollout_backend 'vllm' does not run under FSDP; use DDP or DeepSpeed"
                )
        self.prompt_ids = [self._encode(row["messages"]) for row in prompts]
        self.prompt_msgs = [row["messages"] for row in prompts]
        self.prompt_keys = [str(row.get("id", i)) for i, row in enumerate(prompts)]
        if not self.prompt_ids:
            raise UserError(f"{self.name}: no training prompts")
        self.step = 0
        self.ckpt_dir = self.out_dir / "checkpoints"

    # ---- helpers ----
    def _encode(self, messages) -> list[int]:
        return encode_prompt(self.tok, messages, self.cfg.max_prompt_length)

    def _mean(self, x) -> float:
        """Mean of a scalar over processes."""
        t = torch.as_tensor(float(x), dtype=torch.float64, device=self.acc.device)
        return float(dist.all_reduce_mean(t))

    @staticmethod
    def _token_stats(logs: dict, mask, **stats) -> None:
        """Append each micro-batch statistic (a token mean over `mask`) as (sum, token count), so that
        `_pooled` gives the token mean over every micro-batch and process, not a mean of their means."""
        n = float(mask.sum())
        for key, value in stats.items():
            logs.setdefault(key, []).append((float(value) * n, n))

    def _pooled(self, values: list) -> float:
        """Over processes: the token mean of `_token_stats` pairs, or the mean of a list of means."""
        if values and isinstance(values[0], tuple):
            s, n = (sum(part) for part in zip(*values))
            t = torch.tensor([s, n], dtype=torch.float64, device=self.acc.device)
            s, n = dist.all_reduce_sum(t).tolist()
            return s / n if n else 0.0
        return self._mean(sum(values) / len(values))

    def _check_finite(self, value, what: str, update: int) -> None:
        """Stop every process together when `value` is not finite on any of them: each saves its part of a
        checkpoint of the state that diverged, and all raise the same one-line error (a process that stopped
        alone would leave the others waiting in their next collective)."""
        bad = torch.tensor(0.0 if bool(torch.isfinite(value).all()) else 1.0, device=self.acc.device)
        if float(dist.all_reduce_sum(bad)) == 0:
            return
        path = self.save(update, name=f"diverged-step-{update:06d}")
        raise UserError(
            f"{self.name}: non-finite {what} at update {update + 1} on {int(float(dist.all_reduce_sum(bad)))} of "
            f"{dist.world_size()} process(es); every process stopped (state saved to {path}). "
            "Lower ppo.learning_rate, set ppo.reward_clip, or check the reward."
        )

    def _generate(self, idx: list[int], update: int):
        """Sample responses to the prompts `idx` with the policy's current weights (cai.rl.rollout.sample)."""
        with engine.unwrapped_for_generation(self.model, self.acc) as unwrapped:
            out = sample(
                self._backend(unwrapped.policy.lm),
                [self.prompt_ids[i] for i in idx],
                self.cfg,
                row_seeds(self.seed, update, len(idx)),
                with_logits=self.logprobs_from_generation,
                autocast=self.precision.autocast(self.acc.device),
                device=self.acc.device,
            )
        if self.vllm is not None:
            self.vllm.rest()
        return out

    def _backend(self, lm):
        """HF generate on the policy itself, or the colocated vLLM engine given its current weights."""
        if not self.use_vllm:
            return HFBackend(lm, self.tok)
        if self.vllm is None:
            self.vllm = VLLMRollouts(lm, self.tok, self.cfg, self.precision.compute, self.seed)
        return self.vllm.backend_for(lm)

    def _score(self, idx: list[int], texts, finished, resp, mask, update: int):
        """(raw score, the reward PPO uses: the score normalised, with the missing-EOS penalty and clipping)."""
        cfg, dev = self.cfg, self.acc.device
        raw, score = self.reward(
            [self.prompt_msgs[i] for i in idx],
            texts,
            finished=finished.tolist(),
            tokenizer=self.tok,
            response_ids=[resp[j, : int(mask[j].sum())].tolist() for j in range(len(idx))],
        )
        raw, score = raw.to(dev).float(), score.to(dev).float()
        self._check_finite(torch.stack([raw, score]), "reward", update)
        self._log_samples(update, idx, texts, raw)
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * (~finished.to(dev)).float()
        if cfg.reward_clip is not None:
            score = score.clamp(-cfg.reward_clip, cfg.reward_clip)
        return raw, score

    def _log_samples(self, update: int, idx: list[int], texts: list[str], raw) -> None:
        """samples.jsonl: every sampled response of the update, one row each {i (its place in the update's
        batch), update (as metrics.jsonl counts it), prompt_id, response, score (raw)}, from every process: what
        the report checks for length and scores with the gold judge, and what a reader looks at to see what was
        learned. Rows of an update are kept only once, so a resumed update rewrites its own."""
        rows = [
            {"update": update + 1, "prompt_id": self.prompt_keys[i], "response": t, "score": float(s)}
            for i, t, s in zip(idx, texts, raw.tolist())
        ]
        gathered = [
            {"i": i, **r} for i, r in enumerate(r for part in dist.gather_objects(rows) for r in part)
        ]
        if self.acc.is_main_process:
            path = self.out_dir / SAMPLES
            kept = [r for r in read_jsonl(path) if r.get("update", 0) <= update]
            if len(kept) != len(read_jsonl(path)):  # a resumed update: drop what the killed run logged of it
                rewrite_jsonl(path, kept)
            append_jsonl(path, gathered)

    def _first_step(self, st: dict, update: int) -> dict:
        """Before an update's first step the policy is the one that sampled: ratio 1, approx-KL 0, up to the
        dtype's rounding. Logged every update; a warning names the likely cause when it is exceeded."""
        kl, dev = self._mean(st["approx_kl"]), float(dist.all_reduce_max(st["ratio_dev"].detach().float()))
        warning = pm.first_step_warning(kl, dev, self.first_step_tolerance, self.logprobs_from_generation)
        if warning and self.acc.is_main_process:
            print(
                f"[{self.name}] warning: update {update + 1} ({self.precision.compute}): {warning}",
                flush=True,
            )
        return {"policy/first_step_approx_kl": kl, "policy/first_step_ratio_dev": dev}

    # ---- the loop ----
    def train(self, until: int | None = None) -> list[dict]:
        """Run updates from the current step up to `until` (default: cfg.updates); returns their metrics."""
        from tqdm.auto import tqdm

        end = min(until or self.cfg.updates, self.cfg.updates)
        history = []
        bar = tqdm(
            total=self.cfg.updates,
            initial=self.step,
            desc="ppo",
            unit="update",
            dynamic_ncols=True,
            disable=not (self.show_progress and self.acc.is_main_process),
        )
        while self.step < end:
            u = self.step
            t0 = time.perf_counter()
            batch = self.rollout(u)
            t1 = time.perf_counter()
            # LoRA layers and norms as one node each, the products on oneDNN on AMD's CPUs
            with training_layers(self.model):
                train_stats = self.train_on(batch, u)
            row = {**{k: v for k, v in batch.stats.items() if not k.startswith("_")}, **train_stats}
            row["policy/approx_kl"] = row.get("policy/approx_kl", 0.0)
            row["policy/clipfrac"] = row.get("policy/clipfrac", 0.0)
            row["loss/policy"] = row.get("loss/policy", 0.0)
            row["time/train"] = time.perf_counter() - t1
            row["time/update"] = time.perf_counter() - t0
            row["tokens_per_s"] = batch.stats["_tokens"] / row["time/update"]
            self.step = u + 1
            if self.metrics is not None and self.acc.is_main_process:
                self.metrics.log(row, step=self.step)
            history.append(row)
            bar.update(1)
            bar.set_postfix(
                score=f"{row['objective/score']:.3f}",
                kl=f"{row['objective/kl']:.3f}",
                tok_s=f"{row['tokens_per_s']:.1f}",
            )
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.updates:
                self.save(self.step)
        bar.close()
        return history

    # ---- checkpoints ----
    def save(self, step: int, name: str | None = None) -> Path:
        """Checkpoint everything an exact resume needs (cai.rl.checkpoint)."""
        return ckpt.save_trainer(self, step, name)

    def save_policy(self, path, fresh_policy=None) -> Path:
        """The trained policy as a Hugging Face folder (cai.rl.checkpoint.save_policy)."""
        return ckpt.save_policy(self, path, fresh_policy)
