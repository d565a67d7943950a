"""Hashes, the one place for them: of bytes, files and JSON-able values (fingerprints and output ids of the
pipeline), and 32-bit seeds derived from a text key (the same on every machine and after a resume)."""

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


def derive_seed(key: str) -> int:
    """A 32-bit seed from a text key: the first 4 bytes of its SHA-256, little-endian. Callers build the key
    from the recipe seed and what the seed is for (a step, a batch's item ids, an update and a rank)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
