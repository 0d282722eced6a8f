"""Third-party plugins end to end: the example package in examples/, and a broken plugin that must not break ablate.

The example (examples/ablate-example-encoder) is installed like any plugin package (`pip install -e
examples/ablate-example-encoder`, as CI does) and reaches ablate only through its `ablate` entry point.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, run_cli, run_cli_process

import ablate

EXAMPLE = REPO / "examples" / "ablate-example-encoder"


def table_rows(text: str) -> dict[str, list[str]]:
    """A rich table's rows by their first cell, each cell's wrapped lines joined back into one string."""
    rows: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if cells[0]:  # a new row; continuation lines of wrapped cells have an empty first cell
            current = rows[cells[0]] = cells
        elif current is not None:
            current[:] = [f"{old} {new}".strip() for old, new in zip(current, cells)]
    return rows


@pytest.fixture(scope="module", autouse=True)
def example_installed():
    if importlib.util.find_spec("ablate_example_encoder") is None:
        pytest.fail(f"the example plugin is not installed: pip install -e {EXAMPLE.relative_to(REPO)}")


# ------------------------------------------------------------------------------------------- example plugin


def test_example_is_listed_with_its_description():
    from ablate_example_encoder import PatchConvEncoder

    result = run_cli("list", "encoder")
    assert result.returncode == 0, result.stderr
    row = table_rows(result.stdout).get("example-patchconv")
    assert row is not None, result.stdout
    plugin, description, options = row[1:]
    assert plugin == "example-encoder"  # the entry-point name that registered it
    assert description == ablate.api.components.describe(PatchConvEncoder)
    assert "patch_size=8" in options


def test_example_passes_its_own_conformance_suite():
    """What the plugin's author runs in their own repository, with ablate.api.testing."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 10 and "failed" not in result.stdout, result.stdout[-2000:]


def test_example_builds_into_a_vlm_and_prefills():
    torch.manual_seed(0)
    vlm = ablate.build(TINY, ["encoder=example-patchconv", "encoder.image_size=64"])
    pixels = torch.rand(2, 3, 64, 64)
    ids = vlm.make_prompt(prompt_tokens=5, batch_size=2)
    with torch.no_grad():
        visual = vlm.visual_embeds(pixels)
        logits = vlm.prefill(pixels, ids)
    assert vlm.num_visual_tokens() == visual.shape[1] == (64 // 8) ** 2
    assert visual.shape == (2, 64, vlm.decoder.hidden_size)
    assert logits.shape == (2, vlm.decoder.vocab_size) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------- broken plugin


@pytest.fixture
def broken_env(tmp_path: Path) -> dict[str, str]:
    """An installed-looking distribution whose `ablate` entry point raises at import; env that puts it on the path."""
    (tmp_path / "broken_ablate_plugin.py").write_text('raise RuntimeError("broken on purpose")\n')
    dist_info = tmp_path / "broken_ablate_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-ablate-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[ablate]\nbroken-plugin = broken_ablate_plugin\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def test_broken_plugin_is_reported_not_fatal(broken_env):
    listing = run_cli_process("list", "encoder", env=broken_env)
    assert listing.returncode == 0, listing.stderr
    assert "example-patchconv" in listing.stdout and "timm" in listing.stdout  # the other plugins still load
    assert "broken-plugin" in listing.stderr and "ablate plugins" in listing.stderr

    plugins = run_cli_process("plugins", env=broken_env)
    assert plugins.returncode == 0, plugins.stderr
    rows = table_rows(plugins.stdout)
    _, module, version, registers, status = rows["broken-plugin"]
    assert (module, version, registers) == ("broken_ablate_plugin", "0.1", "-")
    assert status.startswith("error:") and "RuntimeError: broken on purpose" in status
    assert rows["example-encoder"][3:] == ["encoder example-patchconv", "ok"]


def test_strict_mode_fails_naming_the_plugin(broken_env):
    result = run_cli_process("list", env={**broken_env, "ABLATE_STRICT_PLUGINS": "1"})
    assert result.returncode != 0
    assert "broken-plugin" in result.stderr and "broken on purpose" in result.stderr
    assert "Traceback" not in result.stderr  # one paragraph, like every user-facing error


def test_ablate_plugins_selects_what_loads(broken_env):
    result = run_cli_process("plugins", env={**broken_env, "ABLATE_PLUGINS": "reducers"})
    assert result.returncode == 0, result.stderr
    # Only the selected plugin: the others, the broken one included, are not even imported.
    rows = {name: row[3:] for name, row in table_rows(result.stdout).items()}
    assert rows == {"reducers": ["reducer none, reducer random", "ok"]}
