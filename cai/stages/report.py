"""Stage `report` and `cai report RUN_DIR`: RUN/report/report.md (renders on GitHub) with PNGs.

For any run: the stage table (time, status, key metrics), the SFT loss curve, the labeller check (with a
plain warning when it is not above chance), the PM evaluation and calibration, the PPO curves and the
sqrt(KL) fit, the harmlessness win rate against the initial model (one common judge), and examples of
prompt / initial / revised / final-policy responses. A comparison run (arms) gets one column per arm,
plus the agreement between the arms' AI labels on their shared pairs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cai.rundir import read_jsonl, read_manifest, write_json

PPO_PANELS = [
    ("objective/score", "PM score (reward)"),
    ("objective/kl", "KL(π‖π_ref)"),
    ("objective/entropy", "entropy"),
    ("policy/clipfrac", "clip fraction"),
]
SFT_LOSS_KEYS = ["loss", "train/loss", "train_loss"]


def run(ctx) -> Path:
    result = build(ctx.out_dir.parent, ctx.recipe, ctx.out_dir)
    ctx.summary.update(result["summary"])
    return ctx.out_dir


# --------------------------------------------------------------------------------------- markdown
def _cell(v, nd: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v).replace("|", "\\|").replace("\n", "<br>")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ci(res: dict | None, key: str = "accuracy") -> str:
    if not res or res.get(key) is None:
        return "—" if not res or "error" not in res else f"error: {res['error'][:80]}"
    ci = res.get("ci95")
    return f"{res[key]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{res[key]:.3f}"


def _quote(text: str, limit: int = 600) -> str:
    """A response for a markdown cell: trimmed, without control characters (a random model writes some)."""
    text = "".join(
        c if c in "\n\t" or (ord(c) >= 32 and not 0x7F <= ord(c) < 0xA0) else "\ufffd" for c in (text or "")
    ).strip()
    return (text[:limit] + " …") if len(text) > limit else text


# ------------------------------------------------------------------------------------------ build
def build(run_dir: str | Path, recipe, out_dir: str | Path | None = None) -> dict:
    """Write report.md, report.json and PNGs into out_dir (default RUN/report); return the JSON."""
    from cai.pipeline import plan

    run_dir = Path(run_dir)
    from cai import distributed as dist

    final = Path(out_dir or run_dir / "report")
    # Under several processes every rank computes (generation is sharded by the Engine, whose JSONL files in
    # gen/ only rank 0 writes); the other ranks write their copies of the files into a private folder.
    out = final if dist.is_main() else final / f".rank{dist.rank()}"
    out.mkdir(parents=True, exist_ok=True)
    layout = plan(recipe, run_dir)
    arms = list(layout.arms) or [None]
    label = {a: (a or recipe.name) for a in arms}
    compare = bool(layout.arms)
    data: dict = {
        "run_dir": str(run_dir),
        "name": recipe.name,
        "arms": list(layout.arms),
        "generated": time.strftime("%Y-%m-%d %H:%M"),
    }
    md = [
        f"# Run report: {recipe.name}\n",
        f"Run directory `{run_dir}` · generated {data['generated']} · policy `{recipe.models.policy}` · "
        f"feedback model `{recipe.models.feedback or recipe.models.policy}`"
        + (f" · arms: {', '.join(layout.arms)}" if compare else "")
        + "\n",
    ]

    def sdir(stage, arm):
        return layout.stage_dir(stage, arm)

    # -- stages
    md.append("## Stages\n")
    stage_ids = [
        s for s in ("critique_revise", "sft", "feedback", "preference_model", "ppo") if s in recipe.stages
    ]
    manifests = {(s, a): read_manifest(sdir(s, a)) if sdir(s, a) else None for s in stage_ids for a in arms}
    data["stages"] = {f"{s}|{label[a]}": (m or {}).get("status") for (s, a), m in manifests.items()}
    if compare:
        rows = []
        for s in stage_ids:
            cells = []
            for a in arms:
                m = manifests[(s, a)]
                shared = layout.units[layout.where[a][s]].arm is None
                cells.append(
                    f"{'shared · ' if shared else ''}{m['status']} · {m.get('seconds', 0):.1f} s"
                    if m
                    else "not run"
                )
            rows.append([s] + cells)
        md.append(table(["stage"] + [label[a] for a in arms], rows))
    else:
        from cai.runlog import key_metrics

        rows = [
            [
                s,
                m["status"] if m else "not run",
                f"{m['seconds']:.1f} s" if m and m.get("seconds") is not None else "—",
                key_metrics((m or {}).get("summary"), limit=6),
            ]
            for s in stage_ids
            for m in [manifests[(s, None)]]
        ]
        md.append(table(["stage", "status", "time", "key metrics"], rows))

    # -- SL-CAI and SFT
    cr = sdir("critique_revise", arms[0])
    if cr and (cr / "stats.json").is_file():
        st = json.loads((cr / "stats.json").read_text())
        md.append("## SL-CAI: critique → revision\n")
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
                        ", ".join(f"{k}: {v}" for k, v in st["rejected"]["by_reason"].items()) or "—",
                    ]
                ],
            )
        )
    sft_logs = {
        label[a]: sdir("sft", a) / "metrics.jsonl"
        for a in arms
        if sdir("sft", a) and (sdir("sft", a) / "metrics.jsonl").is_file()
    }
    sft_logs = dict({str(v): (k, v) for k, v in sft_logs.items()}.values())  # shared SFT: one line
    if sft_logs:
        from cai.plots import line_chart
        from cai.reporting import epoch_means, first_key, metric_series

        series = {}
        for name, p in sft_logs.items():
            key = first_key(p, SFT_LOSS_KEYS)
            if key:
                series[name if len(sft_logs) > 1 else "train loss"] = metric_series(p, [key])[key]
        if series:
            line_chart(out / "sft_loss.png", series, title="SFT loss", xlabel="step", ylabel="loss")
            first, last = next(iter(series.values()))[1][0], next(iter(series.values()))[1][-1]
            per_epoch = epoch_means(read_jsonl(next(iter(sft_logs.values()))), key)
            line = f"Logged loss, first → last step: {first:.3f} → {last:.3f}."
            if len(per_epoch) > 1:
                means = " → ".join(f"{v:.3f}" for v in per_epoch)
                line = f"Mean loss per epoch: {means}. {line} (a step with a partial batch is noisy)"
            md.append(f"### SFT loss\n\n{line}\n\n![SFT loss](sft_loss.png)\n")
            data["sft_loss"] = {"first": first, "last": last, "epoch_means": per_epoch}

    # -- feedback: labeller check and label stats
    from cai import report_sections as sections

    md += sections.feedback_section(recipe, layout, arms, label, data)
    md += sections.pm_section(recipe, layout, arms, label, out, data)
    md += sections.ppo_section(layout, arms, label, out, data)
    md += sections.generations_section(recipe, layout, arms, label, final / "gen", data)

    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    data["summary"] = _summary(data, arms, label)
    write_json(out / "report.json", data)
    if out != final:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return data


def _summary(data: dict, arms, label) -> dict:
    """A few numbers for the stage manifest and the run summary."""
    s: dict = {}
    for a in arms:
        suffix = "" if len(arms) == 1 else f"[{label[a]}]"
        wr = data.get("win_rate", {}).get("results", {}).get(f"final:{label[a]}")
        if wr:
            s[f"win_rate{suffix}"] = round(wr["win_rate"], 3)
        fit = data.get("kl_fit", {}).get(label[a])
        if fit:
            s[f"kl_fit_b{suffix}"] = round(fit["b"], 4)
    return s


# ---------------------------------------------------------------------------------------------- CLI
def _cmd_report(a) -> int:
    from cai.pipeline import load_run_recipe

    recipe = load_run_recipe(a.run_dir)
    data = build(a.run_dir, recipe, a.out)
    print(f"wrote {Path(a.out or Path(a.run_dir) / 'report') / 'report.md'}")
    for k, v in data["summary"].items():
        print(f"  {k}: {v}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write RUN_DIR/report/report.md (with PNGs) for a run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `cai run`")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.set_defaults(func=_cmd_report)
