"""The shape of the package, read from its source (ast): imports form no circle, arrows point down the floors,
stages stand apart, light modules stay light, and no room grows too big."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cai"
HEAVY = {"torch", "transformers", "trl", "peft", "deepspeed", "vllm", "accelerate", "datasets", "safetensors"}
# Floors, top to bottom: a module imports only from its own floor or below.
FLOORS = [
    {"cli"},
    {"pipeline", "preflight"},
    {"stages"},
    {"report"},
    {"eval"},
    {"rl", "pm", "constitution"},
    {"feedback", "data"},
    {"config"},
    {"runtime"},
    {"errors", "yamlio", "stats", "credit", "plots", "markdown", "hashing"},
]
MAX_LINES = 400
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = modules()


def imports(path: Path):
    """(imported cai module, at module level?) and (heavy library, at module level?) pairs of one file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    cai, heavy = [], []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from cai.rl import engine` imports the module cai.rl.engine; `from cai.x import name`, cai.x
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            names = subs if len(subs) == len(node.names) else [node.module] + subs
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            if n.startswith("cai.") or n == "cai":
                target = n if n in MODULES else None
                if target and target != "cai":
                    cai.append((target, id(node) in top))
            elif n.split(".")[0] in HEAVY:
                heavy.append((n.split(".")[0], id(node) in top))
    return cai, heavy


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cai"


def floor(module: str) -> int:
    return next(i for i, rooms in enumerate(FLOORS) if room(module) in rooms)


def heavy_at_top(module: str) -> bool:
    return any(top for _, top in GRAPH[module][1])


def test_no_import_circle():
    edges = {m: {t for t, _ in GRAPH[m][0] if t != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_arrows_point_down_the_floors():
    for m in MODULES:
        if m in ("cai", "cai.__main__"):
            continue
        for t, _ in GRAPH[m][0]:
            assert floor(t) >= floor(m), f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)}), above it"


def test_stages_stand_apart():
    for m in MODULES:
        if room(m) != "stages":
            continue
        for t, _ in GRAPH[m][0]:
            assert room(t) != "stages" or t == m, f"stage {m} imports stage {t}"
            assert t != "cai.pipeline", f"stage {m} imports the pipeline"


def test_light_modules_import_light_and_own_modules_at_the_head():
    heavy_modules = {m for m in MODULES if heavy_at_top(m)}
    # what may import a heavy library at its head: the torch maths and modules of RL, and the value-head PM
    assert {room(m) for m in heavy_modules} <= {"rl", "pm"}, sorted(heavy_modules)
    for m in MODULES:
        for t, top in GRAPH[m][0]:
            # a cai module imported inside a function must be a heavy one (imported lazily to stay fast)
            assert top or t in heavy_modules, f"{m} imports the light module {t} inside a function"
            if top and m not in heavy_modules:
                assert t not in heavy_modules, f"light module {m} imports the heavy {t} at its head"


def test_the_command_line_imports_no_heavy_library():
    code = (
        "import sys, cai.cli.main, cai.pipeline, cai.config.layout;"
        f"print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_empty_init_files_and_small_rooms():
    for p in MODULES.values():
        text = p.read_text()
        if p.name == "__init__.py":
            assert not text.strip(), f"{p} is not empty"
        assert len(text.splitlines()) <= MAX_LINES, (
            f"{p}: {len(text.splitlines())} lines (at most {MAX_LINES})"
        )
    for room_name in {room(m) for m in MODULES}:
        folder = PKG / room_name
        if folder.is_dir():
            assert len(list(folder.glob("*.py"))) <= 13, f"{folder} holds too many modules"


def test_functions_are_short():
    long = []
    for p in MODULES.values():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines: " + "; ".join(long)
