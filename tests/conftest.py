"""Shared helpers: the tiny preset's name, and two ways to run the real CLI: in this process (fast: no interpreter
start, no second torch import) and in a fresh one (for what only a new process shows: plugins installed through
PYTHONPATH, signals, tracebacks on the terminal)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = "tiny"  # experiments/tiny.yaml: tiny FastViT-style encoder + tiny Qwen2


@dataclass
class CliResult:
    """What a CLI call left: as subprocess.CompletedProcess has it."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    """`ablate ARGS` through `ablate.cli.main`, in this process, stdout and stderr captured."""
    from ablate.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return CliResult(code, stdout.getvalue(), stderr.getvalue())


def run_cli_process(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`ablate ARGS` as a user runs it: a fresh process, real entry points."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ablate", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def install_plugin(folder: Path, module: str, source: str, entry_point: str) -> dict[str, str]:
    """A plugin module plus a dist-info that makes it an installed `ablate` entry point; returns the env to use it."""
    (folder / f"{module}.py").write_text(source)
    dist_info = folder / f"{module}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[ablate]\n{entry_point} = {module}\n")
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p),
        "ABLATE_LOG_DIR": str(folder / "logs"),
    }


def run_json(*args: str) -> dict:
    result = run_cli("run", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
