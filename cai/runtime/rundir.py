"""The run-directory contract: one folder per stage, each with a manifest.json; what a stage is given
(StageContext); atomic JSON, append-only JSONL that survives a kill, and metrics logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import UserError
from cai.runtime import distributed as dist

try:
    import fcntl
except ImportError:  # Windows: no run lock
    fcntl = None

MANIFEST = "manifest.json"
RUN_INFO = "run.json"  # RUN/run.json: what the latest `cai run` ran with (recipe, constitutions, code)
LOCK = ".lock"  # RUN/.lock: held by the `cai run` or `cai report` writing into RUN
RECIPE = "recipe.json"  # RUN/recipe.json: the recipe the run was made with (cai.pipeline writes it; cai.config.load reads it)
# what `cai run` writes first into a run directory (the lock, then the recipe and run.json): any one of them
# marks a folder as a cai run directory, even one whose first run was killed at once
MARKERS = (LOCK, RECIPE, RUN_INFO)
SAMPLES = "samples.jsonl"  # an on-policy stage's sampled responses with their scores (cai.rl.loop)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cai", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def code_version() -> dict:
    """cai's version and, when it runs from a git checkout of its own, the commit and whether files under cai/
    differ from it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        out: dict = {"version": version("cai"), "commit": None, "modified": None}
    except PackageNotFoundError:  # a source tree that was never installed
        out = {"version": "unknown", "commit": None, "modified": None}
    src = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == src:  # not a repository that merely contains an installed copy
        out["commit"] = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", "cai")
        out["modified"] = bool(status) if status is not None else None
    return out


def update_run_info(run_dir: str | Path, fields: dict) -> dict:
    """Set `fields` in RUN/run.json and return it; keys other writers put there are kept."""
    path = Path(run_dir) / RUN_INFO
    info = read_run_info(run_dir) or {}
    info.update(fields)
    write_json(path, info)
    return info


def read_run_info(run_dir: str | Path) -> dict | None:
    """RUN/run.json, or None when the run has none (made before it existed) or it does not parse."""
    p = Path(run_dir) / RUN_INFO
    try:
        info = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


# why resume refuses a checkpoint whose token is not this run's seal (cai.runtime.training, cai.rl.checkpoint)
NOT_SEALED = (
    "its run token is not this run's sealed with this user's key (a checkpoint of another run, of this run "
    "under another user's or machine's key, or written before cai sealed checkpoints); a checkpoint is loaded "
    "only by the run that wrote it"
)
KEY_FILE = "checkpoint-key"  # this user's secret that seals the run tokens checkpoints carry (key_path)


def run_token(run_dir: str | Path) -> str:
    """What this run's checkpoints carry, and resume asks of them: the random token in RUN/run.json (made when
    the run first starts) sealed with this user's key (HMAC-SHA256 under `user_key`). A checkpoint from another
    run carries another token; a run directory copied from someone else, run.json and all, carries seals made
    under their key: resume loads neither (checkpoints hold pickles)."""
    import hmac
    import secrets

    info = read_run_info(run_dir) or {}
    if not info.get("run_token"):
        info = update_run_info(run_dir, {"run_token": secrets.token_hex(16)})
    return hmac.new(user_key(), info["run_token"].encode(), "sha256").hexdigest()[:32]


def key_path() -> Path:
    """This user's checkpoint key: $CAI_KEY, else $XDG_CONFIG_HOME (or ~/.config)/cai/checkpoint-key. Not in the
    model cache, which several users may share or find read-only."""
    if os.environ.get("CAI_KEY"):
        return Path(os.environ["CAI_KEY"])
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "cai" / KEY_FILE


def user_key() -> bytes:
    """This user's checkpoint key (key_path; made once, readable by its owner only); copying it to another
    machine lets that machine resume this user's run directories. Made whole or not at all: a private temp file
    linked into place, so a process that loses the race reads the winner's key, never half of one."""
    import secrets
    import tempfile

    path = key_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            os.link(tmp, path)
        except FileExistsError:  # another process made it meanwhile: its key stands
            pass
        finally:
            os.unlink(tmp)
    key = path.read_text().strip()
    if len(key) < 32:
        raise UserError(
            f"{path}: a damaged checkpoint key (delete it; the checkpoints it sealed then cannot resume: delete "
            "the checkpoints/ folders of interrupted stages too)"
        )
    return key.encode()


@contextmanager
def run_lock(run_dir: str | Path):
    """Hold RUN/.lock (an exclusive flock; the folder is made) while a command writes into the run directory,
    so a second `cai run` or `cai report` on it stops with a UserError instead of racing it. Only the main
    process takes it; the OS drops it when the holder ends, even on a kill, so a stale file never blocks.
    A no-op without fcntl (Windows)."""
    if fcntl is None or not dist.is_main():
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+", encoding="utf-8") as f:  # closing it releases the lock
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            try:
                h = json.loads(f.read())
                holder = f"pid {h['pid']} on {h['host']}, since {h['started']}"
            except (ValueError, TypeError, KeyError):
                holder = "another process"
            raise UserError(
                f"{run_dir}: another cai command ({holder}) is writing into this run directory "
                f"(it holds {run_dir / LOCK}); wait for it or pass another run directory"
            ) from None
        f.truncate(0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        f.write(json.dumps(me))  # for the message a second command prints
        f.flush()
        yield


def is_run_dir(run_dir: str | Path) -> bool:
    """Whether a folder holds what `cai run` writes first into a run directory (MARKERS), or a stage folder
    with cai's manifest (its `status` and `fingerprint`): a run assembled from finished stages of others."""
    run_dir = Path(run_dir)
    if any((run_dir / name).is_file() for name in MARKERS):
        return True
    manifests = (read_manifest(d) for d in run_dir.iterdir() if d.is_dir() and (d / MANIFEST).is_file())
    return any(isinstance(m, dict) and {"status", "fingerprint"} <= m.keys() for m in manifests)


# what a run writes at the top of its run directory besides its stages' folders (cai.pipeline, cai.config.layout)
RUN_FOLDERS = ("arms", "shared", "analysis")


def check_run_dir(run_dir: str | Path, recipe, flag: bool, writes) -> None:
    """Refuse, before anything is written, a run directory that `cai run` would take from someone: an existing
    folder that is not a cai run directory (is_run_dir) yet holds something a run writes or replaces (`writes`:
    the units of its layout, whose folders are its stages', and RUN_FOLDERS), or the run directory of a recipe
    with another name (arms and sweeps share their recipe's). Other files of the user's (a recipe, its
    constitutions, dot-files) stay and do not stop it. `flag`: the user named it with --run-dir (else the
    recipe's run_dir, or runs/<name>)."""
    rdir, name = Path(run_dir), recipe.name
    where = "--run-dir" if flag else "run_dir" if recipe.run_dir else None
    if not rdir.is_dir():
        return
    said = f"{where} {rdir}" if where else str(rdir)
    if not is_run_dir(rdir):
        ours = {Path(u.dir).relative_to(rdir).parts[0] for u in writes} | set(RUN_FOLDERS)
        taken = sorted(p.name for p in rdir.iterdir() if p.name in ours)
        if taken:
            raise UserError(
                f"{said}: not a cai run directory, and it holds {', '.join(taken)}, which a run would replace: "
                "give a new folder, or move those away"
            )
        return
    try:
        recorded = json.loads((rdir / RECIPE).read_text())
    except (OSError, ValueError):  # none yet (a run killed at its start), or damaged: nothing to compare
        recorded = None
    other = recorded.get("name") if isinstance(recorded, dict) else None
    if isinstance(other, str) and other != name:
        raise UserError(
            f"{said} holds run '{other}'; this recipe is '{name}': give another {where or '--run-dir'}"
        )


def check_resettable(stage_dir: str | Path, run_dir: str | Path) -> None:
    """A stage folder cai may delete to start the stage clean: an empty one, one with a manifest, or one inside
    a run directory cai owns (is_run_dir); anything else is someone else's, and stays."""
    stage_dir, run_dir = Path(stage_dir), Path(run_dir)
    if not stage_dir.is_dir() or (stage_dir / MANIFEST).is_file() or not any(stage_dir.iterdir()):
        return
    if is_run_dir(run_dir) and stage_dir.resolve().is_relative_to(run_dir.resolve()):
        return
    raise UserError(
        f"{stage_dir}: a folder with files but no {MANIFEST}, outside a cai run directory: not cai's to "
        f"delete; move it away or give another run directory"
    )


def read_json(p: Path) -> dict | None:
    """A JSON file the run wrote itself, or None when it is missing or damaged (a kill mid-write)."""
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def read_manifest(stage_dir: str | Path) -> dict | None:
    return read_json(Path(stage_dir) / MANIFEST)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so an interruption never leaves half a file."""
    _replace_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSONL rows, ignoring a truncated last line (a run killed mid-write: it has no newline). Any other
    line that is not UTF-8 JSON, or a row that is not an object, is a UserError naming path:line (a bad line
    in the middle silently dropped every row after it)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                if not raw.endswith(b"\n"):  # only the last line can lack one
                    break
                what = (
                    "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc.msg})"
                )
                raise UserError(f"{path}:{n}: {what}; expected one JSON object per line") from None
            if not isinstance(row, dict):
                kind = {list: "an array", str: "a string", bool: "a boolean"}.get(
                    type(row), "a number or null"
                )
                raise UserError(f"{path}:{n}: {kind}; expected one JSON object per line")
            rows.append(row)
    return rows


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows in one write and fsync, so a kill loses at most the batch being written; a torn last line
    such a kill left is dropped first, so the rows start on a line of their own."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            repair_jsonl(path)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Replace a JSONL file's rows atomically (a synced temp file renamed over it): a kill while a resumed run
    rewrites its log leaves the old rows or the new ones, never no file. No rows: no file."""
    if not rows:
        return Path(path).unlink(missing_ok=True)
    _replace_bytes(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def _replace_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def repair_jsonl(path: str | Path) -> None:
    """Drop a truncated trailing line left by a kill, so appends start on a clean line (atomically)."""
    path = Path(path)
    if not path.is_file():
        return
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        _replace_bytes(path, raw[: raw.rfind(b"\n") + 1])


def resumed_rows(path: str | Path) -> list[dict]:
    """The rows a resumed JSONL file holds, the same on every process: the main process alone drops a torn last
    line and reads the file, and the others take its reading (several ranks repairing and reading one file at
    once disagreed on what was done, and could cut finished rows)."""
    rows = None
    if dist.is_main():
        repair_jsonl(path)
        rows = read_jsonl(path)
    return dist.broadcast_object(rows)


@dataclass
class MetricsLog:
    """Appends one JSON line per step to <stage>/metrics.jsonl and forwards to an accelerate tracker if any."""

    path: Path
    tracker: Any = None  # an accelerate.Accelerator with trackers initialised, or None
    extra: dict = field(default_factory=dict)  # keys every row carries (e.g. the online round)

    def log(self, metrics: dict, step: int) -> None:
        values = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        row = {"step": step, **self.extra, **values}
        append_jsonl(self.path, [row])
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)


@dataclass
class StageContext:
    """What a stage gets: its read-only view of the recipe (cai.config.view.RecipeView: the keys it declares),
    its own output folder, and the folders of the stages it reads (for the report of a run with arms, every
    unit's folder by its key, 'sft' or 'arms/<arm>/policy', and the arms in order)."""

    config: Any  # cai.config.view.RecipeView
    stage: str
    out_dir: Path
    inputs: dict[str, Path]
    summary: dict = field(default_factory=dict)  # key metrics for the stage's manifest and the run summary
    started: float = field(default_factory=time.time)
    cache_dir: Path | None = None  # where work shared between arms goes (sampled responses); default out_dir
    tracker: Any = None  # the run's tracker for this stage (set by the pipeline), used by metrics()
    arms: list[str] = field(default_factory=list)  # the run's arms, in order ([] without arms)
    run_token: str | None = None  # the run's random token (RUN/run.json): its checkpoints carry it

    def shared_path(self, name: str) -> Path:
        """A file that arms of a comparison share (the pipeline points cache_dir at a shared folder)."""
        base = self.cache_dir or self.out_dir
        base.mkdir(parents=True, exist_ok=True)
        return base / name

    def input_dir(self, stage: str) -> Path:
        if stage not in self.inputs:
            raise UserError(
                f"stage '{self.stage}' needs the output of stage '{stage}', which this run does not have"
            )
        return self.inputs[stage]

    def metrics(self, name: str = "metrics.jsonl") -> MetricsLog:
        return MetricsLog(self.out_dir / name, tracker=self.tracker)
