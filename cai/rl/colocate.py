"""PPO rollouts from a vLLM engine that lives in the training process (the pattern TRL calls colocate), for
`ppo.rollout_backend: vllm`. The loop (cai.rl.loop) asks `backend_for(policy_lm)` before each rollout and calls
`rest()` after it; everything else of a rollout is unchanged.

- The engine starts once, on a folder holding only the policy's config and tokenizer, with random ('dummy')
  weights: the first sync loads every tensor of the policy, so a resumed run samples from its resumed weights.
- Before each rollout the policy's current weights reach the engine (vLLM's in-place reload, in the checkpoint's
  names): a full fine-tune sends its trainable tensors; a LoRA policy sends the merged weight W + s·BA of each
  adapted layer, with the other weights of the same block part (attention, MLP), because vLLM fuses q/k/v and
  gate/up into one layer that it processes only once all its parts have arrived. The base weights of the policy
  are never modified (the merge is computed beside them, so the reference policy, adapters off, stays exact).
- Old log-probs come from the training forward, never from vLLM's sampling (the loop turns
  `logprobs_from_generation` off), so PPO's ratio is 1 before an update's first step, exactly as with HF.
- Between rollouts the engine sleeps (`ppo.vllm_sleep`, GPU only: level 1, weights to CPU memory, KV cache
  freed) and wakes before the next sync; its memory share is `ppo.vllm_memory`.
- Several processes: every rank runs its own engine (tensor parallel size 1) on its own device, syncs it from
  its own copy of the policy (identical on every rank under DDP) and samples its own prompts. Under DeepSpeed
  ZeRO-3 the sync runs inside `engine.unwrapped_for_generation`, where the shards are gathered into whole
  tensors first. FSDP is refused (its blocks stay sharded outside their forward).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from cai.errors import UserError
from cai.hashing import hash_json
from cai.runtime import distributed as dist
from cai.runtime import vllm_engine
from cai.runtime.generate import VLLMBackend
from cai.runtime.models import cache_root

GPU_SHARE = 0.3  # the engine's default share of a GPU beside training (weights, KV cache)


def base_of(lm):
    """The causal LM inside a peft wrapper (LoRA layers in place), or the model itself."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def policy_weights(lm, everything: bool) -> list:
    """(name, tensor) pairs of the policy's weights in the Hugging Face checkpoint's names, LoRA merged: all of
    them, or only what training changes (see the module docstring)."""
    import torch

    base = base_of(lm)
    adapted = {
        n: m for n, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")
    }
    parts = {n.rpartition(".")[0] for n in adapted}  # the attention / MLP modules holding an adapted layer
    out = []
    with torch.no_grad():
        for name, p in base.named_parameters(remove_duplicate=False):  # tied: both names (vLLM loads each)
            if ".lora_" in name:
                continue
            clean = name.replace(".base_layer.", ".")
            module = clean.rpartition(".")[0]
            if not everything and not (module.rpartition(".")[0] in parts if adapted else p.requires_grad):
                continue
            t = p.detach()
            if module in adapted and clean.endswith(".weight"):
                m = adapted[module]
                for a in m.active_adapters:
                    if a in m.lora_A:
                        t = t + m.get_delta_weight(a).to(t.dtype)
            out.append((clean, t))
    return out


def engine_folder(lm, tokenizer) -> Path:
    """A folder with the policy's config and tokenizer (no weights), named by their content, one per rank, in
    cai's cache (`vllm-policy/`). It was a guessable name in the shared temp folder, where another user could
    plant the config and tokenizer vLLM reads: the folder and the one holding it are now used only if this
    user owns them and no one else can write to them."""
    config = base_of(lm).config
    key = hash_json({"config": config.to_json_string(), "vocab": len(tokenizer), "rank": dist.rank()})
    parent = cache_root() / "vllm-policy"
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(parent)
    folder = parent / key
    if not (folder / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=parent))  # mode 0700
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(folder)  # whole or not at all (another process may have made it meanwhile)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    _check_private(folder)
    return folder


def _check_private(folder: Path) -> None:
    """Refuse a folder that is a link, another user's, or writable by group or others."""
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise UserError(
            f"{folder}: expected a folder of yours that no one else can write to (found owner uid {st.st_uid}, "
            f"mode {stat.filemode(st.st_mode)}); remove it, or set CAI_CACHE to a private folder"
        )


class VLLMRollouts:
    """The colocated engine of one trainer: `backend_for(lm)` syncs the weights and returns a generation
    backend for cai.rl.rollout.sample; `rest()` frees the engine's memory until the next rollout."""

    def __init__(self, lm, tokenizer, cfg, dtype: str, seed: int):
        # a trainer's block names rollout_backend; the memory share and sleep keys are optional (PPOConfig has them)
        self.tokenizer, self.sleep_mode = tokenizer, getattr(cfg, "vllm_sleep", True)
        self.llm = vllm_engine.start(
            str(engine_folder(lm, tokenizer)),
            dtype=dtype,
            seed=seed,
            memory=getattr(cfg, "vllm_memory", None),
            gpu_default=GPU_SHARE,
            dummy=True,
            sleep_mode=self.sleep_mode,
        )
        self.synced, self.asleep = False, False
        self.sent = 0  # tensors sent at the last sync (what a test or a log can check)

    def backend_for(self, lm) -> VLLMBackend:
        if self.asleep:
            vllm_engine.wake(self.llm)
            self.asleep = False
        weights = policy_weights(lm, everything=not self.synced)
        vllm_engine.load_weights(self.llm, weights)
        self.synced, self.sent = True, len(weights)
        return VLLMBackend(self.llm, self.tokenizer, lm)  # lm's generation_config end ids, as HF generate's

    def rest(self) -> None:
        if self.sleep_mode and not vllm_engine.on_cpu():
            vllm_engine.sleep(self.llm)
            self.asleep = True
