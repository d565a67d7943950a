"""How one PPO optimisation step runs under each engine accelerate drives.

The trainer holds one module (cai.rl.modules.ActorCritic: policy + critic) and one optimizer with a
parameter group each, prepared once by accelerate. What differs per engine is only here:

- one process, or DDP: accelerate's `backward` (DDP all-reduces gradients on the last micro-batch of a
  minibatch; the others run under `no_sync`), then the gradients of policy and critic together are clipped
  to `ppo.max_grad_norm` (one global norm, as DeepSpeed clips) and the optimizer steps.
- DeepSpeed ZeRO-2/3: the engine's `backward` and `step`. The engine is told where a minibatch ends
  (`set_gradient_accumulation_boundary`), reduces and partitions the gradients, clips them jointly (its
  `gradient_clipping`, filled from `ppo.max_grad_norm`) and steps its ZeRO-wrapped copy of the optimizer.
  The frozen reference model and preference model become inference engines (`trl`'s `prepare_deepspeed`):
  sharded under ZeRO-3, whole otherwise.
- FSDP2: as DDP for backward and the same joint clipping (DTensor-aware); the root's own parameters are unsharded for
  generation, and checkpoints are full state dicts gathered from the shards (`full_state`).
During the critic warm-up the policy's group is flagged 'frozen' and `GroupAdamW` passes over it, which works
the same under every engine (DeepSpeed steps all groups of its optimizer).
"""

from __future__ import annotations

import contextlib
import math

import torch


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int | None:
    return acc.state.deepspeed_plugin.zero_stage if is_deepspeed(acc) else None


def is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def unwrapped_for_generation(model, acc):
    """The prepared ActorCritic with whole weights, for generating outside its forward: ZeRO-3 parameters are
    gathered (`trl`'s `unwrap_model_for_generation`); under FSDP the root's own parameters (embeddings, final
    norm, LM head) are unsharded for the duration, while each sharded block gathers itself as it runs."""
    if is_fsdp(acc):
        model.unshard()
        try:
            yield acc.unwrap_model(model)
        finally:
            model.reshard()
        return
    from trl.models.utils import unwrap_model_for_generation

    with unwrap_model_for_generation(model, acc) as unwrapped:
        yield unwrapped


@torch.no_grad()
def fsdp_root_forward(model, token_ids: list[int], device) -> None:
    """FSDP takes the module of the first forward as its root. Generation and the plain forwards of parts call
    submodules directly, so the prepared module runs one forward first (on a few prompt tokens)."""
    probe = torch.tensor([token_ids], device=device)
    model(probe, torch.ones_like(probe), 1)
    model.reshard()


def full_state(model, optimizer=None, trainable_only: bool = True):
    """(model state, optimizer state) with whole tensors on the CPU of the main process, for FSDP's sharded
    module; every process must call it. Optimizer state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    model.reshard()  # the root stays unsharded after a forward without backward: its params are the shards again
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        msd, osd = get_model_state_dict(model, options=opts), None
    else:
        msd, osd = get_state_dict(model, optimizer, options=opts)
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        msd = {k: v for k, v in msd.items() if k in keep}
    return msd, osd


def load_full_state(model, optimizer, model_state: dict, optim_state: dict) -> None:
    """Inverse of full_state: every process loads the whole tensors and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model.reshard()
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def fill_deepspeed_config(acc, cfg) -> None:
    """Fill the "auto" entries that accelerate cannot infer without a dataloader, from the ppo block: the
    micro-batch (one gradient-accumulation slice of a minibatch), accumulation (1: the trainer marks
    minibatch boundaries itself) and clipping."""
    if not is_deepspeed(acc):
        return
    ds = acc.state.deepspeed_plugin.deepspeed_config
    micro = math.ceil(cfg.rollout_batch_size / (cfg.num_minibatches * cfg.grad_accum))
    for key, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", 1),
        ("gradient_clipping", cfg.max_grad_norm),
    ):
        if ds.get(key, "auto") == "auto":
            ds[key] = value


def prepare_frozen(model, acc):
    """A frozen model (reference policy, preference model) ready for inference under the engine in use."""
    if is_deepspeed(acc):
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, acc)
    return model.to(acc.device)


class Stepper:
    """backward / clip / step of the prepared ActorCritic `model` and its optimizer `opt`."""

    def __init__(self, acc, model, opt, max_grad_norm: float):
        self.acc, self.model, self.opt, self.max_grad_norm = acc, model, opt, max_grad_norm
        self.deepspeed, self.fsdp = is_deepspeed(acc), is_fsdp(acc)
        # one process under no engine: backward may run more than once per forward
        self.plain_single = not (self.deepspeed or self.fsdp) and acc.num_processes == 1

    def no_sync(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a minibatch."""
        if last or self.deepspeed:
            return contextlib.nullcontext()
        return self.acc.no_sync(self.model)

    def backward(self, loss, last: bool) -> None:
        """Accumulate the gradients of `loss` (already weighted by the micro-batch's share of the minibatch)."""
        if self.deepspeed:
            self.model.set_gradient_accumulation_boundary(last)
            # the engine divides by its gradient_accumulation_steps (1 unless a config fixes it): undo that
            self.model.backward(loss * self.model.gradient_accumulation_steps())
        else:
            self.acc.backward(loss)

    def step(self, critic_only: bool) -> float:
        """Clip and apply the accumulated gradients. During critic warm-up the policy group is frozen: no step
        and no optimizer state, under every engine (DeepSpeed steps all groups, so the optimizer skips it), and
        its gradients (a value head's loss reaches the trunk) are dropped before the norm, except under DeepSpeed,
        whose engine clips over every gradient it holds."""
        for group in self.opt.param_groups:
            group["frozen"] = critic_only and group.get("name") == "policy"
            if group["frozen"] and not self.deepspeed:
                # a value head's loss reaches the frozen trunk: those gradients neither step nor count in the norm
                for p in group["params"]:
                    p.grad = None
        if self.deepspeed:
            self.model.step()  # clips jointly, steps and zeroes the gradients
            norm = self.model.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        # one rule under every engine, DeepSpeed's: the global norm of policy and critic gradients together
        # (parameters without a gradient, frozen or warming up, do not count)
        self.acc.unscale_gradients()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.fsdp:  # sharded gradients: the norm is gathered over the shards (DTensor-aware)
            norm = self.acc._clip_grad_norm_dtensor_aware(params, self.max_grad_norm)
        else:
            norm = clip_gradients(params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def clip_gradients(params: list, max_norm: float):
    """`torch.nn.utils.clip_grad_norm_` (the same norm, the same scaled gradients, NaN or inf spreading the same
    way) without its multiply when nothing is clipped: torch scales every gradient by min(1, max / (norm + 1e-6))
    to avoid reading the norm back from the device, and a scale of 1 still reads and writes every gradient
    (bench/grad_clip.py: 110 against 163 ms over two fully fine-tuned SmolLM2-135M on a CPU). The norm is read
    back here; the trainer reads it anyway for its metrics. Returns the norm before clipping."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # torch's coefficient min(1, max / (norm + 1e-6)) is below 1, or the norm is not finite (NaN fails <=)
    if not bool(norm + 1e-6 <= max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class GroupAdamW(torch.optim.AdamW):
    """AdamW over named parameter groups that passes over any group flagged 'frozen' (no update, no state)."""

    def step(self, closure=None):
        frozen = [(g, g["params"]) for g in self.param_groups if g.get("frozen")]
        for g, _ in frozen:
            g["params"] = []
        try:
            return super().step(closure)
        finally:
            for g, params in frozen:
                g["params"] = params


def make_optimizer(param_groups: list[dict]) -> GroupAdamW:
    param_groups = [{"frozen": False, **g} for g in param_groups]  # every group has the key from the start
    try:
        return GroupAdamW(param_groups, eps=1e-5, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return GroupAdamW(param_groups, eps=1e-5, weight_decay=0.0)
