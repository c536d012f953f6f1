"""The house stays walkable: every import in the library points down the layers of
docs/architecture.md (a module may import its own package and lower layers only)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> layer (docs/architecture.md, "Layers"); a package imports only lower layers
LAYERS = {
    "core": 0,
    "proto_gen": -1,  # generated from protos/
    "models": 1,
    "data": 1,
    "tasks": 1,  # disco_fl/tasks.py: loss, metric, distillation per task
    "security": 1,
    "partition": 1,
    "node": 2,
    "emulation": 3,
    "runtime": 4,  # the package's __init__ (a docstring)
    "runtime.transport": 4,
    "runtime.inference": 5,
    "runtime.training": 5,
    "runtime.probe": 5,
    "runtime.calibration": 6,  # BatchNorm statistics per missing node over the peer channel
    "runtime.serving": 6,
    "fl": 7,
    "cli": 8,
    "": 9,  # disco_fl/__init__.py: the public API
}


def _package(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if parts[0] == "runtime" and len(parts) > 1:
        return f"runtime.{parts[1]}"
    return parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return [(n, m) for n, m in out if m == "disco_fl" or m.startswith("disco_fl.")]


def test_every_import_points_down_the_layers() -> None:
    bad = []
    modules = 0
    for path in sorted((ROOT / "disco_fl").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        src = _package(module)
        if src == "proto_gen":
            continue
        assert src in LAYERS, f"{module}: package {src!r} has no layer (add it to LAYERS)"
        modules += 1
        for line, imported in _imports(path):
            dst = _package(imported)
            assert dst in LAYERS, f"{module}:{line} imports {imported}: no layer"
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {imported} ({dst})")
    assert modules > 50
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_relative_imports_and_no_top_level_app_packages() -> None:
    """The Flower apps live in the library (disco_fl.fl), not in loose top-level packages."""
    assert not (ROOT / "strategies").exists() and not (ROOT / "clients").exists()
    for path in (ROOT / "disco_fl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"


def test_the_emulation_does_not_load_the_wire() -> None:
    """``import disco_fl`` (partition, emulation) loads neither protobuf nor gRPC: a model that
    never leaves the process does not pay for the network stack's modules (issue 14's memory
    comparison caught it)."""
    import subprocess
    import sys

    code = (
        "import sys, disco_fl; "
        "print(sorted(m for m in sys.modules if m.startswith(('google.protobuf', 'grpc'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout
