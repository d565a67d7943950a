"""What a run tells you: the end-of-run summary (where things are, key metrics, time per stage and arm),
the peak memory of each stage, and the optional experiment tracker (tensorboard or wandb through accelerate's
tracker classes)."""

from __future__ import annotations

import importlib.util
import resource
import sys
import time
from pathlib import Path

from cai.errors import UserError
from cai.runtime import distributed as dist
from cai.runtime.rundir import read_jsonl, write_json

MAX_METRICS = 5  # key metrics shown per stage in the printed summary
_PEAK = {"reset": False}  # whether the last reset_peak_memory() reset the resident-set high-water mark


def tracker_problem(name: str | None) -> str | None:
    """Why the tracker `name` cannot start here (its package is not installed), or None."""
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(name or "", ())
    if packages and all(importlib.util.find_spec(p) is None for p in packages):
        return f"'{name}' needs the {packages[0]} package (pip install {packages[0]})"
    return None


def make_tracker(recipe, run_dir: Path):
    """The recipe's tracker, started, or None (the default). Only the main process tracks."""
    if not recipe.tracker or not dist.is_main():
        return None
    problem = tracker_problem(recipe.tracker)
    if problem:
        raise UserError(f"tracker: {problem}")
    if recipe.tracker == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(recipe.name, str(run_dir / "tracker"))
    elif recipe.tracker == "wandb":
        from accelerate.tracking import WandBTracker

        tracker = WandBTracker(recipe.name, dir=str(run_dir / "tracker"))
    else:  # the schema allows no other value
        raise UserError(f"tracker: '{recipe.tracker}' is not supported")
    tracker.start()
    return tracker


class StageTracker:
    """The run's tracker seen from one stage: metric names get the stage's folder as prefix ('sft/loss').

    Stages that log through `ctx.metrics()` reach it live. For a stage that wrote its metrics.jsonl another
    way, the pipeline replays that file after the stage, so the tracker always gets every stage's curves.
    """

    def __init__(self, tracker, prefix: str):
        self.tracker = tracker
        self.prefix = prefix
        self.calls = 0

    def log(self, values: dict, step: int | None = None) -> None:
        self.calls += 1
        scalars = {
            f"{self.prefix}/{k}": v for k, v in values.items() if k != "step" and isinstance(v, (int, float))
        }
        if scalars:
            self.tracker.log(scalars, step=step)

    def replay_if_silent(self, metrics_path: Path) -> None:
        if self.calls:
            return
        for i, row in enumerate(read_jsonl(metrics_path)):
            self.log(row, step=int(row.get("step", i)))


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def key_metrics(summary: dict | None, limit: int = MAX_METRICS) -> str:
    """'name=value' for the first scalar entries of a stage's manifest summary."""
    items = [
        (k, v)
        for k, v in (summary or {}).items()
        if isinstance(v, (int, float, str, bool)) and len(str(v)) <= 40
    ]
    return ", ".join(f"{k}={_fmt(v)}" for k, v in items[:limit])


def reset_peak_memory() -> None:
    """Start measuring a new peak: the process's resident-set high-water mark (Linux: writing 5 to
    /proc/self/clear_refs resets it) and, when torch is loaded with CUDA, its peak allocation."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _PEAK["reset"] = True
    except OSError:
        _PEAK["reset"] = False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory(all_ranks: bool = False) -> dict:
    """Peak memory since reset_peak_memory(), this process's, in MiB: `rss_mib` (resident set; `rss_since`
    says 'stage' when the reset worked, 'process' when it is the high-water mark since the process started) and
    `cuda_mib` (peak CUDA allocation by torch, when used). `all_ranks` (a collective: every rank calls it): over
    every process of the run, each figure's largest, and with several processes their number (`processes`) and
    the sum of their resident sets (`rss_mib_total`: what they held together, on one machine)."""
    if all_ranks:
        return _largest(dist.gather_objects(peak_memory()))
    out: dict = {}
    try:
        status = Path("/proc/self/status").read_text()
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        out.update(rss_mib=round(kb / 1024, 1), rss_since="stage" if _PEAK["reset"] else "process")
    except (OSError, StopIteration, ValueError):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out.update(
            rss_mib=round(kb / (1024 if sys.platform != "darwin" else 1024**2), 1), rss_since="process"
        )
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _largest(peaks: list[dict]) -> dict:
    if len(peaks) == 1:
        return peaks[0]
    out: dict = {}
    for key in ("rss_mib", "cuda_mib"):
        values = [p[key] for p in peaks if p.get(key) is not None]
        if values:
            out[key] = max(values)
    out["rss_since"] = "stage" if all(p.get("rss_since") == "stage" for p in peaks) else "process"
    out["rss_mib_total"] = round(sum(p.get("rss_mib") or 0.0 for p in peaks), 1)
    out["processes"] = len(peaks)
    return out


class Summary:
    """Collects one row per stage while the pipeline runs; prints a table and writes RUN/summary.json."""

    def __init__(self, layout, quiet: bool = False):
        self.layout = layout
        self.quiet = quiet
        self.rows: list[dict] = []
        self.stale: list[str] = []
        self.t0 = time.time()

    def add(self, unit, manifest: dict, ran: bool) -> None:
        self.rows.append(
            {
                "key": unit.key,
                "stage": unit.stage,
                "arm": unit.arm
                or (("report" if unit.stage == "report" else "shared") if self.layout.arms else None),
                "status": "ran" if ran else "skipped",
                "seconds": manifest.get("seconds"),
                "dir": str(unit.dir),
                "summary": manifest.get("summary") or {},
            }
        )

    def per_arm_seconds(self) -> dict[str, float]:
        """Total stage time of each arm's own stages ('shared' for the stages arms share, 'report' for the report)."""
        out: dict[str, float] = {}
        for r in self.rows:
            out[r["arm"] or "run"] = round(out.get(r["arm"] or "run", 0.0) + float(r["seconds"] or 0), 2)
        return out

    def finish(self) -> None:
        wall = round(time.time() - self.t0, 2)
        if not dist.is_main():
            return
        rdir = self.layout.run_dir
        write_json(
            rdir / "summary.json",
            {
                "run_dir": str(rdir),
                "wall_seconds": wall,
                "stages": self.rows,
                "seconds_by_arm": self.per_arm_seconds(),
                "stale": self.stale,
            },
        )
        if self.quiet:
            return
        lines = [f"[cai] summary of {rdir}"]
        w = max([len(r["key"]) for r in self.rows] + [5])
        lines.append(f"  {'stage':<{w}}  {'status':<7}  {'time':>8}  key metrics")
        for r in self.rows:
            t = f"{r['seconds']:.1f}s" if isinstance(r["seconds"], (int, float)) else "-"
            lines.append(f"  {r['key']:<{w}}  {r['status']:<7}  {t:>8}  {key_metrics(r['summary'])}")
        if self.layout.arms:
            lines.append(
                "  time by arm (own stages): "
                + ", ".join(f"{k} {v:.1f}s" for k, v in self.per_arm_seconds().items())
            )
        ran = sum(1 for r in self.rows if r["status"] == "ran")
        lines.append(f"  {ran} stage(s) ran, {len(self.rows) - ran} skipped; wall time {wall:.1f}s")
        report = rdir / "report" / "report.md"
        if report.is_file():
            old = (
                " (out of date: the stages it reads changed and it was not rebuilt)"
                if "report" in self.stale
                else ""
            )
            lines.append(f"  report: {report}{old}")
        if self.stale:
            lines.append(f"  out of date (not selected): {', '.join(self.stale)}")
        print("\n".join(lines), flush=True)
