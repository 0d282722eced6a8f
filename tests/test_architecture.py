"""The core's boundaries: it imports no built-in plugin, names no built-in component, and its imports form no circle;
a wheel carries the presets, so an installed ablate runs a preset from any directory."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

from ablate.registry import KINDS, get_registry

CORE = REPO / "ablate"
BUILTIN_PACKAGES = ("ablate_plugins", "ablate_experiments")


@functools.cache
def core_modules() -> dict[str, ast.Module]:
    return {f"ablate.{path.stem}": ast.parse(path.read_text()) for path in sorted(CORE.glob("*.py"))}


def imports_of(tree: ast.Module) -> set[str]:
    """Every module imported anywhere in the file (functions too), except under `if TYPE_CHECKING:`."""
    skipped = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and getattr(stmt.test, "id", None) == "TYPE_CHECKING"
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_core_imports_no_builtin_plugin():
    offenders = {
        name: sorted(i for i in imports_of(tree) if i.split(".")[0] in BUILTIN_PACKAGES)
        for name, tree in core_modules().items()
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_core_names_no_builtin_component():
    """No string in ablate/ is the name of a built-in component or checkpoint format (plugins own their names)."""
    registry = get_registry()
    builtin = {
        name
        for kind in (*KINDS, "checkpoint_format")
        for name in registry.names(kind)
        if registry.plugins[registry.owner[(kind, name)]].builtin
    }
    assert {"fastvithd", "timm", "mlp2x_gelu", "hf-causal-lm", "fast-vlm-hf", "none"} <= builtin
    found = {}
    for name, tree in core_modules().items():
        strings = {
            node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        if strings & builtin:
            found[name] = sorted(strings & builtin)
    assert not found, f"built-in component names in the core: {found}"


def test_core_imports_form_no_circle():
    graph = {
        name: {i for i in imports_of(tree) if i in core_modules() and i != name}
        for name, tree in core_modules().items()
        if name != "ablate.__init__"
    }
    cycles, done = [], set()

    def visit(node, path):  # depth first; each module is explored once, so this stays linear in the imports
        for child in graph.get(node, ()):
            if child in path:
                cycles.append(path[path.index(child) :] + [child])
            elif child in graph and child not in done:
                visit(child, path + [child])
        done.add(node)

    for start in graph:
        if start not in done:
            visit(start, [start])
    assert not cycles, f"import circles: {cycles[:3]}"
    package_imports = {name for name, tree in core_modules().items() if "ablate" in imports_of(tree)}
    assert not package_imports, (
        f"submodules importing the package itself (a circle through __init__): {package_imports}"
    )


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """ablate built as a wheel and installed (no dependencies) into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((root / "dist").glob("ablate-*.whl"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return root / "site"


def test_a_wheel_runs_a_preset_from_any_directory(wheel_install, tmp_path):
    """`ablate run tiny --count-only` from an unrelated folder, importing ablate from the wheel alone.

    `python -S` skips site-packages' .pth files, so this checkout's editable install is invisible; the dependencies
    (torch, timm, ...) come from site-packages on PYTHONPATH.
    """
    env = {"PYTHONPATH": f"{wheel_install}{':'}{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    where = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "import ablate, ablate_experiments; print(ablate.__file__); print(ablate_experiments.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(wheel_install)) for line in where.stdout.split()), where.stdout
    assert (wheel_install / "ablate_experiments" / "fastvlm-0.5b.yaml").is_file()
    run = subprocess.run(
        [sys.executable, "-S", "-m", "ablate.cli", "run", "tiny", "--count-only", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["visual_tokens"] == 4 and record["config"]["encoder"]["name"] == "fastvit-tiny"
    assert record["config"]["name"] == "tiny"
