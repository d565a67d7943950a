"""The settings every model load and every seeded step needs, as one typed object: device, dtype,
trust_remote_code and seed. A recipe's top-level keys of the same names fill it (cai.config.recipe), the CLI's
model flags fill it for the evaluation commands (cai.cli.options), and the model loader takes it."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai.errors import UserError

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Device = Field("auto", description="auto: cuda when available, else cpu.")
    dtype: DType = Field("auto", description="auto: fp32 on CPU, bf16 on GPU.")
    trust_remote_code: bool = Field(
        False, description="Allow model repos to run their own code. Off by default."
    )
    seed: int = Field(0, description="Seed for sampling, shuffling and initialisation.")
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
