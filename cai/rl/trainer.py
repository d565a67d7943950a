"""The PPO loop (Ziegler et al. 2019; Stiennon et al. 2020), written to be read top to bottom.

One update:
1. Rollout: the policy samples responses to a batch of prompts with the one generation engine
   (cai.generate.HFBackend); its logits give the old log-probabilities (temperature applied).
2. Scoring: reference log-probs (frozen SFT model, or the policy with LoRA adapters disabled), critic values
   and the sequence score (preference model or reward function) — forwards read only response positions.
3. Rewards −β·KL per token plus the score on the last token; GAE; advantage whitening.
4. `ppo_epochs` passes over shuffled minibatches (gradient accumulation inside), clipped policy and value
   losses, gradient clipping, one LR-schedule step per update.

Under `accelerate launch` each process rolls out its own share of the prompts with its own sampling seed;
whitening statistics, the KL fed to the controller and all logged metrics are all-reduced. Policy and critic
are one module with one optimizer (a parameter group each), so DDP and DeepSpeed ZeRO take them as they
are; what differs per engine is in cai.rl.engine.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

from cai.errors import UserError
from cai.rl import checkpoint as ckpt
from cai.rl import engine
from cai.rl import ppo_math as pm
from cai.rl.modules import ActorCritic, PolicyModel, disable_dropout
from cai.rl.packing import check_varlen
from cai.rl.rollout import Rollout, cut_at_stop, global_stats, prompt_indices, seed_of, write_samples
from cai.runtime import distributed as dist
from cai.runtime.generate import HFBackend, Sampling


class PPOTrainer:
    """PPO on a causal LM. `policy` is a PolicyModel; `critic` a ValueModel (or None with a value head);
    `ref_model` a frozen causal LM (or None with a LoRA policy: adapters disabled); `reward(prompts, responses,
    **kw) -> (raw [B], reward [B])` (cai.rl.rewards); `prompts` rows with chat 'messages'."""

    def __init__(
        self,
        cfg,
        *,
        policy: PolicyModel,
        tokenizer,
        reward,
        prompts: list[dict],
        out_dir,
        critic=None,
        ref_model=None,
        accelerator=None,
        seed: int = 0,
        metrics=None,
        show_progress: bool = True,
    ):
        from accelerate import Accelerator

        self.cfg, self.tok, self.reward, self.seed = cfg, tokenizer, reward, seed
        self.out_dir = Path(out_dir)
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.show_progress, self.metrics = show_progress, metrics
        if cfg.rollout_batch_size < cfg.num_minibatches * cfg.grad_accum:
            raise UserError("ppo.rollout_batch_size: must be at least num_minibatches × grad_accum")
        if ref_model is None and not hasattr(policy.lm, "disable_adapter"):
            raise ValueError(
                "without a reference model the policy must be LoRA-wrapped (reference = adapters off)"
            )
        for m in (policy, critic, ref_model):
            if m is not None:
                disable_dropout(m)
        self.prompt_ids = [self._encode(row["messages"]) for row in prompts]
        self.prompt_msgs = [row["messages"] for row in prompts]
        self.prompt_keys = [str(row.get("id", i)) for i, row in enumerate(prompts)]
        if not self.prompt_ids:
            raise UserError("ppo: no training prompts")

        # one module and one optimizer (a parameter group each for policy and critic): every engine takes them
        joint = ActorCritic(policy, critic)
        critic_lr = cfg.critic_learning_rate or cfg.learning_rate
        groups = joint.param_groups(cfg.learning_rate, critic_lr)
        opt = engine.make_optimizer(groups)
        lam = lambda u: pm.lr_factor(u, cfg.updates, cfg.warmup_updates, cfg.lr_decay)  # noqa: E731
        # stepped once per update by us (not prepared: accelerate would step it once per process)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        self.policy, self.critic = joint.policy, joint.critic  # the unwrapped parts, for reading
        ref = PolicyModel(ref_model.requires_grad_(False).eval()) if ref_model is not None else None
        # plain forwards of the parts: before FSDP shards them; under DeepSpeed after (ZeRO-3 hooks gather)
        deepspeed = engine.is_deepspeed(self.acc)
        if not deepspeed:
            self._check_varlen(ref)
        engine.fill_deepspeed_config(self.acc, cfg)
        self.model, self.opt = self.acc.prepare(joint, opt)
        self.stepper = engine.Stepper(self.acc, self.model, self.opt, cfg.max_grad_norm)
        if self.stepper.fsdp:
            engine.fsdp_root_forward(self.model, self.prompt_ids[0][-8:], self.acc.device)
        # frozen models after the engine: its DeepSpeed config is complete only then
        self.ref = engine.prepare_frozen(ref, self.acc) if ref is not None else None
        if hasattr(self.reward, "prepare"):
            self.reward.prepare(self.acc)
        if deepspeed:
            self._check_varlen(ref)
        self.kl_ctl = pm.make_kl_controller(cfg)
        self._value_graph, self.reuse_values = None, True
        self.step = 0
        self.ckpt_dir = self.out_dir / "checkpoints"
        ckpt.resume(self)

    # ---- helpers ----
    def _encode(self, messages) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids[-self.cfg.max_prompt_length :]

    def _mean(self, x) -> float:
        """Mean of a scalar over processes."""
        t = torch.as_tensor(float(x), dtype=torch.float64, device=self.acc.device)
        return float(dist.all_reduce_mean(t))

    def _check_varlen(self, ref) -> None:
        """Packed (padding-free) forwards must give what padded ones give on this model; else use padded ones."""

        models = [self.policy, self.critic, ref]
        rows = [self.prompt_ids[0][-12:], self.prompt_ids[-1][-7:] + [self.tok.eos_token_id]]
        if not check_varlen(
            [m for m in models if m is not None], rows, self.tok.pad_token_id, self.acc.device
        ):
            print(
                "[ppo] packed forwards differ from padded ones on this model: using padded batches",
                flush=True,
            )

    def _fail(self, what: str, update: int):
        path = self.save(update, name=f"diverged-step-{update:06d}")
        raise UserError(
            f"ppo: non-finite {what} at update {update + 1}; stopped (state saved to {path}). "
            "Lower ppo.learning_rate, set ppo.reward_clip, or check the reward."
        )

    # ---- 1-3. rollout, scoring, advantages ----
    def _generate(self, idx: list[int], update: int):
        """Sample responses to the prompts `idx` with the policy's current weights; (generation, texts, response
        mask [B, R] (float), finished [B], input ids and attention mask of prompt + response)."""
        cfg, dev = self.cfg, self.acc.device
        sampling = Sampling(
            max_new_tokens=cfg.response_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop_strings=(cfg.stop_string,) if cfg.stop_string else (),
        )
        with engine.unwrapped_for_generation(self.model, self.acc) as unwrapped:
            gen = HFBackend(unwrapped.policy.lm, self.tok).generate_ids(
                [self.prompt_ids[i] for i in idx],
                sampling,
                seed_of(self.seed, "sample", update, dist.rank()),
                with_logits=cfg.logprobs_from_generation,
            )
        texts, mask, finished = cut_at_stop(self.tok, gen, cfg.stop_string)
        R = max(int(mask.sum(1).max()), 1)
        resp, mask = gen.response_ids[:, :R].to(dev), mask[:, :R].to(dev).float()
        input_ids = torch.cat([gen.prompt_ids.to(dev), resp], 1)
        attn = torch.cat([gen.prompt_mask.to(dev), mask.long()], 1)
        return gen, texts, mask, finished, input_ids, attn

    def _forwards(self, gen, input_ids, attn, R: int):
        """Old log-probs, entropy, reference log-probs and values of the sampled responses, in chunks of a
        minibatch: [B, R] each."""
        from trl.trainer.utils import selective_log_softmax

        cfg, dev = self.cfg, self.acc.device
        resp = input_ids[:, -R:]
        n_chunk = max(1, len(input_ids) // cfg.num_minibatches)
        # one process, one minibatch: the critic is unchanged until the first step, so its graph from here
        # serves epoch 0 (exact; tests/test_ppo.py)
        reuse_values = (
            self.reuse_values
            and self.critic is not None
            and cfg.num_minibatches == 1
            and cfg.grad_accum == 1
            and dist.world_size() == 1
            and not self.stepper.deepspeed
        )
        parts = {"logprobs": [], "entropy": [], "ref": [], "values": []}
        for s in range(0, len(input_ids), n_chunk):
            ids, am = input_ids[s : s + n_chunk], attn[s : s + n_chunk]
            if gen.logits is not None:
                logits = gen.logits[s : s + n_chunk, :R].to(dev).float() / cfg.temperature
                parts["logprobs"].append(selective_log_softmax(logits, resp[s : s + n_chunk]))
                parts["entropy"].append(pm.entropy_from_logits(logits))
                own = self.model(ids, am, R, logprobs=False, values=not reuse_values)
            else:
                own = self.model(ids, am, R, cfg.temperature, values=not reuse_values, entropy=True)
                parts["logprobs"].append(own["logprobs"])
                parts["entropy"].append(own["entropy"])
            if reuse_values:
                with torch.enable_grad():
                    self._value_graph = self.critic(ids, am, R)
                parts["values"].append(self._value_graph.detach())
            else:
                parts["values"].append(own["values"])
            if self.ref is not None:
                parts["ref"].append(self.ref(ids, am, R, cfg.temperature)["logprobs"])
            else:  # the LoRA policy with its adapters off
                off = self.model(ids, am, R, cfg.temperature, values=False, adapters=False)
                parts["ref"].append(off["logprobs"])
        return (torch.cat(parts[k]).float() for k in ("logprobs", "entropy", "ref", "values"))

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
        if not bool(torch.isfinite(raw).all() and torch.isfinite(score).all()):
            self._fail("reward", update)
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * (~finished.to(dev)).float()
        if cfg.reward_clip is not None:
            score = score.clamp(-cfg.reward_clip, cfg.reward_clip)
        return raw, score

    @torch.no_grad()
    def rollout(self, update: int) -> Rollout:
        cfg = self.cfg
        idx = prompt_indices(len(self.prompt_ids), cfg.rollout_batch_size, update, self.seed)
        t0 = time.perf_counter()
        gen, texts, mask, finished, input_ids, attn = self._generate(idx, update)
        t_gen, t0 = time.perf_counter() - t0, time.perf_counter()
        R = mask.shape[1]
        logprobs, entropy, ref_logprobs, values = self._forwards(gen, input_ids, attn, R)
        t_fwd, t0 = time.perf_counter() - t0, time.perf_counter()
        raw, score = self._score(idx, texts, finished, input_ids[:, -R:], mask, update)
        t_score = time.perf_counter() - t0
        write_samples(self.out_dir, update, [self.prompt_keys[i] for i in idx], texts, raw)

        kl = pm.kl_per_token(logprobs, ref_logprobs, mask, cfg.kl_estimator)
        beta = self.kl_ctl.value
        rewards, non_score = pm.token_rewards(score, kl, beta, mask)
        if cfg.whiten_rewards:
            rewards = pm.whiten(rewards, mask, shift_mean=False, stats=global_stats(rewards, mask))
        advantages, returns = pm.gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = pm.whiten(advantages, mask, stats=global_stats(advantages, mask))
        kl_seq = self._mean(kl.sum(1).mean())
        self.kl_ctl.update(kl_seq, n_steps=len(idx) * dist.world_size())
        lengths = mask.sum(1)
        stats = {
            "objective/score": self._mean(raw.mean()),
            "objective/reward": self._mean(score.mean()),
            "objective/kl": kl_seq,
            "objective/sqrt_kl": math.sqrt(max(kl_seq, 0.0)),
            "objective/kl_coef": beta,
            "objective/entropy": self._mean((entropy * mask).sum(1).mean()),
            "objective/non_score_reward": self._mean(non_score.sum(1).mean()),
            "val/explained_variance": self._mean(
                pm.explained_variance(values, returns, mask).nan_to_num(0.0)
            ),
            "response/length": self._mean(lengths.mean()),
            "response/eos_fraction": self._mean(finished.float().mean()),
            "time/generate": t_gen,
            "time/forward": t_fwd,
            "time/score": t_score,
            "_tokens": float(dist.all_reduce_sum(lengths.sum().double())),
        }
        return Rollout(
            input_ids, attn, mask, logprobs, ref_logprobs, values * mask, advantages, returns, stats
        )

    # ---- 4. optimisation ----
    def train_on(self, batch: Rollout, update: int) -> dict:
        cfg = self.cfg
        B, R = batch.mask.shape
        critic_only = update < cfg.critic_warmup_updates
        g = torch.Generator().manual_seed(seed_of(self.seed, "shuffle", update))
        logs = {
            "policy/approx_kl": [],
            "policy/clipfrac": [],
            "loss/policy": [],
            "loss/value": [],
            "val/clipfrac": [],
        }
        epochs_done = 0
        for _epoch in range(cfg.ppo_epochs):
            epoch_kl = []
            for mb in torch.tensor_split(torch.randperm(B, generator=g), cfg.num_minibatches):
                micro = [m for m in torch.tensor_split(mb, cfg.grad_accum) if len(m)]
                for k, mi in enumerate(micro):
                    mi = mi.to(batch.mask.device)
                    last = k == len(micro) - 1
                    with self.stepper.no_sync(last):
                        ids, am, mask = batch.input_ids[mi], batch.attention_mask[mi], batch.mask[mi]
                        reuse = self._value_graph is not None
                        out = self.model(
                            ids, am, R, cfg.temperature, logprobs=not critic_only, values=not reuse
                        )
                        loss = torch.zeros((), device=mask.device)
                        if not critic_only:
                            pg, st = pm.policy_loss(
                                out["logprobs"],
                                batch.logprobs[mi],
                                batch.advantages[mi],
                                mask,
                                cfg.clip_range,
                            )
                            loss = loss + pg
                            logs["loss/policy"].append(pg.item())
                            logs["policy/approx_kl"].append(float(st["approx_kl"]))
                            logs["policy/clipfrac"].append(float(st["clipfrac"]))
                            epoch_kl.append(float(st["approx_kl"]))
                        if reuse:
                            vpred, self._value_graph = self._value_graph[mi], None
                        else:
                            vpred = out["values"]
                        vf, vclip = pm.value_loss(
                            vpred, batch.values[mi], batch.returns[mi], mask, cfg.clip_range_value
                        )
                        loss = loss + cfg.vf_coef * vf
                        logs["loss/value"].append(vf.item())
                        logs["val/clipfrac"].append(float(vclip))
                        if not torch.isfinite(loss):
                            self._fail("loss", update)
                        self.stepper.backward(loss * (len(mi) / len(mb)), last)
                self.stepper.step(critic_only)
            epochs_done += 1
            if (
                cfg.early_stop_kl is not None
                and epoch_kl
                and self._mean(sum(epoch_kl) / len(epoch_kl)) > cfg.early_stop_kl
            ):
                break
        lr = self.sched.get_last_lr()[0]  # the policy's LR in this update
        with (
            warnings.catch_warnings()
        ):  # "scheduler stepped before the optimizer": DeepSpeed steps its own copy
            warnings.simplefilter("ignore", UserWarning)
            self.sched.step()
        out = {k: self._mean(sum(v) / len(v)) for k, v in logs.items() if v}
        out.update({"ppo/epochs": epochs_done, "lr": lr})
        return out

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
