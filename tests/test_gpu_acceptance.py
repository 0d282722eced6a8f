"""benchmarks/gpu_acceptance.py, tried here: its smoke run on the CPU writes every section, each with figures, an
error or a reason; a section that raises is recorded as an error and the rest still run; the device command fits.

The smoke run is a subprocess of the real script (tiny models, eager mode only: the compiled modes would add
minutes); it is what a session with a lent GPU runs at full size.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_acceptance  # noqa: E402 - a script's module, importable once benchmarks/ is on the path

SMOKE_MODELS = (gpu_acceptance.SMOKE["fastvlm"][0], gpu_acceptance.SMOKE["llava"][0])
FIGURES = {  # what an ok section of each kind must hold
    "gpu_tests": ("counts", "tests", "returncode"),
    "measure": ("ttft_ms", "stage_ms", "stage_sum_over_ttft", "measured_over_floor", "deviation_from_eager", "ran"),
    "overhead": ("hand", "toolkit", "toolkit_over_hand", "relative_logit_difference", "used"),
    "profile": ("top", "mode"),
    "grid": ("cells", "command"),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "x.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_acceptance.py", "--smoke", "--modes", "eager", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_the_smoke_run_writes_every_section_with_figures_an_error_or_a_reason(smoke):
    data, printed = smoke
    assert data["smoke"] is True and data["environment"]["libraries"]
    fastvlm, llava = SMOKE_MODELS
    expected = {"gpu_tests", f"profile/{fastvlm}", "grid"}
    expected |= {f"measure/{model}/{mode}" for model in (fastvlm, llava) for mode in gpu_acceptance.MODES}
    expected |= {f"overhead/{fastvlm}/{mode}" for mode in gpu_acceptance.MODES}
    assert set(data["sections"]) == expected
    for name, section in data["sections"].items():
        status = section["status"]
        if status == "ok":
            # deviation_from_eager is None in eager mode by design; every other figure is there
            missing = [key for key in FIGURES[name.split("/")[0]] if section.get(key) is None]
            missing = [key for key in missing if not (key == "deviation_from_eager" and name.endswith("/eager"))]
            assert not missing, (name, missing)
        elif status == "error":
            assert section["error"]["type"] and section["error"]["message"] and section["error"]["traceback"], name
        else:
            assert status == "skipped" and section["reason"], name
        assert name in printed  # the summary names every section
    # What this CPU can run, ran; what it cannot, says why.
    for name in (f"measure/{fastvlm}/eager", f"measure/{llava}/eager", f"overhead/{fastvlm}/eager", "grid"):
        assert data["sections"][name]["status"] == "ok", data["sections"][name].get("error")
    assert data["sections"][f"measure/{fastvlm}/compile"]["reason"] == "not in --modes"
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in data["sections"][f"overhead/{fastvlm}/cudagraph"]["reason"]


def test_the_smoke_figures_are_the_records(smoke):
    data, _ = smoke
    section = data["sections"][f"measure/{SMOKE_MODELS[1]}/eager"]
    record = section["record"]
    assert record["config"]["encoder"]["name"] == "anyres" and record["error"] is None
    assert section["ttft_ms"] == record["latency_ms"]["ttft"] > 0
    assert section["stage_sum_over_ttft"] == pytest.approx(
        record["latency_ms"]["stage_sum"] / record["latency_ms"]["ttft"]
    )
    assert section["ran"]["mode"] == "eager" and section["ran"]["timer"] == "perf_counter"
    assert set(section["measured_over_floor"]) == {"encoder", "reducer", "connector", "prefill", "ttft"}
    tests = data["sections"]["gpu_tests"]
    names = [test["name"] for test in tests["tests"]]
    assert any("test_cudagraph_captures_every_stage" in name for name in names)  # selected by -m gpu
    gpu_check = data["checks"][0]
    assert gpu_check["name"].startswith("GPU tests pass") and gpu_check["passed"] == torch.cuda.is_available()
    cells = data["sections"]["grid"]["cells"]
    assert len(cells) == 2 and all(cell["status"] == "ok" and cell["ttft_ms"] > 0 for cell in cells)
    decode = data["sections"][f"measure/{SMOKE_MODELS[0]}/eager"]["decode"]
    assert decode["mode"] == "eager" and decode["per_token_ms"] > 0 and decode["predicted_over_measured"] > 0
    assert data["sections"][f"measure/{SMOKE_MODELS[1]}/eager"]["decode"] is None  # LLaVA: TTFT only


def test_a_section_that_raises_is_recorded_and_the_next_still_runs(tmp_path):
    out = tmp_path / "x.json"
    args = gpu_acceptance.argparse.Namespace(smoke=True, out=str(out), budget_s=60.0, sections=None, modes=["eager"])
    acceptance = gpu_acceptance.Acceptance(args, gpu_acceptance.SMOKE)

    def broken():
        raise ValueError("the encoder exploded")

    acceptance.run("first", 1, broken)
    written = json.loads(out.read_text())["sections"]["first"]  # on disk at once, before the next section
    assert written["status"] == "error" and written["error"]["type"] == "ValueError"
    assert written["error"]["message"] == "the encoder exploded" and "broken" in written["error"]["traceback"]
    acceptance.run("second", 1, lambda: {"ttft_ms": 1.0})
    acceptance.run("third", 10_000, lambda: {"ttft_ms": 1.0})  # more than the budget left
    sections = json.loads(out.read_text())["sections"]
    assert sections["second"]["status"] == "ok" and sections["second"]["ttft_ms"] == 1.0
    assert sections["third"]["status"] == "skipped" and sections["third"]["reason"].startswith("time budget")


def test_the_device_command_fits_and_the_readme_gives_it_verbatim():
    command = gpu_acceptance.DEVICE_COMMAND
    assert len(command) < 2000 and "--target /tmp/site" in command and "$OUT/gpu_acceptance.json" in command
    assert command in (REPO / "README.md").read_text()
    printed = subprocess.run(
        [sys.executable, "benchmarks/gpu_acceptance.py", "--device-command"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert printed.stdout.strip() == command
