"""The house rules, read from every import in the tree (lazy and TYPE_CHECKING ones included):

* no circle between modules;
* the core's wings import downwards only: api < config < model < measurement < grid, train < report < cli (grid and
  train are siblings and never import each other);
* the core imports no built-in plugin and names no built-in component;
* a built-in plugin imports only the public plugin API (the names `ablate.api` exports, as a third-party plugin
  does) and never another plugin's module; so leaving any one built-in plugin out breaks only the presets that
  name its components.

The checker is tested both ways: the tree passes, and the same tree with one forbidden import added fails, naming it.
A wheel carries the presets and installs under the distribution name.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from conftest import REPO

import ablate.api
from ablate.api.errors import UnknownComponentError
from ablate.api.hooks import KINDS
from ablate.api.registry import Registry, get_registry
from ablate.config.compose import load_config
from ablate.config.presets import preset_files
from ablate.version import DISTRIBUTION

# Top-level folders -> the import package they install as (pyproject's package-dir).
PACKAGES = {"ablate": "ablate", "plugins": "ablate_plugins", "experiments": "ablate_experiments"}
BUILTIN_PACKAGES = ("ablate_plugins", "ablate_experiments")
# The core's wings, lowest first; a module may import its own wing and the wings below it. Equal ranks are
# siblings that may not import each other.
WING_RANK = {"version": 0, "api": 1, "config": 2, "model": 3, "measurement": 4, "grid": 5, "train": 5, "report": 6}
TOP = ("ablate", "ablate.__main__", "ablate.cli")  # the package's lazy entry points and the CLI sit on top of all


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = [PACKAGES[relative.parts[0]], *relative.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def tree_sources() -> dict[str, str]:
    """Module name -> source of every module of the core and the built-in plugins and presets."""
    paths = [p for folder in PACKAGES for p in sorted((REPO / folder).rglob("*.py"))]
    return {module_name(path): path.read_text() for path in paths}


def imports(module: str, source: str, known: set[str]) -> set[tuple[str, tuple[str, ...]]]:
    """(imported module, names) of every import statement anywhere in the source; `from X import Y` of a known
    submodule X.Y counts as importing X.Y."""
    package = module if module + ".__init__" in known or any(k.startswith(module + ".") for k in known) else None
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: from the module's package
                base = (package or module.rpartition(".")[0]).split(".")
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            names = tuple(alias.name for alias in node.names)
            submodules = {f"{target}.{name}" for name in names} & known
            found.update((sub, ()) for sub in submodules)
            rest = tuple(name for name in names if f"{target}.{name}" not in known)
            if rest or not submodules:
                found.add((target, rest))
    return found


def wing(module: str) -> str | None:
    """The core wing of a module ('api', 'config', ...), 'top' for the entry points, None outside the core."""
    if module in TOP or module.startswith("ablate.cli."):
        return "top"
    parts = module.split(".")
    return parts[1] if parts[0] == "ablate" and len(parts) > 1 else None


@functools.cache
def plugin_owners() -> dict[str, str]:
    """Entry-point module of each built-in plugin -> its entry-point name (pyproject.toml)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {value.partition(":")[0]: name for name, value in project["entry-points"]["ablate"].items()}


def owner(module: str) -> str | None:
    """The built-in plugin a module belongs to: the entry point naming it or a package above it."""
    for entry, name in plugin_owners().items():
        if module == entry or module.startswith(entry + "."):
            return name
    return None


def violations(sources: dict[str, str]) -> list[str]:
    """Every breach of the house rules in `sources` (module name -> source), one sentence each."""
    known = set(sources)
    graph: dict[str, set[str]] = {}
    found = []
    public = set(ablate.api.__all__)
    for module, source in sources.items():
        edges = imports(module, source, known)
        graph[module] = {target for target, _ in edges if target in known and target != module}
        # `ablate.api` imports its names lazily: `from ablate.api import X` reaches the module that defines X.
        graph[module] |= {
            f"ablate.api.{ablate.api._EXPORTS[name][0]}"
            for target, names in edges
            if target == "ablate.api"
            for name in names
            if name in ablate.api._EXPORTS
        } - {module}
        here = wing(module)
        for target, names in sorted(edges):
            root = target.split(".")[0]
            if module.split(".")[0] in BUILTIN_PACKAGES:  # a built-in plugin, or the presets
                if root == "ablate" and (target != "ablate.api" or not set(names) <= public):
                    found.append(f"plugin module {module} imports {target} {list(names)}: only ablate.api's exports")
                if root in BUILTIN_PACKAGES and owner(target) != owner(module):
                    found.append(f"plugin module {module} imports another plugin's module {target}")
                continue
            if root in BUILTIN_PACKAGES:
                found.append(f"core module {module} imports the built-in plugin module {target}")
            there = wing(target) if root == "ablate" else None
            if here is None or there is None or here == "top" or there == here:
                continue
            if (
                there == "top"
                or WING_RANK[there] > WING_RANK[here]
                or (WING_RANK[there] == WING_RANK[here] and there != here)
            ):
                found.append(f"{module} (wing {here}) imports {target} (wing {there}), which is not below it")
    found += [f"import circle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Circles of a module graph: depth first, each module explored once (linear in the imports)."""
    found, done = [], set()

    def visit(node, path):
        for child in sorted(graph.get(node, ())):
            if child in path:
                found.append(path[path.index(child) :] + [child])
            elif child not in done:
                visit(child, path + [child])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


# ------------------------------------------------------------------------------------------------ the rules


def test_the_tree_keeps_every_rule():
    assert violations(tree_sources()) == []


def with_import(module: str, line: str) -> dict[str, str]:
    sources = dict(tree_sources())
    sources[module] = line + "\n" + sources[module]
    return sources


@pytest.mark.parametrize(
    "module, line, expected",
    [
        ("ablate.api.components", "from ablate.model.vlm import VLM", "wing api) imports ablate.model.vlm"),
        ("ablate.grid.store", "from ablate.train.loop import train", "wing grid) imports ablate.train.loop"),
        ("ablate.config.compose", "def f():\n    from ablate.cli import main", "imports ablate.cli"),
        ("ablate.measurement.timing", "from ablate.measurement.measure import measure", "import circle"),
        ("ablate.api.errors", "from ablate.api import StageContext", "import circle"),
        ("ablate.model.vlm", "import ablate_plugins.encoders.fastvit", "imports the built-in plugin module"),
        ("ablate_plugins.reducers.visionzip", "from ablate.api.registry import get_registry", "only ablate.api"),
        ("ablate_plugins.reducers.visionzip", "from ablate.api import get_registry", "only ablate.api"),
        (
            "ablate_plugins.checkpoints.llava",
            "from ablate_plugins.checkpoints.fastvlm import TIED_HINT",
            "another plugin's module",
        ),
        ("ablate_experiments", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ablate.cli", "only"),
    ],
)
def test_a_forbidden_import_is_caught(module, line, expected):
    found = violations(with_import(module, line))
    assert any(expected in sentence and module in sentence for sentence in found), found


# Strings of the core that happen to spell a built-in component's name but mean something else.
HOMONYMS = {
    "ablate.train.data.synth": {"random"},  # `ablate data synth --position random`, not the reducer
    "ablate.report.plots": {"none"},  # matplotlib's "no colour" and "no line", not the reducer
}


def test_core_names_no_builtin_component():
    """No string in ablate/ is the name of a built-in component, checkpoint format or runtime (plugins own their
    names; `torch`, the core's own runtime, is no plugin's)."""
    registry = get_registry()
    builtin = {
        name
        for kind in (*KINDS, "checkpoint_format", "runtime")
        for name in registry.names(kind)
        if registry.plugins[registry.owner[(kind, name)]].builtin
    }
    assert {"fastvithd", "timm", "mlp2x_gelu", "hf-causal-lm", "fast-vlm-hf", "none", "onnxruntime"} <= builtin
    found = {}
    for module, source in tree_sources().items():
        if module.split(".")[0] != "ablate":
            continue
        strings = {
            node.value
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        strings -= HOMONYMS.get(module, set())
        if strings & builtin:
            found[module] = sorted(strings & builtin)
    assert not found, f"built-in component names in the core: {found}"


@functools.cache
def builtin_plugins() -> list[str]:
    return sorted(plugin_owners().values())


@pytest.mark.parametrize("left_out", builtin_plugins())
def test_leaving_out_one_builtin_plugin_breaks_only_its_own_presets(left_out):
    """Every other built-in loads without it (none imports it), and every preset that names none of its
    components still resolves; the presets that do fail by naming the missing component."""
    full = get_registry()
    registry = Registry()
    registry.load_entry_points(only=set(builtin_plugins()) - {left_out}, strict=True)
    own = {(kind, name) for kind, name in full.plugins[left_out].components if kind != "preset_folder"}
    if left_out == "presets":  # without the presets plugin there are no presets to break
        assert not registry.preset_folders
        return
    for preset in preset_files(full):
        config = load_config(preset).to_dict()
        named = {(kind, config[kind]["name"]) for kind in KINDS}
        named |= {("encoder", config["encoder"]["tile"]["name"])} if "tile" in config["encoder"] else set()
        names_it = bool(named & own)
        try:
            load_config(preset, registry=registry)
            resolved = True
        except UnknownComponentError:
            resolved = False
        assert resolved != names_it, f"preset {preset} with {left_out} left out: resolved={resolved}"


# ------------------------------------------------------------------------------------------------ the wheel


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """ablate built as a wheel and installed (no dependencies) into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((root / "dist").glob("ablate_vlm-*.whl"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(root / "site"), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return root / "site"


def test_a_wheel_installs_under_its_name_and_runs_a_preset_from_any_directory(wheel_install, tmp_path):
    """`ablate run tiny --count-only` from an unrelated folder, importing ablate from the wheel alone.

    `python -S` skips site-packages' .pth files, so this checkout's editable install is invisible; the dependencies
    (torch, timm, ...) come from site-packages on PYTHONPATH.
    """
    metadata = next(wheel_install.glob("ablate_vlm-*.dist-info")) / "METADATA"
    assert re.search(rf"^Name: {DISTRIBUTION}$", metadata.read_text(), re.M)
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
    for shipped in ("fastvlm-0.5b.yaml", "grids/fastvlm-resolution.yaml", "claims/fastvlm.yaml", "stages/stage1.yaml"):
        assert (wheel_install / "ablate_experiments" / shipped).is_file(), shipped
    run = subprocess.run(
        [sys.executable, "-S", "-m", "ablate", "run", "tiny", "--count-only", "--json"],
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
    assert record["env"]["libraries"]["torch"]  # the dependencies are read from the installed distribution
