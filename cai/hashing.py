"""Hashes, the one place for them: of bytes, files and JSON-able values (fingerprints of the pipeline), of a
stage's outputs by content (its output id), 32-bit seeds derived from a text key (the same on every machine
and after a resume), and uniform numbers counted from a seed (the sampler's per-row randomness)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj` as canonical JSON (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


# Keys of a JSON output that record how long something took, not what it produced: left out of an output id.
VOLATILE_KEYS = frozenset({"seconds", "tokens_per_s", "started", "ended", "timing"})


def _without_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_without_volatile(v) for v in obj]
    return obj


def content_digest(path: Path) -> str:
    """SHA-256 of a file's content; a .json file's parsed content without its VOLATILE_KEYS."""
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return sha256_file(path)
        return sha256_bytes(json.dumps(_without_volatile(obj), sort_keys=True).encode())
    return sha256_file(path)


def hash_outputs(folder: str | Path, names: tuple[str, ...] | list[str]) -> str:
    """16 hex digits over the content of the named files and folders (every file below, in sorted order) under
    `folder`: a stage's output id. Two runs that write the same files get the same id, whenever they ran; a
    missing name counts as missing."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in names:
        p = folder / name
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else ([p] if p.is_file() else [])
        if not files:
            h.update(f"{name}\0missing\0".encode())
        for f in files:
            h.update(f"{f.relative_to(folder).as_posix()}\0{content_digest(f)}\0".encode())
    return h.hexdigest()[:16]


def derive_seed(key: str) -> int:
    """A 32-bit seed from a text key: the first 4 bytes of its SHA-256, little-endian. Callers build the key
    from the recipe seed and what the seed is for (a step, a batch's item ids, an update and a rank)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment; its multipliers follow (as signed 64-bit numbers below)
MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _int64(c: int) -> int:
    c %= 1 << 64
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z, s: int):
    return (z >> s) & ((1 << (64 - s)) - 1)  # a logical shift of int64 tensors (torch's `>>` keeps the sign)


def _mix64(z):
    z = (z ^ _shr(z, 30)) * _int64(MIX[0])  # int64 products and sums wrap around: arithmetic modulo 2**64
    z = (z ^ _shr(z, 27)) * _int64(MIX[1])
    return z ^ _shr(z, 31)


def row_uniforms(seeds, step: int):
    """Uniform numbers in [0, 1) (float64, 53 random bits), one per seed (a sequence or an int64 tensor): number
    `step` of splitmix64's stream started from the mixed seed, for every seed at once in torch; each number
    depends on its seed and `step` alone (the sampler's per-row randomness: cai.runtime.decode)."""
    import torch

    key = _mix64(torch.as_tensor(seeds, dtype=torch.int64) + _int64(GOLDEN))
    return _shr(_mix64(key + _int64((step + 1) * GOLDEN)), 11).double() * 2.0**-53
