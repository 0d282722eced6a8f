"""GPU acceptance (issue 20): every GPU path of the toolkit run once on a lent GPU, in one call, into one JSON file.

Sections, each guarded (one that raises is recorded with its error and the rest still run) and each skipped with a
recorded reason once the time budget (--budget-s) runs low; the JSON file is rewritten after every section, so a
call killed at its limit still leaves what ran:

    gpu_tests                    the GPU-marked tests (`pytest -m gpu tests`): passed / skipped / failed
    measure/PRESET/MODE          ablate.measure in eager, cudagraph and compile mode, bfloat16: TTFT, each stage,
                                 stage sum / TTFT, measured / roofline floor per stage, numerical deviation from
                                 eager per stage, speed-up over eager per stage, what ran and the fallbacks;
                                 FastVLM's also decode 32 tokens (per token, end to end, the step's mode)
    overhead/fastvlm-0.5b/MODE   the toolkit's TTFT against the hand-written one (benchmarks/hand.py: timm +
                                 transformers, the whole TTFT in one CUDA graph in cudagraph mode), alternating,
                                 timed by CUDA events (benchmarks/toolkit_overhead.compare)
    profile/fastvlm-0.5b         the top kernels per stage of the cudagraph run (what holds TTFT back)
    grid                         `ablate grid tiny ... --device cuda --workers 2`: cells in worker processes
    checks                       the issue's acceptance figures, each with its target and whether it was met

Full run (a CUDA GPU; FastVLM-0.5B at 1024 px, LLaVA-OneVision-0.5B at 1152 px, bfloat16):

    python benchmarks/gpu_acceptance.py --out $OUT/gpu_acceptance.json

Smoke run (the CPU, the tiny preset and a tiny LLaVA-OneVision, a minute or two; its figures mean nothing):

    python benchmarks/gpu_acceptance.py --smoke --modes eager cudagraph --out /tmp/gpu_acceptance.json

On the lent device machine (the device tool's README says how calls, `carry` and $OUT work): it has torch, timm,
transformers, pluggy, rich, pyyaml, safetensors, pillow and pytest, but not omegaconf (wandb is imported only when
logging to W&B). Here, once, in the repository's root (the wheel is pure Python, about 250 kB):

    grep -qx /.whl/ .git/info/exclude || echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 -d .whl omegaconf==2.4.0

Then one `run` with carry [".whl"] and a timeout_s of 450 (the script's budget is 360 s, pip takes 20 s), whose
command is DEVICE_COMMAND below (`python benchmarks/gpu_acceptance.py --device-command` prints it on one line):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 -m pip install -q --no-index \\
        --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit; set -o pipefail; \\
        python3 benchmarks/gpu_acceptance.py --out $OUT/gpu_acceptance.json 2>&1 | tee $OUT/gpu_acceptance.log

The second pip command installs this working tree itself (not editable) into /tmp/site: the plugins are found
through the `ablate` entry points of its dist-info, and `plugins/` becomes the `ablate_plugins` package, which no
PYTHONPATH entry alone gives. It builds with the machine's setuptools (68 or later needed); should that be older,
carry a newer setuptools wheel in .whl too: PYTHONPATH is set before the build, so the build uses that one.

A second call, for what the first skipped or what failed after a fix: the same command with `--sections` (fnmatch
patterns, e.g. `--sections 'measure/*/compile' 'overhead/*'`) and a smaller `--budget-s`, to another --out file.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from report import environment
from toolkit_overhead import compare

import ablate

REPO = Path(__file__).resolve().parent.parent
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    ".whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 -m pip install -q --no-index "
    "--no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit; set -o pipefail; "
    "python3 benchmarks/gpu_acceptance.py --out $OUT/gpu_acceptance.json 2>&1 | tee $OUT/gpu_acceptance.log"
)
MODES = ("eager", "cudagraph", "compile")  # cudagraph before compile: it is the acceptance figure, compile the slow one
STAGES = ("encoder", "reducer", "connector", "prefill")

# What each run measures. LLaVA-OneVision in the smoke run: the same anyres path with tiny ViT tiles and a tiny LLM.
FULL = {
    "device": "cuda",
    "dtype": "bfloat16",
    "repeats": 20,
    "warmup": 3,
    "overhead_repeats": 30,
    "fastvlm": ("fastvlm-0.5b", 1024, []),
    "max_new_tokens": 32,  # FastVLM's runs decode too: time per output token, the step a graph replay in cudagraph
    "llava": ("llava-onevision-0.5b", 1152, []),
    "grid": ["tiny", "encoder.image_size=64,128", "--device", "cuda", "--workers", "2", "--dtype", "bfloat16"],
}
SMOKE = {
    "device": "cpu",
    "dtype": "bfloat16",
    "repeats": 2,
    "warmup": 1,
    "overhead_repeats": 2,
    "fastvlm": ("tiny", 128, []),
    "max_new_tokens": 4,
    "llava": (
        "llava-onevision-0.5b",
        96,
        [
            "encoder.tile.name=timm",
            "encoder.tile.model_name=vit_tiny_patch16_224",
            "encoder.tile.image_size=32",
            "decoder.arch=qwen2-tiny",
        ],
    ),
    "grid": ["tiny", "encoder.image_size=64,128", "--device", "cpu", "--workers", "2"],
}

# Rough seconds each section takes on the H200 (smoke: a fraction); a section starts only with this much budget left.
ESTIMATE_S = {"gpu_tests": 60, "eager": 30, "cudagraph": 40, "compile": 150, "profile": 40, "grid": 45}


class Acceptance:
    """The sections run so far and the file they are written to."""

    def __init__(self, args: argparse.Namespace, plan: dict[str, Any]):
        self.args, self.plan = args, plan
        self.out = Path(args.out)
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "benchmark": "gpu_acceptance",
            "smoke": args.smoke,
            "args": vars(args),
            "plan": plan,
            "environment": None,
            "sections": {},
            "checks": [],
        }

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def run(self, name: str, estimate_s: float, body: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one section and record it: ok with its figures, error with the exception, or skipped with why."""
        if self.args.sections and not any(fnmatch.fnmatch(name, pattern) for pattern in self.args.sections):
            return self._record(name, {"status": "skipped", "reason": "not selected by --sections"})
        estimate_s = estimate_s * (0.2 if self.args.smoke else 1.0)
        if self.left_s() < estimate_s:
            reason = (
                f"time budget: {self.left_s():.0f} s of {self.args.budget_s:.0f} s left, this needs ~{estimate_s:.0f} s"
            )
            return self._record(name, {"status": "skipped", "reason": reason})
        print(f"[{time.monotonic() - self.started:5.0f} s] {name} ...", flush=True)
        start = time.monotonic()
        try:
            result = {"status": "ok", **body()}
        except Exception as exc:  # noqa: BLE001 - recorded, and the next section runs
            result = {"status": "error", "error": {"type": type(exc).__name__, "message": str(exc)}}
            result["error"]["traceback"] = traceback.format_exc(limit=12)
            partial = getattr(exc, "record", None)  # an AblateError carries what was measured before it
            if partial is not None:
                result["record"] = partial.to_dict()
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        result["seconds"] = round(time.monotonic() - start, 1)
        return self._record(name, result)

    def skip(self, name: str, reason: str) -> None:
        self._record(name, {"status": "skipped", "reason": reason})

    def _record(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
        self.data["sections"][name] = result
        self.write()
        return result

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        partial.replace(self.out)  # never a half-written file, even if the call is killed


# ---------------------------------------------------------------------------------------------- sections


def gpu_tests() -> dict[str, Any]:
    """`pytest -m gpu tests` in a fresh process; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
        done = subprocess.run([*command, f"--junitxml={junit}"], cwd=REPO, capture_output=True, text=True, timeout=300)
        tests, modules_skipped = [], []
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            detail = next((child.get("message") for child in case if child.tag == outcome), None)
            if outcome == "skipped" and not case.get("classname"):  # a module skipped whole (optional package missing)
                modules_skipped.append({"module": case.get("name"), "detail": detail})
                continue
            tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "detail": detail})
    counts = {
        outcome: sum(t["outcome"] == outcome for t in tests) for outcome in ("passed", "skipped", "failure", "error")
    }
    return {
        "command": " ".join(command),
        "returncode": done.returncode,
        "counts": counts,
        "tests": tests,
        "modules_skipped": modules_skipped,
        "output_tail": (done.stdout + done.stderr)[-3000:],
    }


def measure_section(preset: str, image_size: int, overrides: list[str], mode: str, plan: dict[str, Any], **more):
    record = ablate.measure(
        preset,
        [f"encoder.image_size={image_size}", *overrides],
        device=plan["device"],
        dtype=plan["dtype"],
        mode=mode,
        repeats=plan["repeats"],
        warmup=plan["warmup"],
        **more,
    ).to_dict()
    latency, execution, roofline = record["latency_ms"], record["execution"], record["roofline"]["stages"]
    return {
        "ttft_ms": latency["ttft"],
        "stage_ms": {stage: latency.get(stage) for stage in STAGES},
        "stage_sum_over_ttft": latency["stage_sum"] / latency["ttft"],
        "floor_ms": {stage: figures["floor_ms"] for stage, figures in roofline.items()},
        "measured_over_floor": {stage: figures["measured_over_floor"] for stage, figures in roofline.items()},
        "launch_bound": {stage: figures["launch_bound"] for stage, figures in roofline.items()},
        "deviation_from_eager": execution["deviation_from_eager"],
        "ran": {
            "mode": execution["used"]["mode"],
            "stages": execution["stages"],
            "ttft": execution["ttft"],
            "timer": execution["timer"],
            "fallbacks": execution["fallbacks"],
        },
        "peak_memory_mb": record["peak_memory_mb"],
        "decode": decode_figures(record),
        "record": record,
    }


def decode_figures(record: dict[str, Any]) -> dict[str, Any] | None:
    """With run.max_new_tokens: how the steps ran, per token and end to end against TTFT + steps x per token."""
    decode = record["decode"]
    if decode is None:
        return None
    measured, predicted = decode["end_to_end_ms"]["median"], decode["predicted_end_to_end_ms"]
    step = record["roofline"]["stages"].get("decode_step") or {}
    return {
        "mode": decode["mode"],
        "cache": decode["cache"],
        "deviation_from_eager": decode["deviation_from_eager"],
        "per_token_ms": decode["per_token_ms"]["median"],
        "end_to_end_ms": measured,
        "predicted_over_measured": predicted / measured if predicted and measured else None,
        "step_over_floor": step.get("measured_over_floor"),
        "output_tokens_per_s": record["throughput"]["output_tokens_per_s"],
    }


def speedups_over_eager(sections: dict[str, Any], prefix: str) -> None:
    """Add eager ms / this mode's ms per stage and for TTFT to each mode's section of one model."""
    eager = sections.get(f"{prefix}/eager", {})
    if eager.get("status") != "ok":
        return
    for mode in MODES[1:]:
        section = sections.get(f"{prefix}/{mode}", {})
        if section.get("status") == "ok":
            pairs = {**{s: (eager["stage_ms"][s], section["stage_ms"][s]) for s in STAGES}}
            pairs["ttft"] = (eager["ttft_ms"], section["ttft_ms"])
            section["speedup_over_eager"] = {s: (a / b if a and b else None) for s, (a, b) in pairs.items()}


def overhead_section(preset: str, image_size: int, mode: str, plan: dict[str, Any]) -> dict[str, Any]:
    return compare(
        preset,
        image_size,
        mode,
        dtype=plan["dtype"],
        device=plan["device"],
        repeats=plan["overhead_repeats"],
        clock="cuda" if plan["device"] == "cuda" else "wall",
    )


def profile_section(preset: str, image_size: int, overrides: list[str], mode: str, plan: dict[str, Any]):
    with tempfile.TemporaryDirectory() as folder:  # the trace itself is large; the top kernels are the figures
        figures = measure_section(preset, image_size, overrides, mode, plan, profile=str(Path(folder) / "t.json"))
    return {"mode": mode, "top": figures["record"]["profile"]["top"], "ttft_ms": figures["ttft_ms"]}


def grid_section(arguments: list[str], plan: dict[str, Any]) -> dict[str, Any]:
    from ablate.grid.store import Store

    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "grid.db"
        command = [sys.executable, "-m", "ablate", "grid", *arguments, "--repeats", "2", "--db", str(db)]
        env = {**os.environ, "ABLATE_LOG_DIR": folder}
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        rows = Store(db, create=False).rows() if db.exists() else []
    cells = [
        {
            "label": row.label,
            "status": row.status,
            "ttft_ms": (row.record.get("latency_ms") or {}).get("ttft"),
            "peak_memory_mb": row.record.get("peak_memory_mb"),
            "device": (row.record.get("run") or {}).get("device"),
            "error": row.record.get("error"),
        }
        for row in rows
    ]
    if done.returncode != 0:
        raise RuntimeError(f"ablate grid exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    return {"command": " ".join(command[1:]), "returncode": done.returncode, "cells": cells}


# -------------------------------------------------------------------------------------------------- checks


def checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's acceptance figures; `passed` is None where the section behind one did not run."""
    sections = data["sections"]

    def ok(name: str) -> dict[str, Any] | None:
        section = sections.get(name, {})
        return section if section.get("status") == "ok" else None

    found: list[dict[str, Any]] = []

    def check(name: str, target: str, value: Any, passed: bool | None) -> None:
        found.append({"name": name, "target": target, "value": value, "passed": passed})

    tests = ok("gpu_tests")
    counts = tests["counts"] if tests else None
    check(
        "GPU tests pass and none is skipped",
        "passed > 0, skipped == failure == error == 0",
        counts,
        None
        if counts is None
        else counts["passed"] > 0 and counts["skipped"] + counts["failure"] + counts["error"] == 0,
    )
    fastvlm = data["plan"]["fastvlm"][0]
    for model in (fastvlm, data["plan"]["llava"][0]):
        for mode in MODES:
            section = ok(f"measure/{model}/{mode}")
            check(
                f"{model} {mode}: ran in the mode asked, no fallback",
                f"used mode == {mode}, fallbacks == []",
                section and section["ran"],
                None if section is None else section["ran"]["mode"] == mode and not section["ran"]["fallbacks"],
            )
    graphed = ok(f"measure/{fastvlm}/cudagraph")
    decode = graphed and graphed["decode"]
    check(
        f"{fastvlm} cudagraph: the decoding step is a graph replay, TTFT + steps x per token predicts end to end",
        "decode.mode == cudagraph, predicted / measured within 10%",
        decode,
        None if not decode else decode["mode"] == "cudagraph" and abs(decode["predicted_over_measured"] - 1) <= 0.1,
    )
    ratio = graphed and graphed["stage_sum_over_ttft"]
    check(f"{fastvlm} cudagraph: stage sum vs TTFT", "within 5%", ratio, None if not ratio else abs(ratio - 1) <= 0.05)
    overhead = ok(f"overhead/{fastvlm}/cudagraph")
    ratio = overhead and overhead["toolkit_over_hand"]["median"]
    check(
        f"{fastvlm} cudagraph: toolkit / hand-written TTFT",
        "0.97-1.03",
        ratio,
        None if not ratio else 0.97 <= ratio <= 1.03,
    )
    for mode in MODES:
        section = ok(f"overhead/{fastvlm}/{mode}")
        check(
            f"{fastvlm} {mode}: toolkit and hand-written logits agree",
            "relative difference < 1e-4 (float32), 3e-2 (bfloat16)",
            section and section["relative_logit_difference"],
            section and section["logits_agree"],
        )
    best = {mode: ok(f"measure/{fastvlm}/{mode}") for mode in MODES}
    best = {mode: section["ttft_ms"] for mode, section in best.items() if section}
    fastest = min(best, key=best.get) if best else None
    check(
        f"{fastvlm}: the best mode's TTFT",
        "<= 6 ms (H200)",
        {"mode": fastest, "ttft_ms": best[fastest]} if fastest else None,
        None if fastest is None else best[fastest] <= 6.0,
    )
    return found


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the CPU and tiny models: checks the script, not a GPU")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_acceptance.json"))
    parser.add_argument("--budget-s", type=float, default=360.0, help="no section starts past this (seconds)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--sections", nargs="+", help="fnmatch patterns of the sections to run (default: all)")
    parser.add_argument("--device-command", action="store_true", help="print the device machine's command and exit")
    args = parser.parse_args()
    if args.device_command:
        return print(DEVICE_COMMAND)
    plan = SMOKE if args.smoke else FULL
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "gpu_acceptance.py: no CUDA GPU here; run with --smoke on a CPU.\n")

    acceptance = Acceptance(args, plan)
    acceptance.data["environment"] = environment(plan["device"])
    sections = acceptance.data["sections"]
    (fastvlm, fastvlm_size, fastvlm_overrides), (llava, llava_size, llava_overrides) = plan["fastvlm"], plan["llava"]

    def measure(model, size, overrides, mode):
        name = f"measure/{model}/{mode}"
        if mode not in args.modes:
            return acceptance.skip(name, "not in --modes")
        more = {"max_new_tokens": plan["max_new_tokens"]} if model == fastvlm else {}
        acceptance.run(name, ESTIMATE_S[mode], lambda: measure_section(model, size, overrides, mode, plan, **more))
        speedups_over_eager(sections, f"measure/{model}")

    def overhead(mode):
        name = f"overhead/{fastvlm}/{mode}"
        if mode == "cudagraph" and plan["device"] != "cuda":
            return acceptance.skip(name, "the hand-written CUDA graph needs a CUDA GPU")
        if mode not in args.modes:
            return acceptance.skip(name, "not in --modes")
        acceptance.run(name, ESTIMATE_S[mode] * 1.5, lambda: overhead_section(fastvlm, fastvlm_size, mode, plan))

    # Most important first, so that a low budget drops the least: the tests, the acceptance figures (cudagraph),
    # the compile mode (its compilation takes the longest), what holds TTFT back; then the rest.
    acceptance.run("gpu_tests", ESTIMATE_S["gpu_tests"], gpu_tests)
    for mode in ("eager", "cudagraph"):
        measure(fastvlm, fastvlm_size, fastvlm_overrides, mode)
    overhead("cudagraph")
    for mode in ("eager", "cudagraph"):
        measure(llava, llava_size, llava_overrides, mode)
    measure(fastvlm, fastvlm_size, fastvlm_overrides, "compile")
    profile_mode = "cudagraph" if plan["device"] == "cuda" else "eager"
    acceptance.run(
        f"profile/{fastvlm}",
        ESTIMATE_S["profile"],
        lambda: profile_section(fastvlm, fastvlm_size, fastvlm_overrides, profile_mode, plan),
    )
    measure(llava, llava_size, llava_overrides, "compile")
    acceptance.run("grid", ESTIMATE_S["grid"], lambda: grid_section(plan["grid"], plan))
    overhead("eager")
    overhead("compile")

    acceptance.data["checks"] = checks(acceptance.data)
    acceptance.write()
    summarize(acceptance.data)
    print(f"wrote {acceptance.out}")


def summarize(data: dict[str, Any]) -> None:
    print(f"\n{'smoke run (CPU, tiny models): the figures mean nothing' if data['smoke'] else 'GPU acceptance'}")
    print(f"{data['environment']['device']}, torch {torch.__version__}, {data['elapsed_s']:.0f} s")
    for name, section in data["sections"].items():
        status = section["status"]
        if status == "skipped":
            detail = section["reason"]
        elif status == "error":
            detail = f"{section['error']['type']}: {section['error']['message'][:160]}"
        elif "ttft_ms" in section and "ran" in section:
            detail = (
                f"TTFT {section['ttft_ms']:.2f} ms, stage sum/TTFT {section['stage_sum_over_ttft']:.3f}, "
                f"x floor {section['measured_over_floor']['ttft']:.1f}, ran {section['ran']['mode']}"
                + (f" ({len(section['ran']['fallbacks'])} fallbacks)" if section["ran"]["fallbacks"] else "")
            )
        elif "toolkit_over_hand" in section:
            ratio = section["toolkit_over_hand"]
            detail = (
                f"hand {section['hand']['median_ms']:.2f} ms, toolkit {section['toolkit']['median_ms']:.2f} ms, "
                f"toolkit/hand {ratio['median']:.3f} (IQR {ratio['iqr']:.3f})"
            )
        elif "counts" in section:
            detail = ", ".join(f"{k} {v}" for k, v in section["counts"].items())
        elif "cells" in section:
            detail = ", ".join(f"{c['label']}: {c['status']}" for c in section["cells"])
        else:
            detail = ", ".join(f"{stage}: {rows[0]['name'][:40]}" for stage, rows in section["top"].items() if rows)
        print(f"  {name:42} {status:7} {detail}")
    for check in data["checks"]:
        mark = {True: "met", False: "NOT met", None: "not run"}[check["passed"]]
        print(f"  check: {check['name']} [{check['target']}]: {mark}")


if __name__ == "__main__":
    main()
