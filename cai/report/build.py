"""RUN/report/report.md (renders on GitHub) with PNGs, for the report stage and `cai report RUN_DIR`.

For any run: the stage table (time, status, key metrics), SL-CAI counts and the SFT loss curve, the labeller
check (with a plain warning when it is not above chance), the PM evaluation and calibration, the policy
optimisation curves and the sqrt(KL) fit (whatever the algorithm), the harmlessness win rate against the initial
model (one common judge), examples of prompt / initial / revised / final-policy responses (cai.report.sections),
and the policies side by side — PM score, sqrt(KL), win rate against the SFT model, time and memory — with the
online rounds (cai.report.policies). A comparison run (arms) gets one
column per arm, plus the agreement between the arms' AI labels on their shared pairs.

The report reads the run through a `RunIndex` (which folder holds each stage of each arm) and the report's
view of the recipe (cai.config.layout.STAGES['report']); it never plans or runs stages itself.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from cai.markdown import table
from cai.plots import line_chart
from cai.report import overopt, policies, sections
from cai.report.compute import first_key, metric_series
from cai.runtime import distributed as dist
from cai.runtime.rundir import RUN_INFO, read_jsonl, read_manifest, read_run_info, write_json
from cai.runtime.runlog import key_metrics
from cai.stats import epoch_means

BODY = ("gold", "critique_revise", "sft", "feedback", "preference_model", "policy")
SFT_LOSS_KEYS = ["loss", "train/loss", "train_loss"]


@dataclass
class RunIndex:
    """Where each stage of each arm of a run lives: {arm (None without arms): {stage: folder}}."""

    run_dir: Path
    arms: list[str]
    dirs: dict[str | None, dict[str, Path]]

    @classmethod
    def from_inputs(cls, run_dir: Path, inputs: dict[str, Path], arms: list[str]) -> RunIndex:
        """From a report stage's inputs: stage ids (no arms), or unit keys 'sft' / 'arms/<arm>/policy'."""
        dirs: dict = {}
        for a in arms or [None]:
            own = {s: inputs.get(f"arms/{a}/{s}") or inputs.get(s) for s in BODY}
            dirs[a] = {s: d for s, d in own.items() if d is not None}
        return cls(run_dir, list(arms), dirs)

    def stage_dir(self, stage: str, arm: str | None = None) -> Path | None:
        return self.dirs.get(arm if self.arms else None, {}).get(stage)

    def shared(self, stage: str, arm: str | None) -> bool:
        """Whether the arms share this stage's folder (it is not under RUN/arms/)."""
        d = self.stage_dir(stage, arm)
        return d is not None and "arms" not in d.relative_to(self.run_dir).parts


@dataclass
class Report:
    """What the sections read and write: the report's recipe view, the run's folders, where files go, and the
    numbers collected for report.json."""

    config: object  # cai.config.view.RecipeView of the report stage
    index: RunIndex
    out: Path
    gen_dir: Path
    data: dict = field(default_factory=dict)
    generated: dict = field(default_factory=dict)  # held-out prompts and each model's responses (sections)

    @property
    def arms(self) -> list:
        return list(self.index.arms) or [None]

    def label(self, arm) -> str:
        return arm or self.config.name


def build(index: RunIndex, config, out_dir: str | Path | None = None) -> dict:
    """Write report.md, report.json and PNGs into out_dir (default RUN/report); return the JSON."""
    final = Path(out_dir or index.run_dir / "report")
    # Under several processes every rank computes (generation is sharded by the Engine, whose JSONL files in
    # gen/ only rank 0 writes); the other ranks write their copies of the files into a private folder.
    out = final if dist.is_main() else final / f".rank{dist.rank()}"
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(config, index, out, final / "gen")
    rep.data.update(
        run_dir=str(index.run_dir),
        name=config.name,
        arms=list(index.arms),
        generated=time.strftime("%Y-%m-%d %H:%M"),
    )
    md = [
        f"# Run report: {config.name}\n",
        f"Run directory `{index.run_dir}` · generated {rep.data['generated']} · policy `{config.models.policy}` · "
        f"feedback model `{config.models.feedback}`"
        + (f" · arms: {', '.join(index.arms)}" if index.arms else "")
        + "\n",
    ]
    md += what_ran(rep)
    md += stage_table(rep)
    md += sl_cai_section(rep)
    md += sections.feedback_section(rep)
    md += sections.pm_section(rep)
    md += sections.ppo_section(rep)
    md += overopt.section(rep)
    md += sections.generations_section(rep)
    md += policies.comparison_section(rep)
    md += policies.rounds_section(rep)
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    rep.data["summary"] = _summary(rep)
    write_json(out / "report.json", rep.data)
    if out != final:
        shutil.rmtree(out, ignore_errors=True)
    return rep.data


def what_ran(rep: Report) -> list[str]:
    """The recipe and its hash, the constitutions and theirs, the seed, cai's version and commit, and the package
    versions, from RUN/run.json (written by `cai run`)."""
    info = read_run_info(rep.index.run_dir)
    rep.data["run_info"] = info
    if not info:
        return [
            "## What ran\n",
            f"Not recorded: `{RUN_INFO}` is missing (the run was made before `cai run` wrote it). "
            f"Seed {rep.config.settings.seed}.\n",
        ]
    recipe, cai = info.get("recipe") or {}, info.get("cai") or {}
    sets = " ".join(f"`--set {x}`" for x in recipe.get("set") or [])
    commit = cai.get("commit")
    code = f"{cai.get('version')}" + (
        f", commit `{commit[:12]}`{' with uncommitted changes' if cai.get('modified') else ''}"
        if commit
        else ""
    )
    rows = [
        ["recipe", f"`{recipe.get('file')}` (sha256 `{(recipe.get('sha256') or '')[:16]}`) {sets}".strip()]
    ]
    rows += [
        ["constitution", f"`{f}` (sha256 `{h[:16]}`)"] for f, h in (info.get("constitutions") or {}).items()
    ]
    seeds = info.get("arm_seeds")  # a seed sweep: each arm's
    seed = (
        ", ".join(f"{a}: {v}" for a, v in seeds.items())
        if seeds
        else info.get("seed", rep.config.settings.seed)
    )
    rows += [
        ["seed", seed],
        ["cai", code],
        ["packages", ", ".join(f"{k} {v}" for k, v in (info.get("packages") or {}).items() if k != "cai")],
    ]
    return ["## What ran\n", table(["", ""], rows)] + earlier_runs(rep, info.get("invocation"))


def earlier_runs(rep: Report, current: str | None) -> list[str]:
    """The stages that an earlier `cai run` than the one above made (RUN/run.json holds the latest one's, e.g.
    an `--only report` run's), each with that run's `--set` items, seed and commit, from its manifest."""
    rows, seen = [], set()
    for a in rep.arms:
        for s in BODY:
            d = rep.index.stage_dir(s, a)
            inv = ((read_manifest(d) or {}).get("invocation") or {}) if d and d not in seen else {}
            seen.add(d)
            if inv.get("id") and inv["id"] != current:
                sets = " ".join(f"`--set {x}`" for x in inv.get("set") or []) or "—"
                commit = (inv.get("commit") or "")[:12] + (" (modified)" if inv.get("modified") else "")
                rel = d.relative_to(rep.index.run_dir) if d.is_relative_to(rep.index.run_dir) else d
                rows.append([f"`{rel}`", inv.get("started"), sets, inv.get("seed"), commit or "—"])
    if not rows:
        return []
    head = "Made by an earlier `cai run` (the table above is the latest one's):\n"
    return [head, table(["stage", "started", "--set", "seed", "commit"], rows)]


def stage_table(rep: Report) -> list[str]:
    """Status and time of each stage (and its key metrics, or with arms which folders they share)."""
    idx = rep.index
    stage_ids = [s for s in BODY if s in rep.config.stages and (s != "gold" or idx.stage_dir(s, rep.arms[0]))]
    manifests = {
        (s, a): read_manifest(idx.stage_dir(s, a)) if idx.stage_dir(s, a) else None
        for s in stage_ids
        for a in rep.arms
    }
    rep.data["stages"] = {f"{s}|{rep.label(a)}": (m or {}).get("status") for (s, a), m in manifests.items()}
    if idx.arms:
        rows = []
        for s in stage_ids:
            cells = []
            for a in rep.arms:
                m = manifests[(s, a)]
                shared = "shared · " if idx.shared(s, a) else ""
                secs = (m.get("seconds_total") or m.get("seconds") or 0) if m else 0  # every attempt's
                cells.append(f"{shared}{m['status']} · {secs:.1f} s" if m else "not run")
            rows.append([s] + cells)
        return ["## Stages\n", table(["stage"] + [rep.label(a) for a in rep.arms], rows)]
    rows = [
        [
            s,
            m["status"] if m else "not run",
            f"{m.get('seconds_total', m['seconds']):.1f} s" if m and m.get("seconds") is not None else "—",
            key_metrics((m or {}).get("summary"), limit=6),
        ]
        for s in stage_ids
        for m in [manifests[(s, None)]]
    ]
    return ["## Stages\n", table(["stage", "status", "time", "key metrics"], rows)]


def sl_cai_section(rep: Report) -> list[str]:
    """SL-CAI counts and the SFT loss curve (one line per distinct SFT folder)."""
    md = []
    cr = rep.index.stage_dir("critique_revise", rep.arms[0])
    if cr and (cr / "stats.json").is_file():
        st = json.loads((cr / "stats.json").read_text())
        md.append("## SL-CAI: critique → revision\n")
        reasons = ", ".join(f"{k}: {v}" for k, v in st["rejected"]["by_reason"].items()) or "—"
        md.append(
            table(
                ["train prompts", "held out", "revised", "helpful kept", "rejected", "rejected by reason"],
                [
                    [
                        st["prompts"]["train"],
                        st["prompts"]["held_out"],
                        st["records"]["red_team"],
                        st["records"]["helpful"],
                        st["rejected"]["total"],
                        reasons,
                    ]
                ],
            )
        )
    logs = {}
    for a in rep.arms:
        d = rep.index.stage_dir("sft", a)
        if d and (d / "metrics.jsonl").is_file() and str(d) not in {str(p.parent) for p in logs.values()}:
            logs[rep.label(a)] = d / "metrics.jsonl"  # a shared SFT folder: one line
    series = {}
    for name, p in logs.items():
        key = first_key(p, SFT_LOSS_KEYS)
        if key:
            series[name if len(logs) > 1 else "train loss"] = metric_series(p, [key])[key]
    if not series:
        return md
    line_chart(rep.out / "sft_loss.png", series, title="SFT loss", xlabel="step", ylabel="loss")
    xs_ys = next(iter(series.values()))
    first, last = xs_ys[1][0], xs_ys[1][-1]
    per_epoch = epoch_means(read_jsonl(next(iter(logs.values()))), key)
    line = f"Logged loss, first → last step: {first:.3f} → {last:.3f}."
    if len(per_epoch) > 1:
        means = " → ".join(f"{v:.3f}" for v in per_epoch)
        line = f"Mean loss per epoch: {means}. {line} (a step with a partial batch is noisy)"
    md.append(f"### SFT loss\n\n{line}\n\n![SFT loss](sft_loss.png)\n")
    rep.data["sft_loss"] = {"first": first, "last": last, "epoch_means": per_epoch}
    return md


def _summary(rep: Report) -> dict:
    """A few numbers for the stage manifest and the run summary."""
    s: dict = {}
    for a in rep.arms:
        suffix = "" if len(rep.arms) == 1 else f"[{rep.label(a)}]"
        wr = rep.data.get("win_rate", {}).get("results", {}).get(f"final:{rep.label(a)}")
        if wr:
            s[f"win_rate{suffix}"] = round(wr["win_rate"], 3)
        fit = rep.data.get("kl_fit", {}).get(rep.label(a))
        if fit:
            s[f"kl_fit_b{suffix}"] = round(fit["b"], 4)
    return s
