"""The settings every model load and every seeded step needs, as one typed object: device, dtype,
trust_remote_code and seed. A recipe's top-level keys of the same names fill it (cai.config.recipe), the CLI's
model flags fill it for the evaluation commands (cai.cli.options), and the model loader takes it.

Below it, the precision policy those settings imply (`Precision.of(settings)`), one for every training stage (SFT,
preference model, PPO):

- trainable parameters and their optimizer state are fp32 (master weights);
- compute runs in the recipe's dtype under autocast (bf16 on a GPU by default, fp32 on a CPU);
- frozen models (preference model, labeller, judge) are held in the recipe's dtype; a fully fine-tuned policy's
  reference is held like the policy's weights and run under its autocast, so the KL starts at exactly 0;
- the frozen base under a LoRA adapter is held in the recipe's dtype too (`Precision.base`; fp32 under DeepSpeed
  and FSDP), its adapters in fp32, and a save merges the adapters in fp32 into an fp32 copy of the base reloaded
  from its own files (cai.runtime.training.merged_lora), so the saved weights are an fp32 base's;
- scalar heads (value heads, a preference model's score head) and the scores they give are fp32 on any trunk;
- saved models hold the fp32 master weights, unless `save_dtype` asks for another dtype.

DeepSpeed and FSDP get the same effect from their own mixed-precision settings (accelerate's `mixed_precision`
fills them): bf16 compute, fp32 master weights in the optimizer. Without this, AdamW on bf16 weights silently
drops every update smaller than half a bf16 step (most of them at lr 1e-5), and a bf16 head quantises rewards to
three significant digits.

Last, one process setting the on-policy trainers make on a CPU: `keep_freed_memory` (glibc's malloc keeps what a
training step frees for the next one).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.errors import UserError
from cai.runtime import distributed as dist

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Device = Field("auto", description="auto: cuda when available, else cpu.")
    dtype: DType = Field("auto", description="auto: fp32 on CPU, bf16 on GPU.")
    trust_remote_code: bool = Field(
        False, description="Allow model repos to run their own code. Off by default."
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="Seed for sampling, shuffling and initialisation (0 to 2**32 - 1)."
    )
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of trained models written to disk (training keeps fp32 master weights)."
    )

    def with_(self, **changes) -> Settings:
        """A copy with some settings changed (e.g. dtype='float32' for trainable weights)."""
        return self.model_copy(update=changes)

    def torch_device(self) -> str:
        """The device to put models on in this process: 'cpu', 'cuda', or under several processes on GPUs
        'cuda:<local rank>'."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise UserError("recipe: key 'device': 'cuda' was asked for but no GPU is available")
        if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return device

    def torch_dtype(self, device: str | None = None):
        """The torch dtype of models on `device` (default: this process's device): auto is fp32 on a CPU and
        bf16 on a GPU."""
        import torch

        if self.dtype == "auto":
            on_cpu = torch.device(device or self.torch_device()).type == "cpu"  # 'cpu', or e.g. 'cpu:0'
            return torch.float32 if on_cpu else torch.bfloat16
        return getattr(torch, self.dtype)


DEFAULT = Settings()


@dataclass(frozen=True)
class Precision:
    compute: str  # the recipe's dtype on this device: float32, bfloat16 or float16
    save: str = "float32"
    master: str = "float32"
    heads: str = "float32"

    @classmethod
    def of(cls, settings: Settings, device: str | None = None) -> Precision:
        compute = str(settings.torch_dtype(device)).removeprefix("torch.")
        return cls(compute=compute, save=settings.save_dtype)

    @property
    def frozen(self) -> str:
        return self.compute

    @property
    def mixed(self) -> str:
        """accelerate's / the HF Trainer's mixed-precision mode: 'no', 'bf16' or 'fp16'."""
        return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[self.compute]

    def trainable(self, settings: Settings) -> Settings:
        """The settings to load a model that will be trained: its weights in fp32."""
        return settings.with_(dtype=self.master)

    def base(self, settings: Settings, lora) -> Settings:
        """The settings to load a model that will be trained, with LoRA when `lora` is set: fp32 master weights,
        except a LoRA adapter's frozen base, held in the compute dtype (half the memory, no per-call cast under
        autocast; peft keeps the adapters in fp32). Under DeepSpeed or FSDP the base stays fp32 (their flat
        shards take one dtype, and a save there merges the gathered weights as they are)."""
        if lora and self.compute != self.master and lora_base_may_be_half():
            return settings.with_(dtype=self.compute)
        return self.trainable(settings)

    def autocast(self, device):
        """Autocast to the compute dtype on `device` (a no-op in fp32), for forwards outside a prepared model
        (generation)."""
        import torch

        if self.compute == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, self.compute))

    def record(self) -> dict:
        """What a stage's manifest records about its precision."""
        return {**asdict(self), "frozen": self.frozen}


def lora_base_may_be_half() -> bool:
    """Whether a LoRA adapter's frozen base may be held in a half dtype in this launch: one process or DDP."""
    return dist.engine() in ("single", "ddp")


def linear_fp32(linear, hidden):
    """A scalar head applied in fp32 whatever the trunk's dtype and any autocast: the score is not quantised."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(device_type=hidden.device.type, enabled=False):
        bias = linear.bias.float() if linear.bias is not None else None
        return F.linear(hidden.float(), linear.weight.float(), bias)


_FP32_LINEAR = None


def fp32_head(linear):
    """Make a Linear head compute in fp32 (its weights kept in fp32) whatever calls it: a sequence classifier's
    `score` runs inside the model's own forward, so the module becomes an Fp32Linear (a Linear whose forward is
    `linear_fp32`; copies and state dicts are unchanged). Returns the module."""
    global _FP32_LINEAR
    if _FP32_LINEAR is None:
        from torch import nn

        class Fp32Linear(nn.Linear):
            def forward(self, hidden):
                return linear_fp32(self, hidden)

        _FP32_LINEAR = Fp32Linear
    linear.float()
    linear.__class__ = _FP32_LINEAR
    return linear


def fp32_heads(model) -> list:
    """The heads of `model` that `fp32_head` made (their weights stay fp32 when the trunk is saved in bf16)."""
    return [m for m in model.modules() if _FP32_LINEAR is not None and isinstance(m, _FP32_LINEAR)]


def cast_keeping_fp32_heads(model, dtype) -> None:
    """Cast `model` to `dtype` in place, its fp32 heads (`fp32_head`) kept in fp32 with their exact values (not
    rounded through the cast)."""
    heads = fp32_heads(model)
    kept = [{k: v.detach().clone() for k, v in h.state_dict().items()} for h in heads]
    model.to(dtype)
    for head, state in zip(heads, kept):
        head.float().load_state_dict(state)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """From now on in this process, glibc's malloc serves every allocation from its heap and keeps what is freed
    (no `mmap` per large block, no trimming), so a training step's large tensors reuse memory the previous step
    freed instead of faulting in fresh zeroed pages from the kernel each time. By default every block above
    32 MiB (and many above 128 KiB) is mapped on allocation and unmapped on free: on this project's 2-core CPU a
    PPO update's training forward took 9.5-14.2 s with the default against 6.9-8.8 s with this, at the same peak
    memory (docs/benchmarks.md, "Freed memory kept in the process"). What the process has held is not returned to
    the system until it exits. The same as starting Python with MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_
    above any heap size. Linux with glibc only; returns whether it was set."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
