"""Process-group helpers. Single process (no torch.distributed group) is world size 1 and every call is a no-op.

Under `accelerate launch` / `torchrun`, ranks share work by index and only the main process writes files.
"""

from __future__ import annotations

import os
import sys

from cai.errors import UserError

_LEFT_GROUP = False  # shutdown() has destroyed this process's torch.distributed group (see was_in_group)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_from_env(device: str = "auto") -> None:
    """Join the process group when launched by accelerate/torchrun: nccl where the run's models go on GPUs, gloo
    where they stay on the CPU (`device` 'cpu', a launch with `--cpu`, or no GPU). `device` is the recipe's."""
    check_launch_env()
    skip_deepspeed_shm_kernel()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _dist() is not None:
        return
    import torch
    import torch.distributed as dist

    on_gpu = (
        device != "cpu"
        and torch.cuda.is_available()
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    )
    backend = "nccl" if on_gpu else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before the group: collectives use it
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            # as accelerate does for FSDP: full state dicts are gathered on CPU
            backend = "cuda:nccl,cpu:gloo"
    dist.init_process_group(backend=backend)


def check_launch_env() -> None:
    """Refuse an FSDP launch with `fsdp_cpu_ram_efficient_loading: true`: transformers then fills every model that
    `from_pretrained` loads on processes other than each machine's first with zeros (expecting FSDP to broadcast
    rank 0's weights), and cai loads whole models outside FSDP too: generation models, the labeller, PPO's
    reference and preference models."""
    env = os.environ
    on = ("1", "true", "yes", "y", "on", "t")
    if (
        env.get("ACCELERATE_USE_FSDP", "").lower() in on
        and env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in on
    ):
        raise UserError(
            "accelerate config: fsdp_config.fsdp_cpu_ram_efficient_loading is true (FSDP_CPU_RAM_EFFICIENT_LOADING"
            "); expected false: with it every process but the first loads its models as zeros"
        )


def skip_deepspeed_shm_kernel() -> None:
    """Under a DeepSpeed launch of one process on a CPU, mark DeepSpeed's shared-memory all-reduce kernel as not
    buildable, before accelerate starts DeepSpeed's communication. The kernel serves several processes on one
    machine; a world of one never calls it, yet DeepSpeed compiles it (about a minute of C++) in every new
    environment. A no-op without DeepSpeed, on a GPU, or with several processes."""
    if not engine().startswith("deepspeed") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    import torch

    if torch.cuda.is_available():
        return
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", None)  # read by deepspeed.comm's TorchBackend
    if isinstance(table, dict):  # (another DeepSpeed version may keep it elsewhere: then it builds as before)
        table["deepspeed_shm_comm"] = False


def shutdown() -> None:
    """End of a multi-process run: wait for every rank, then leave the group. A no-op in a single process."""
    global _LEFT_GROUP
    d = _dist()
    if d:
        d.barrier()
        d.destroy_process_group()
        _LEFT_GROUP = True


def was_in_group() -> bool:
    """Whether this process is in a torch.distributed group (cai's or the engine's) or has left one."""
    return _LEFT_GROUP or _dist() is not None


def end_process(code: int):
    """Exit now with `code`: Python's exit functions run and stdout and stderr are flushed, but the interpreter
    does not tear itself down. For a process that has been in a gloo group: torch keeps the group's worker threads
    running after `destroy_process_group` once a DDP model has used it, and a worker that frees a finished
    collective while the interpreter finalises is stopped inside a C++ destructor. std::terminate, SIGABRT, and the
    launcher reports a run whose files are all written as failed: 4 of 302 launches of a 2-process PPO test, two
    or three launches side by side; the core dump shows ProcessGroupGloo::runLoop, ~AsyncBarrierWork, a tensor's
    decref, take_gil, pthread_exit. cai writes its files in `with` blocks, so nothing is left unwritten."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a closed pipe
            pass
    os._exit(code)


def engine() -> str:
    """How the processes were launched, from accelerate's launcher environment: 'single', 'ddp',
    'deepspeed-zero<N>' or 'fsdp'. Recorded in each stage manifest."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        cfg = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if not stage and cfg.endswith(".json") and os.path.isfile(cfg):
            import json

            with open(cfg, encoding="utf-8") as f:
                stage = (json.load(f).get("zero_optimization") or {}).get("stage")
        return f"deepspeed-zero{stage}" if stage is not None else "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "ddp" if world_size() > 1 else "single"


def whole_weights() -> bool:
    """Whether every process holds each module's weights whole (one process, DDP, ZeRO 0-2): a fast path may then
    read a module's weight without calling the module. ZeRO-3 and FSDP shard the weights and gather a module's
    only when that module itself is called."""
    return engine() in ("single", "ddp", "deepspeed-zero0", "deepspeed-zero1", "deepspeed-zero2")


def accelerator_cpu(device: str) -> bool:
    """The `cpu` flag for accelerate (Accelerator(cpu=...), TrainingArguments.use_cpu) on `device`: True on a
    CPU, except under a DeepSpeed launch, where it would silently switch DeepSpeed off (DeepSpeed runs on CPU
    by itself when no GPU is found)."""
    return device == "cpu" and not engine().startswith("deepspeed")


def release_stage_state() -> None:
    """After a stage: forget the DeepSpeed config its trainer registered process-wide (transformers keeps a
    reference, and a later `from_pretrained` would then build ZeRO-3-partitioned models outside any engine),
    and free the stage's memory before the next stage loads its models."""
    import gc
    import sys

    ds = sys.modules.get("transformers.integrations.deepspeed")
    if ds is not None:
        ds.unset_hf_deepspeed_config()
    acc_state = sys.modules.get("accelerate.state")
    if acc_state is not None:  # the next stage may set up its accelerator differently (e.g. another engine)
        acc_state.AcceleratorState._reset_state()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def gather_objects(obj):
    """All ranks get the list of every rank's `obj`, in rank order."""
    d = _dist()
    if not d:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    d = _dist()
    if not d:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(tensor):
    """Mean of a tensor over ranks (in place on a copy)."""
    d = _dist()
    if not d:
        return tensor
    t = tensor.clone()
    d.all_reduce(t)
    return t / d.get_world_size()


def all_reduce_sum(tensor):
    d = _dist()
    if not d:
        return tensor
    t = tensor.clone()
    d.all_reduce(t)
    return t


def all_reduce_max(tensor):
    d = _dist()
    if not d:
        return tensor
    t = tensor.clone()
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return t
