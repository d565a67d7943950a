"""The PPO loop (Ziegler et al. 2019; Stiennon et al. 2020), written to be read top to bottom.

One update:
1. Rollout: the policy samples responses to a batch of prompts with the one generation backend
   (cai.runtime.generate), from exactly softmax(logits / temperature); the old log-probabilities come from its
   logits in fp32, or from a forward pass like the training one in bf16 (ratio 1 before the first step).
2. Scoring: reference log-probs (frozen SFT model, or the policy with LoRA adapters disabled), critic values
   and the sequence score (preference model or reward function) — forwards read only response positions. With
   one minibatch on one process, the policy's and critic's forwards that epoch 0 would repeat keep their graphs.
3. Rewards −β·KL per token plus the score on the last token; GAE; advantage whitening.
4. `ppo_epochs` passes over shuffled minibatches (gradient accumulation inside), clipped policy and value
   losses as exact token means over the minibatch (over every process), one global gradient-norm clip, one
   LR-schedule step per update. On one process a separate critic takes its forward and backward after the
   policy's (the gradients of the summed loss, with one model's activations alive at a time).

The rollout machinery, the update loop and checkpoints are shared with other on-policy trainers (cai.rl.loop);
the critic-free learners (cai.rl.group: RLOO, GRPO) subclass this one and replace the advantages (group
baselines instead of a critic's GAE) and the micro-batch loss; the forwards, the optimisation and the engines
are these.

Under `accelerate launch` each process rolls out its own share of the prompts with its own sampling seed;
whitening statistics, the KL fed to the controller and all logged metrics are all-reduced. Policy and critic
are one module with one optimizer (a parameter group each), so DDP and DeepSpeed ZeRO take them as they
are; what differs per engine is in cai.rl.engine.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from types import SimpleNamespace

import torch

from cai.rl import checkpoint as ckpt
from cai.rl import engine
from cai.rl import ppo_math as pm
from cai.rl.loop import OnPolicyTrainer
from cai.rl.modules import ActorCritic, PolicyModel, check_varlen, disable_dropout
from cai.rl.rollout import Rollout, global_stats, prompt_indices, seed_of
from cai.runtime import distributed as dist
from cai.runtime.forward import logit_entropy, product_linears, selected_logprobs, training_layers


class PPOTrainer(OnPolicyTrainer):
    """PPO on a causal LM. `policy` is a PolicyModel; `critic` a ValueModel (or None with a value head);
    `ref_model` a frozen causal LM (or None with a LoRA policy: adapters disabled); `reward(prompts, responses,
    **kw) -> (raw [B], reward [B])` (cai.rl.rewards); `prompts` rows with chat 'messages'."""

    critic_free = False  # RLOO and GRPO (cai.rl.group) learn without a critic
    # what one update logs from its minibatches (means), and the losses summed over a minibatch's micro-batches
    log_keys = ("policy/approx_kl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac")
    loss_keys = ("loss/policy", "loss/value")

    def __init__(
        self,
        cfg,
        *,
        policy: PolicyModel,
        critic=None,
        ref_model=None,
        **kwargs,
    ):
        super().__init__(cfg, **kwargs)
        if ref_model is None and not hasattr(policy.lm, "disable_adapter"):
            raise ValueError(
                "without a reference model the policy must be LoRA-wrapped (reference = adapters off)"
            )
        for m in (policy, critic, ref_model):
            if m is not None:
                disable_dropout(m)

        # one module and one optimizer (a parameter group each for policy and critic): every engine takes them
        joint = ActorCritic(policy, critic, critic_free=self.critic_free)
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
        # epoch 0's forwards, run by the rollout with their graphs (_forwards); False: recomputed
        self._epoch0, self.reuse_graphs = None, True
        # a separate critic on one plain process takes its forward and backward after the policy's (_micro_step)
        self.split_backward = self.critic is not None and self.stepper.plain_single
        ckpt.resume(self)

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

    # ---- 1-3. rollout, scoring, advantages ----
    def _forwards(self, gen, input_ids, attn, R: int, critic_only: bool):
        """Old log-probs, entropy, reference log-probs and values of the sampled responses, in chunks of a
        minibatch: [B, R] each. On one plain process with one minibatch, nothing changes until the first step,
        so the forwards that epoch 0 would run and that the rollout needs anyway run here with their graphs
        (`self._epoch0`, read by `_train_forward`): the critic's, and the policy's where its trunk runs here (the old
        log-probs from a forward, or a value head's values). Exact (tests/test_ppo.py)."""
        cfg, dev = self.cfg, self.acc.device
        resp = input_ids[:, -R:]
        n_chunk = max(1, len(input_ids) // cfg.num_minibatches)
        has_values = not self.critic_free
        head_values = has_values and self.critic is None  # the value head on the policy's trunk
        sampled = gen.logits is not None  # old log-probs and entropy from the sampling logits
        fuse = (
            self.reuse_graphs
            and cfg.num_minibatches == 1
            and cfg.grad_accum == 1
            and dist.world_size() == 1
            and not self.stepper.deepspeed
        )
        keep_values = fuse and has_values
        keep_logprobs = fuse and not critic_only and (not sampled or head_values)
        policy_graph = keep_logprobs or (keep_values and head_values)
        parts = {"logprobs": [], "entropy": [], "ref": [], "values": []}
        for s in range(0, len(input_ids), n_chunk):
            ids, am = input_ids[s : s + n_chunk], attn[s : s + n_chunk]
            if sampled:
                logits = gen.logits[s : s + n_chunk, :R].to(dev).float() / cfg.temperature
                parts["logprobs"].append(selected_logprobs(logits, resp[s : s + n_chunk]))
                parts["entropy"].append(logit_entropy(logits))
            # the policy's trunk (with a value head's values), as epoch 0 runs it where its graph is kept
            with contextlib.ExitStack() as stack:
                if policy_graph:
                    stack.enter_context(torch.enable_grad())
                    stack.enter_context(training_layers(self.policy))
                own = self.model(
                    ids,
                    am,
                    R,
                    cfg.temperature,
                    logprobs=not sampled or keep_logprobs,
                    values=head_values or (has_values and not keep_values),
                    entropy=not sampled,
                )
            kept = {"logprobs": own["logprobs"]} if keep_logprobs else {}
            if not sampled:
                parts["logprobs"].append(own["logprobs"].detach())
                parts["entropy"].append(own["entropy"])
            if keep_values and head_values:
                kept["values"] = own["values"]
            elif keep_values:  # the separate critic, as the other epochs run it (autocast, fused LoRA)
                with torch.enable_grad(), training_layers(self.critic):
                    kept["values"] = self.model(ids, am, R, logprobs=False)["values"]
            if has_values:
                parts["values"].append(kept["values"].detach() if keep_values else own["values"])
            else:
                parts["values"].append(torch.zeros_like(resp[s : s + n_chunk]))
            self._epoch0 = kept or None
            if self.ref is not None:  # under the policy's autocast dtype: KL 0 at the start (accelerate's own
                with self.precision.autocast(self.acc.device):  # context broke FSDP2's next generation)
                    parts["ref"].append(self.ref(ids, am, R, cfg.temperature)["logprobs"])
            else:  # the LoRA policy with its adapters off
                off = self.model(ids, am, R, cfg.temperature, values=False, adapters=False)
                parts["ref"].append(off["logprobs"])
        return (torch.cat(parts[k]).float() for k in ("logprobs", "entropy", "ref", "values"))

    def _train_forward(self, kept: dict, mi, ids, am, R: int, logprobs: bool, values: bool) -> dict:
        """A training forward's `logprobs` and `values` of micro-batch `mi`: those the rollout kept with their
        graphs (`kept`, epoch 0 only) indexed, the rest from a forward."""
        out = {
            k: kept[k][mi] for k, asked in (("logprobs", logprobs), ("values", values)) if asked and k in kept
        }
        lp, v = logprobs and "logprobs" not in out, values and "values" not in out
        if lp or v:
            out.update(self.model(ids, am, R, self.cfg.temperature, logprobs=lp, values=v))
        return out

    def _sample(self, idx: list[int], update: int) -> SimpleNamespace:
        """Responses to the prompts `idx` and what every on-policy rollout reads of them: the token tensors, the
        forwards (log-probs, entropy, reference log-probs, values), the raw and shaped scores, and the seconds of
        each phase."""
        t0 = time.perf_counter()
        gen, texts, mask, finished, input_ids, attn = self._generate(idx, update)
        t_gen, t0 = time.perf_counter() - t0, time.perf_counter()
        R = mask.shape[1]
        with product_linears(self.model, self.ref):  # the products on oneDNN on AMD's CPUs
            critic_only = update < self.cfg.critic_warmup_updates and not self.critic_free
            logprobs, entropy, ref_logprobs, values = self._forwards(gen, input_ids, attn, R, critic_only)
        t_fwd, t0 = time.perf_counter() - t0, time.perf_counter()
        raw, score = self._score(idx, texts, finished, input_ids[:, -R:], mask, update)
        times = {"time/generate": t_gen, "time/forward": t_fwd, "time/score": time.perf_counter() - t0}
        return SimpleNamespace(
            input_ids=input_ids,
            attn=attn,
            mask=mask,
            finished=finished,
            logprobs=logprobs,
            entropy=entropy,
            ref_logprobs=ref_logprobs,
            values=values,
            raw=raw,
            score=score,
            times=times,
        )

    def _sample_stats(self, s: SimpleNamespace, kl_seq: float, beta: float) -> dict:
        """The metrics every on-policy algorithm logs of a rollout (the report and the sqrt(KL) fit read them)."""
        k3 = self._mean(pm.kl_per_token(s.logprobs, s.ref_logprobs, s.mask, "k3").sum(1).mean())
        lengths = s.mask.sum(1)
        return {
            "objective/score": self._mean(s.raw.mean()),
            "objective/kl": kl_seq,  # the reward's penalty estimator (cfg.kl_estimator): k1 can be negative
            "objective/kl_k3": k3,
            "objective/sqrt_kl": math.sqrt(max(k3, 0.0)),  # of k3, never negative (max: float rounding only)
            "objective/kl_coef": beta,
            "objective/entropy": self._mean((s.entropy * s.mask).sum(1).mean()),
            "response/length": self._mean(lengths.mean()),
            "response/eos_fraction": self._mean(s.finished.float().mean()),
            **s.times,
            "_tokens": float(dist.all_reduce_sum(lengths.sum().double())),
        }

    @torch.no_grad()
    def rollout(self, update: int) -> Rollout:
        cfg = self.cfg
        idx = prompt_indices(len(self.prompt_ids), cfg.rollout_batch_size, update, self.seed)
        s = self._sample(idx, update)
        input_ids, attn, mask, values, score = s.input_ids, s.attn, s.mask, s.values, s.score
        logprobs, ref_logprobs = s.logprobs, s.ref_logprobs

        kl = pm.kl_per_token(logprobs, ref_logprobs, mask, cfg.kl_estimator)
        beta = self.kl_ctl.value
        rewards, non_score = pm.token_rewards(score, kl, beta, mask)
        if cfg.whiten_rewards:
            rewards = pm.whiten(rewards, mask, shift_mean=False, stats=global_stats(rewards, mask))
        advantages, returns = pm.gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = pm.whiten(advantages, mask, stats=global_stats(advantages, mask))
        kl_seq = self._mean(kl.sum(1).mean())
        # over every process's tokens: a mean of per-process ratios is not the batch's
        explained = pm.explained_variance(values, returns, mask, lambda x, m: global_stats(x, m)[1])
        self.kl_ctl.update(kl_seq, n_steps=len(idx) * dist.world_size())
        stats = {
            **self._sample_stats(s, kl_seq, beta),
            "objective/reward": self._mean((score + non_score.sum(1)).mean()),  # score − β·Σ KL, as RLOO/GRPO
            "objective/non_score_reward": self._mean(non_score.sum(1).mean()),
            "val/explained_variance": float(explained.nan_to_num(0.0)),
        }
        return Rollout(
            input_ids, attn, mask, logprobs, ref_logprobs, values * mask, advantages, returns, stats
        )

    # ---- 4. optimisation ----
    def train_on(self, batch: Rollout, update: int) -> dict:
        cfg = self.cfg
        B = batch.mask.shape[0]
        critic_only = update < cfg.critic_warmup_updates and not self.critic_free
        g = torch.Generator().manual_seed(seed_of(self.seed, "shuffle", update))
        logs = {k: [] for k in self.log_keys}
        first, grad_norms = {}, []
        epochs_done = 0
        for epoch in range(cfg.ppo_epochs):
            epoch_kl = {}  # the epoch's approx-KL as _token_stats pairs
            for m, mb in enumerate(torch.tensor_split(torch.randperm(B, generator=g), cfg.num_minibatches)):
                n_tokens = self._loss_count(batch.mask[mb.to(batch.mask.device)])
                micro = [x for x in torch.tensor_split(mb, cfg.grad_accum) if len(x)]
                losses = dict.fromkeys(self.loss_keys, 0.0)  # the minibatch's token means (summed below)
                for k, mi in enumerate(micro):
                    last = k == len(micro) - 1
                    with self.stepper.no_sync(last):
                        st = self._micro_step(
                            batch, mi.to(batch.mask.device), n_tokens, critic_only, last, update, logs, losses
                        )
                    if st is not None and epoch == 0 and m == 0 and k == 0:
                        first = st
                    if st is not None:
                        self._token_stats(epoch_kl, batch.mask[mi], kl=st["approx_kl"])
                grad_norms.append(self.stepper.step(critic_only))
                # the sums of the micro-batch losses, averaged over processes (in `out` below): the exact token
                # mean of the minibatch, whatever the number of processes
                for key, value in losses.items():
                    if key != "loss/policy" or not critic_only:
                        logs[key].append(value)
            epochs_done += 1
            if (
                cfg.early_stop_kl is not None
                and epoch_kl
                and self._pooled(epoch_kl["kl"]) > cfg.early_stop_kl
            ):
                break
        lr = self.sched.get_last_lr()[0]  # the policy's LR in this update
        with (
            warnings.catch_warnings()
        ):  # "scheduler stepped before the optimizer": DeepSpeed steps its own copy
            warnings.simplefilter("ignore", UserWarning)
            self.sched.step()
        out = {k: self._pooled(v) for k, v in logs.items() if v}
        out.update({"ppo/epochs": epochs_done, "lr": lr, "grad/norm": max(grad_norms, default=0.0)})
        if first:
            out.update(self._first_step(first, update))
        return out

    def _loss_count(self, mask):
        """The minibatch's token count over every process, over the number of processes: micro-batch losses are
        sums over it and gradients are averaged over processes, so the step is the minibatch's exact token mean."""
        n = dist.all_reduce_sum(mask.sum().double()).float()
        return n.clamp(min=1) / dist.world_size()

    def _micro_step(
        self,
        batch: Rollout,
        mi,
        n_tokens,
        critic_only: bool,
        last: bool,
        update: int,
        logs: dict,
        losses: dict,
    ):
        """Forward, loss and backward of one micro-batch; the policy-loss stats (None during critic warm-up)."""
        cfg, R = self.cfg, batch.mask.shape[1]
        ids, am, mask = batch.input_ids[mi], batch.attention_mask[mi], batch.mask[mi]
        kept, self._epoch0 = self._epoch0 or {}, None
        # split: policy and critic take a forward and backward each, one after the other (their parameters are
        # disjoint, so the gradients are those of the summed loss) and only one model's activations are alive at
        # a time; engines that expect one backward per forward get the sum
        split = self.split_backward
        out = self._train_forward(kept, mi, ids, am, R, logprobs=not critic_only, values=not split)
        loss, st = torch.zeros((), device=mask.device), None
        if not critic_only:
            args = (out["logprobs"], batch.logprobs[mi], batch.advantages[mi], mask, cfg.clip_range)
            pg, st = pm.policy_loss(*args, n_tokens=n_tokens)
            loss = loss + pg
            losses["loss/policy"] += float(pg.detach())
            self._token_stats(
                logs, mask, **{"policy/approx_kl": st["approx_kl"], "policy/clipfrac": st["clipfrac"]}
            )
            if split:
                self._check_finite(pg.detach(), "loss", update)
                self.stepper.backward(pg, last)
                loss = torch.zeros((), device=mask.device)
        vpred = (
            self._train_forward(kept, mi, ids, am, R, logprobs=False, values=True)["values"]
            if split
            else out["values"]
        )
        vargs = (vpred, batch.values[mi], batch.returns[mi], mask, cfg.clip_range_value)
        vf, vclip = pm.value_loss(*vargs, n_tokens=n_tokens)
        loss = loss + cfg.vf_coef * vf
        losses["loss/value"] += float(vf.detach())
        self._token_stats(logs, mask, **{"val/clipfrac": vclip})
        self._check_finite(loss.detach(), "loss", update)
        self.stepper.backward(loss, last)
        return st
