"""Pipeline stages: each module has `run(ctx: StageContext) -> Path`."""
