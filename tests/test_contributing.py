"""CONTRIBUTING.md's plugin walk-through, literally: its file blocks written to a folder, the package built and
installed, and its commands run as written (its ABLATE_PLUGINS line included), its conformance tests passing."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from conftest import REPO

FILE_BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```", re.S)
COMMANDS_BLOCK = re.compile(r"<!-- commands: [^>]*-->\n```bash\n(?P<body>.*?)```", re.S)


def test_the_walk_through_builds_installs_and_passes_its_own_tests(tmp_path):
    text = (REPO / "CONTRIBUTING.md").read_text()
    files = FILE_BLOCK.findall(text)
    assert {path for path, _ in files} == {
        "ablate-my-encoder/pyproject.toml",
        "ablate-my-encoder/ablate_my_encoder/__init__.py",
        "ablate-my-encoder/tests/test_my_encoder.py",
    }
    for path, body in files:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    (commands,) = COMMANDS_BLOCK.findall(text)
    site = tmp_path / "site"  # installed here, not into the suite's own environment
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    outputs = []
    for line in filter(None, (line.strip() for line in commands.splitlines())):
        words = shlex.split(line)
        env = dict(base_env)
        while "=" in words[0] and not words[0].startswith("-"):  # VAR=value before the command
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        program, args = words[0], words[1:]
        if program == "pip":  # `pip install -e DIR`: the same package, built and installed into `site`
            assert args[:2] == ["install", "-e"], line
            argv = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
            argv += ["--target", str(site), args[2]]
        elif program == "ablate":
            argv = [sys.executable, "-m", "ablate", *args]
        else:
            assert program == "python", line
            argv = [sys.executable, *args]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"`{line}` failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs.append((line, result.stdout))
    listing = next(out for line, out in outputs if line == "ablate list encoder")
    assert "my-encoder" in listing and "A strided Conv2d patchifier" in listing
    tests = next(out for line, out in outputs if "pytest" in line)
    assert re.search(r"\d+ passed", tests) and "failed" not in tests
