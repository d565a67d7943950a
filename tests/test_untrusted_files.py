"""Files cai reads that someone else may have written: hostile GGUF headers, a GGUF whose header describes a
model its tensors do not hold, the colocated vLLM engine's folder, a suite data file without a usable name.
Each is refused in one line naming the file, before anything is loaded or allocated."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from cai.errors import UserError
from cai.eval.suites import load_suite
from cai.runtime.models import local_problem, resolve

# --- GGUF headers, written byte by byte ---------------------------------------------------------------------


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _gguf(*kvs: bytes) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)


ARCH = _kv("general.architecture", 8, _s("llama"))
HOSTILE = {  # name: (header, what the one line says)
    "align0": (
        _gguf(ARCH, _kv("general.alignment", 4, struct.pack("<I", 0))),
        "is 0 (expected a positive power",
    ),
    "align-neg": (_gguf(ARCH, _kv("general.alignment", 5, struct.pack("<i", -32))), "is -32 (expected"),
    "align48": (_gguf(ARCH, _kv("general.alignment", 4, struct.pack("<I", 48))), "is 48 (expected"),
    "align-array": (
        _gguf(ARCH, _kv("general.alignment", 9, struct.pack("<IQI", 4, 1, 32))),
        "is [32] (expected a positive power of two)",
    ),
    "nested": (
        _gguf(ARCH, _kv("x", 9, struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0))),
        "arrays nested more than 3 deep",
    ),
    "huge-array": (_gguf(ARCH, _kv("x", 9, struct.pack("<IQ", 0, 2**62))), "truncated GGUF file"),
    "only-arch": (_gguf(ARCH), "GGUF key 'llama.block_count' is missing (expected a positive integer)"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_gguf_headers_are_one_line_errors(tmp_path, name):
    """alignment 0 raised ZeroDivisionError, an alignment array TypeError, arrays nested 5000 deep
    RecursionError (tracebacks from `cai recipe validate`); a 69-byte file naming only the architecture passed
    the check and transformers built a default 6.7B Llama from it. Each is now the preflight's one line, and
    the loaders stop at `resolve` before transformers sees the file."""
    header, says = HOSTILE[name]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(header)
    problem = local_problem(str(path))
    assert problem is not None and says in problem and "\n" not in problem
    with pytest.raises(UserError, match=rf"^model '.*{name}\.gguf': ") as err:
        resolve(str(path))  # what load_model and load_tokenizer do first
    assert "\n" not in str(err.value)


# --- a header that must describe the tensors the file holds -------------------------------------------------

SHAPE = dict(layers=2, hidden=8, heads=2, kv=1, ff=16, vocab=10)


def write_llama(path: Path, arch: str = "llama", meta: dict | None = None, drop=()) -> Path:
    """A tiny Llama GGUF of SHAPE with zero F32 weights; `meta` overrides its metadata (None drops a key), the
    tensors keep SHAPE; `drop` leaves tensors out."""
    import gguf
    import numpy as np

    s = SHAPE
    head_dim = s["hidden"] // s["heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": SHAPE["layers"],
        "context_length": 64,
        "embedding_length": SHAPE["hidden"],
        "feed_forward_length": SHAPE["ff"],
        "attention.head_count": SHAPE["heads"],
        "attention.head_count_kv": SHAPE["kv"],
        "vocab_size": SHAPE["vocab"],
    } | (meta or {})
    for key, value in keys.items():
        if value is not None:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    h, q, k = s["hidden"], s["heads"] * head_dim, s["kv"] * head_dim
    shapes = {"token_embd.weight": (s["vocab"], h), "output_norm.weight": (h,)}
    for i in range(s["layers"]):
        part = {
            "attn_norm": (h,),
            "attn_q": (q, h),
            "attn_k": (k, h),
            "attn_v": (k, h),
            "attn_output": (h, q),
        }
        part |= {"ffn_norm": (h,), "ffn_gate": (s["ff"], h), "ffn_up": (s["ff"], h), "ffn_down": (h, s["ff"])}
        shapes |= {f"blk.{i}.{p}.weight": dims for p, dims in part.items()}
    for name, dims in shapes.items():
        if name not in drop:
            writer.add_tensor(name, np.zeros(dims, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "case, says",
    [
        (dict(), None),
        (dict(arch="qwen2"), None),  # another architecture: its block count and tensors of every block
        (dict(meta={"feed_forward_length": None}), "GGUF key 'llama.feed_forward_length' is missing"),
        (dict(meta={"embedding_length": None}), "GGUF key 'llama.embedding_length' is missing"),
        (
            dict(meta={"attention.head_count": 0}),
            "GGUF key 'llama.attention.head_count' is 0 (expected a positive",
        ),
        (
            dict(meta={"block_count": 1000}),
            "GGUF tensor 'blk.2.*' missing (the header describes 1000 blocks)",
        ),
        (dict(arch="qwen2", meta={"block_count": 3}), "GGUF tensor 'blk.2.*' missing"),
        (dict(drop=("token_embd.weight",)), "GGUF tensor 'token_embd.weight' missing"),
        (dict(drop=("blk.1.ffn_down.weight",)), "GGUF tensor 'blk.1.ffn_down.weight' missing"),
        (
            dict(meta={"feed_forward_length": 100000}),
            "'blk.0.ffn_gate.weight' has 128 elements, its header implies",
        ),
        (dict(meta={"vocab_size": 32000}), "'token_embd.weight' has 80 elements, its header implies 256000"),
        (
            dict(meta={"attention.head_count_kv": 2}),
            "'blk.0.attn_k.weight' has 32 elements, its header implies 64",
        ),
    ],
)
def test_a_gguf_header_must_describe_the_tensors_it_holds(tmp_path, case, says):
    """transformers builds the model from the header, with its defaults for any missing key, and only then
    reads the tensors: a header without the Llama keys, or one describing more blocks or bigger layers than
    its tensors hold, allocated a model far larger than the file (a default 6.7B Llama from 69 bytes). The
    header must now carry the keys and the tensors of the model it describes, with matching element counts."""
    path = write_llama(tmp_path / "m.gguf", **case)
    problem = local_problem(str(path))
    if says is None:
        assert problem is None
    else:
        assert problem is not None and says in problem and "\n" not in problem, problem
        with pytest.raises(UserError, match=r"^model '.*m\.gguf': GGUF "):
            resolve(str(path))


# --- the colocated vLLM engine's folder ---------------------------------------------------------------------


def test_the_vllm_policy_folder_is_private_and_checked_before_reuse(tmp_path, monkeypatch, tiny):
    """The folder was /tmp/cai-vllm-policy-<hash of the public config>: another user could make it first and
    their config and tokenizer reached vLLM. It is now in cai's cache, made private, and a folder found there
    is used only if it is this user's and no one else can write to it."""
    from cai.rl.colocate import engine_folder

    monkeypatch.setenv("CAI_CACHE", str(tmp_path / "cache"))
    lm, tok = tiny
    folder = engine_folder(lm, tok)
    assert folder.parent == tmp_path / "cache" / "vllm-policy" and (folder / "config.json").is_file()
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.parent.stat().st_mode & 0o777 == 0o700
    assert engine_folder(lm, tok) == folder  # reused
    os.chmod(folder, 0o775)
    with pytest.raises(UserError, match=r"vllm-policy/\w+: expected a folder of yours that no one else can"):
        engine_folder(lm, tok)
    os.chmod(folder, 0o700)
    os.chmod(folder.parent, 0o777)
    with pytest.raises(UserError, match=r"vllm-policy: expected a folder of yours .*drwxrwxrwx"):
        engine_folder(lm, tok)
    os.chmod(folder.parent, 0o700)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "config.json").write_text(json.dumps({"planted": True}))
    folder.rename(tmp_path / "mine")
    folder.symlink_to(planted)
    with pytest.raises(UserError, match=r"expected a folder of yours .*lrwx"):
        engine_folder(lm, tok)


# --- suite data files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".jsonl", "..jsonl", ".json.gz"])
def test_a_suite_data_file_without_a_usable_name_is_one_line(tmp_path, name):
    """A data file whose name less its suffix is '' or '.' gave a pydantic traceback: it names the suite and
    its result files. One line naming the file now."""
    path = tmp_path / name
    path.write_text(
        json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"})
    )
    with pytest.raises(UserError, match=r"the suite is named by the file name less its suffix") as err:
        load_suite(str(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_a_run_directory_copied_from_another_user_resumes_none_of_its_checkpoints(tmp_path, monkeypatch):
    """Checkpoints carried RUN/run.json's token as it is, so a run directory handed over whole (run.json and
    pickled checkpoints) resumed them. The token is now sealed with the user's own key (CAI_KEY, else in
    ~/.config/cai)."""
    import stat

    from cai.runtime.rundir import KEY_FILE, run_token
    from cai.runtime.training import STATE_FILE, TOKEN_FILE, resume_point

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("CAI_KEY", str(tmp_path / "mine" / KEY_FILE))
    mine = run_token(run)
    assert run_token(run) == mine and len(mine) == 32
    assert stat.S_IMODE((tmp_path / "mine" / KEY_FILE).stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [KEY_FILE]  # no temp file left beside it
    ckpt = run / "sft" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text("{}")
    (ckpt / TOKEN_FILE).write_text(mine + "\n")
    metrics = run / "sft" / "metrics.jsonl"
    assert resume_point(ckpt.parent, metrics, "sft", run_token(run)) == str(ckpt)
    monkeypatch.setenv("CAI_KEY", str(tmp_path / "theirs" / KEY_FILE))  # the same run directory, another key
    assert run_token(run) != mine
    with pytest.raises(UserError, match="not written by this run"):
        resume_point(ckpt.parent, metrics, "sft", run_token(run))
