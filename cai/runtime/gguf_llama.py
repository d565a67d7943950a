"""Read a Llama-architecture GGUF file into a Hugging Face state dict and config, in seconds.

transformers can load a GGUF file too, but it parses the file three times (config, weights, tokenizer) and
rebuilds its tensor-name table for every tensor: SmolLM2-135M took 35-45 s that way on a 2-core CPU. Here the
file is parsed once: the metadata with `struct`, every tensor as a view of one memory map, dequantised by the
`gguf` package's own kernels. The tokenizer is still built by transformers (cai.runtime.models).

Format facts used (GGUF v2/v3, as written by llama.cpp's converter):
- header: magic b"GGUF", uint32 version, uint64 tensor count, uint64 metadata count; little-endian;
- metadata: key (uint64 length + UTF-8), uint32 value type, value; arrays carry their element type and count;
- tensor infos: name, uint32 dimension count, uint64 dimensions (innermost first), uint32 type, uint64 offset
  from the data section, which starts at the next multiple of `general.alignment` (default 32);
- llama.cpp stores the query and key projections with each head's rotary halves interleaved; they are put
  back in Hugging Face's order here (`unpermute_rotary`).
"""

from __future__ import annotations

import functools
import math
import struct
from pathlib import Path

from cai.errors import UserError

# GGUF metadata value types: struct format of the scalar ones; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# the fewest bytes a value of each type takes (an array of N values claims at least N times that many)
_MIN_BYTES = {t: struct.calcsize(f) for t, f in _SCALARS.items()} | {_STRING: 8, _ARRAY: 12}
MAX_NESTING = 3  # arrays of arrays (of arrays): llama.cpp's converter writes at most two levels

# GGUF tensor name (per layer: blk.N.<part>) -> Hugging Face Llama name
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class _Cursor:
    """Little-endian reads from a buffer, advancing an offset."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str):
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise UserError(f"{self.path}: truncated GGUF file (ends inside its header)") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise UserError(f"{self.path}: truncated GGUF file (ends inside a string)")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth == MAX_NESTING:
                raise UserError(
                    f"{self.path}: GGUF metadata arrays nested more than {MAX_NESTING} deep at byte {self.pos} "
                    f"(expected at most {MAX_NESTING} levels)"
                )
            etype, count = self.scalar("I"), self.scalar("Q")
            if count * _MIN_BYTES.get(etype, 1) > len(self.buf) - self.pos:
                raise UserError(f"{self.path}: truncated GGUF file (ends inside an array of {count} values)")
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise UserError(f"{self.path}: unknown GGUF metadata type {vtype} at byte {self.pos}")


def read(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a GGUF file: tensors maps each name to (numpy shape, GGML type, raw uint8 view)."""
    import mmap

    import numpy as np

    if path.stat().st_size < 24:
        raise UserError(f"{path}: not a GGUF file (shorter than a GGUF header)")
    with open(path, "rb") as f:  # a private map: writable views for torch, and the file is never written
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = np.frombuffer(mapped, dtype=np.uint8)  # tensors: views of the map, read when dequantised
    cur = _Cursor(mapped, path)  # metadata: struct reads (a numpy view per string would be ~50x slower)
    if mapped[:4] != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (expected the magic bytes 'GGUF')")
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} (expected 2 or 3)")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
        infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise UserError(
            f"{path}: GGUF key 'general.alignment' is {repr(align)[:40]} (expected a positive power of two)"
        )
    start = -(-cur.pos // align) * align
    return meta, {name: _tensor(data, start + off, dims, qtype, path) for name, dims, qtype, off in infos}


_KIND = {int: "integer", float: "number"}  # values are shown cut short: an array may be long


def _positive(meta: dict, key: str, path: Path, default=None, kind=int):
    """A metadata value that must be a positive `kind` (int; float: any positive number), or `default`."""
    value = meta.get(key, default)
    if value is None or type(value) not in ((int,) if kind is int else (int, float)) or not value > 0:
        got = "missing" if value is None else repr(value)[:40]
        raise UserError(f"{path}: GGUF key {key!r} is {got} (expected a positive {_KIND[kind]})")
    return value


def check_model(meta: dict, tensors: dict, path: Path) -> None:
    """Refuse a file whose header does not describe the model its tensors hold, before anything is allocated:
    transformers builds the model from the metadata, with its own defaults for missing keys (a 69-byte file
    naming only the architecture became a 6.7B-parameter Llama). Every architecture needs `<arch>.block_count`,
    `<arch>.embedding_length`, token_embd.weight and tensors of every block; a Llama needs every key of
    `llama_config` and every tensor it names with the element count the header implies, so the model built is
    no larger than the weights the file holds."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise UserError(f"{path}: GGUF key 'general.architecture' is {repr(arch)[:40]} (expected a name)")
    layers = _positive(meta, f"{arch}.block_count", path)
    hidden = _positive(meta, f"{arch}.embedding_length", path)
    sizes = {name: math.prod(shape) for name, (shape, _, _) in tensors.items()}
    blocks = {name.split(".")[1] for name in sizes if name.startswith("blk.")}
    gap = next((i for i in range(layers) if str(i) not in blocks), None)  # at most len(blocks) + 1 steps
    want = {"token_embd.weight": None} | ({} if gap is None else {f"blk.{gap}.*": None})
    if arch == "llama" and gap is None:
        want = _llama_sizes(meta, layers, hidden, "output.weight" in sizes, path)
    for name, n in want.items():
        if name not in sizes:
            raise UserError(f"{path}: GGUF tensor '{name}' missing (the header describes {layers} blocks)")
        if n is not None and sizes[name] != n:
            raise UserError(
                f"{path}: GGUF tensor '{name}' has {sizes[name]} elements, its header implies {n}"
            )
    if sizes["token_embd.weight"] % hidden:
        raise UserError(f"{path}: GGUF tensor 'token_embd.weight' is no whole number of {hidden}-wide rows")


def _llama_sizes(meta: dict, layers: int, hidden: int, output: bool, path: Path) -> dict:
    """Element count of each tensor of the Llama model that the metadata describes (what transformers builds)."""

    def key(name, default=None, kind=int):
        return _positive(meta, f"llama.{name}", path, default, kind)

    ff, heads = key("feed_forward_length"), key("attention.head_count")
    kv, head_dim = key("attention.head_count_kv", heads), key("rope.dimension_count", hidden // heads or None)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", len(tokens) if isinstance(tokens, list) and tokens else None)
    _ = key("context_length"), key("rope.freq_base", 10000.0, float)  # the rest of what llama_config reads
    _ = key("attention.layer_norm_rms_epsilon", kind=float)
    q, k = heads * head_dim * hidden, kv * head_dim * hidden
    part = dict(zip(LAYER_NAMES, (hidden, q, k, k, q, hidden, ff * hidden, ff * hidden, ff * hidden)))
    want = {"token_embd.weight": vocab * hidden, "output_norm.weight": hidden}
    want |= {"output.weight": vocab * hidden} if output else {}
    return want | {f"blk.{i}.{name}": n for i in range(layers) for name, n in part.items()}


def _tensor(data, offset: int, dims: list[int], qtype: int, path: Path):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        kind = GGMLQuantizationType(qtype)
    except ValueError:
        raise UserError(f"{path}: unknown GGML tensor type {qtype}") from None
    if not _can_dequantize(kind):
        raise UserError(
            f"{path}: GGML tensor type {kind.name} cannot be dequantised (the gguf package lacks it)"
        )
    block, size = GGML_QUANT_SIZES[kind]
    nbytes = math.prod(dims) // block * size
    if offset + nbytes > data.shape[0]:
        raise UserError(f"{path}: truncated GGUF file (a tensor ends past the end of the file)")
    shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
    return shape, kind, data[offset : offset + nbytes]


@functools.cache
def _can_dequantize(kind) -> bool:
    """Whether the `gguf` package dequantises this GGML type (what transformers' loader and `dequantize` use)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize as by_gguf

    try:
        by_gguf(np.zeros(GGML_QUANT_SIZES[kind][1], dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def dequantize(raw, kind):
    """fp32 numpy array of a tensor's raw bytes: Q4_1 and Q8_0 (the types of SmolLM2's file) in torch, a block
    of 32 weights at a time, 6-8x faster than the `gguf` package's numpy kernels; every other type by those.
    Q4_1 block: fp16 scale d, fp16 minimum m, 16 bytes; weight j is d * (low nibble of byte j) + m and weight
    j + 16 is d * (high nibble) + m. Q8_0 block: fp16 scale d, 32 int8 q; weight j is d * q[j]."""
    import torch
    from gguf import GGMLQuantizationType as Q

    if kind == Q.Q4_1:
        blocks = torch.from_numpy(raw.reshape(-1, 20))
        d = blocks[:, 0:2].contiguous().view(torch.float16).float()
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        qs = blocks[:, 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
        return (d * q + m).reshape(-1).numpy()
    if kind == Q.Q8_0:
        blocks = torch.from_numpy(raw.reshape(-1, 34))
        d = blocks[:, 0:2].contiguous().view(torch.float16).float()
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(-1).numpy()
    from gguf.quants import dequantize as by_gguf

    return by_gguf(raw, kind).reshape(-1)


def unpermute_rotary(w, n_head: int):
    """Undo llama.cpp's reordering of a query or key projection: within each head, rows come as (half, pair)
    interleaved; Hugging Face keeps the two rotary halves as contiguous blocks."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_config(meta: dict, tied: bool, path: Path):
    """The transformers LlamaConfig described by a GGUF file's `llama.*` and tokenizer metadata."""
    from transformers import LlamaConfig

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r}, expected 'llama' (the only one converted here)")

    def key(name: str, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise UserError(f"{path}: GGUF metadata has no key 'llama.{name}'")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    ids = {
        f"{k}_token_id": meta.get(f"tokenizer.ggml.{g}_token_id")
        for k, g in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))
    }
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))},
        tie_word_embeddings=tied,
        **{k: v for k, v in ids.items() if v is not None},
    )


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor of a Llama model, or None if it has none."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    blk, layer, part = (name.split(".", 2) + ["", ""])[:3]
    if blk == "blk" and layer.isdigit() and part in LAYER_NAMES:
        return f"model.layers.{int(layer)}.{LAYER_NAMES[part]}"
    return None


def load_llama(path: Path) -> tuple[object, dict]:
    """(LlamaConfig, fp32 state dict in Hugging Face names) of a Llama GGUF file."""
    import torch

    meta, tensors = read(path)
    check_model(meta, tensors, path)
    config = llama_config(meta, tied="output.weight" not in tensors, path=path)
    state = {}
    for name, (shape, kind, raw) in tensors.items():
        hf = hf_name(name)
        if name == "rope_freqs.weight":
            continue  # recomputed by transformers from rope_theta
        if hf is None:
            raise UserError(f"{path}: unexpected tensor {name!r} for a Llama model")
        w = dequantize(raw, kind).reshape(shape)
        if hf.endswith("q_proj.weight"):
            w = unpermute_rotary(w, config.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            w = unpermute_rotary(w, config.num_key_value_heads)
        state[hf] = torch.from_numpy(
            w.astype("float32", copy=False).copy()
        )  # F32 tensors are views of the map
    return config, state


DIGITS_FIRST = ("smollm", "starcoder")  # tokenizer.ggml.pre of tokenizers that split off every digit first


def header_info(path: Path) -> dict:
    """What a load needs to know of a GGUF file before loading it, cached per file version: `problem` (why it
    cannot load, or None: unreadable, a split file, a tensor type with no dequantiser), `pre` (the tokenizer's
    pre-tokenizer name) and `tokenizer` (whether it carries one)."""
    stat = Path(path).stat()
    return _header_info(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _header_info(path: str, mtime_ns: int, size: int) -> dict:
    try:
        meta, tensors = read(Path(path))
        count = meta.get("split.count", 1)
        split = type(count) is int and count > 1  # a part lacks the other parts' tensors: said as such
        if not split:
            check_model(meta, tensors, Path(path))
    except UserError as exc:
        return {"problem": str(exc).removeprefix(f"{path}: "), "pre": None, "tokenizer": False}
    except (ValueError, OverflowError) as exc:  # a corrupt header that the reader's checks do not name
        return {"problem": f"not a readable GGUF file ({exc})", "pre": None, "tokenizer": False}
    pre = meta.get("tokenizer.ggml.pre")
    return {
        "problem": f"split GGUF ({count} files): merge it first (llama-gguf-split --merge)"
        if split
        else None,
        "pre": pre if isinstance(pre, str) else None,
        "tokenizer": isinstance(meta.get("tokenizer.ggml.tokens"), list),
    }


def fix_pre_tokenizer(tok, pre: str | None):
    """Give a tokenizer built from a GGUF file the pre-tokenizer its vocabulary was learned with, where
    transformers falls back to plain ByteLevel: SmolLM2 ('smollm') and StarCoder split every digit first."""
    if pre in DIGITS_FIRST:
        from tokenizers import pre_tokenizers as pt

        tok.backend_tokenizer.pre_tokenizer = pt.Sequence(
            [
                pt.Digits(individual_digits=True),
                pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    return tok


def convert(gguf: Path, out: Path, quiet: bool = False) -> None:
    """Dequantise a Llama GGUF once and save fp32 safetensors (+ tokenizer); later loads take well under a
    second. The weights and config come from `load_llama` (one pass over the file), the tokenizer from
    transformers' GGUF reader, with the pre-tokenizer the file names (`fix_pre_tokenizer`)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not quiet:
        print(f"converting {gguf.name} to safetensors in {out.parent} (once, ~15 s)", flush=True)
    info = header_info(gguf)
    if info["problem"]:
        raise UserError(f"{gguf}: {info['problem']}")
    tok = fix_pre_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), info["pre"])
    config, state = load_llama(gguf)
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        model = LlamaForCausalLM(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise UserError(f"{gguf}: tensors missing {sorted(missing)}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
