"""Stage `report`: RUN/report/report.md with PNGs over every stage (and arm) of the run (cai.report.build).
`cai report RUN_DIR` writes the same report for any finished run."""

from __future__ import annotations

from pathlib import Path

from cai.report.build import RunIndex, build


def run(ctx) -> Path:
    index = RunIndex.from_inputs(ctx.out_dir.parent, ctx.inputs, ctx.arms)
    result = build(index, ctx.config, ctx.out_dir)
    ctx.summary.update(result["summary"])
    return ctx.out_dir
