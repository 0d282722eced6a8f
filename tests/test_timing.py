"""Timings you can trust and memory that means the run: a busy machine is flagged and a quiet one is not, the
minimum sits beside the median, repeats to a precision stop for a recorded reason, and a run's peak memory is its
own (not the process's, not an earlier run's)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import pytest
from conftest import run_cli_process

import ablate
from ablate.config.run_options import RunOptions
from ablate.measurement.machine import cpu_ticks, others_share, usable_cpus
from ablate.measurement.record import Latency, Timing
from ablate.measurement.timing import BUSY_SHARE, median_precision, timing_flags

FAST = dict(warmup=1, repeats=8)


def kinds(record) -> list[str]:
    return [flag.kind for flag in record.timing.flags]


def share_of_others(seconds: float = 1.0) -> float:
    """What other processes use of this machine's CPUs now, over `seconds` (this process sleeps meanwhile)."""
    before = cpu_ticks()
    time.sleep(seconds)
    share = others_share(before, cpu_ticks())
    assert share is not None, "no /proc/stat here"
    return share


@pytest.fixture
def spinners():
    """One process spinning a Python loop per usable CPU, for the duration of a test."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in usable_cpus()]
    time.sleep(0.5)  # let them start
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(cpu_ticks() is None, reason="needs /proc/stat (Linux)")
def test_a_machine_kept_busy_by_other_processes_is_flagged(spinners):
    record = ablate.measure("tiny", **FAST)
    assert record.timing.busy_share > BUSY_SHARE
    assert "busy" in kinds(record)
    busy = next(flag for flag in record.timing.flags if flag.kind == "busy")
    assert f"{record.timing.busy_share:.0%}" in busy.message and "25%" in busy.message


@pytest.mark.skipif(cpu_ticks() is None, reason="needs /proc/stat (Linux)")
def test_the_same_run_on_a_quiet_machine_is_not_flagged_busy():
    """The machine this suite runs on may be shared: the claim is checked only when the machine is quiet before and
    after the run (a skip says it was not), so the test fails only if a quiet run is flagged."""
    before = share_of_others()
    if before > 0.1:
        pytest.skip(f"the machine is not quiet: other processes used {before:.0%} of its CPUs before the run")
    record = ablate.measure("tiny", **FAST)
    if "busy" in kinds(record):
        after = share_of_others()
        if after > 0.1:
            pytest.skip(f"the machine became busy during the run ({after:.0%} by other processes after it)")
    assert record.timing.busy_share is not None and record.timing.busy_share <= BUSY_SHARE, record.timing
    assert "busy" not in kinds(record)


def test_others_share_leaves_out_this_process():
    # 100 ticks in all, 70 of them busy, 20 of those this process's own: others used 50 of 100.
    assert others_share((1000, 400, 10), (1100, 470, 30)) == pytest.approx(0.5)
    assert others_share((1000, 400, 10), (1000, 400, 10)) is None  # no time passed
    assert others_share(None, (1100, 470, 30)) is None


def test_minimum_beside_median_and_stage_sum_is_the_sum_of_stage_medians():
    record = ablate.measure("tiny", **FAST)
    median, fastest, timing = record.latency_ms, record.latency_min_ms, record.timing
    stages = ("encoder", "reducer", "connector", "prefill")
    for name in (*stages, "preprocess", "ttft"):
        assert 0 < getattr(fastest, name) <= getattr(median, name)
    assert median.stage_sum == pytest.approx(sum(getattr(median, name) for name in stages))
    assert fastest.stage_sum == pytest.approx(sum(getattr(fastest, name) for name in stages))
    assert (timing.repeats, timing.stop) == (8, "repeats") and timing.seconds > 0 and timing.precision > 0
    assert record.to_dict()["timing"]["flags"] == [{"kind": f.kind, "message": f.message} for f in timing.flags]


def test_repeats_to_a_precision_stop_for_a_recorded_reason():
    reached = ablate.measure("tiny", warmup=1, repeats=3, precision=0.5, max_time_s=20)
    assert reached.timing.stop == "precision reached", reached.timing
    assert reached.timing.repeats >= 3 and reached.timing.precision <= 0.5
    assert "precision" not in kinds(reached)

    # No machine times to a relative error of 1e-9: the budget ends it, and the record says so.
    budget = ablate.measure("tiny", warmup=0, repeats=3, precision=1e-9, max_time_s=1.0)
    assert budget.timing.stop == "time budget" and budget.timing.seconds >= 1.0
    assert budget.timing.repeats >= 3 and budget.timing.precision > 1e-9
    assert "precision" in kinds(budget)


def test_median_precision_is_the_relative_standard_error_of_the_median():
    values = [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 30.0]  # one outlier barely moves it
    mad = statistics.median(abs(v - 10.0) for v in values)
    assert median_precision(values) == pytest.approx(1.2533 * 1.4826 * mad / 7**0.5 / 10.0)
    assert median_precision([1.0, 2.0]) is None


@pytest.mark.parametrize(
    ("stage_sum", "spread", "max_spread", "expected"),
    [
        (104.0, 10.0, 0.2, []),
        (106.0, 10.0, 0.2, ["stage_sum"]),
        (94.0, 10.0, 0.2, ["stage_sum"]),
        (100.0, 30.0, 0.2, ["spread"]),
        (100.0, 30.0, 0.5, []),
    ],
)
def test_flag_thresholds(stage_sum, spread, max_spread, expected):
    """The stage sum may differ from TTFT by 5%; the spread may reach run.max_spread of the median."""
    flags = timing_flags(
        Latency(ttft=100.0, stage_sum=stage_sum),
        Latency(ttft=spread),
        Timing(repeats=5, busy_share=0.0),
        RunOptions(max_spread=max_spread),
    )
    assert [flag.kind for flag in flags] == expected


def test_ablate_run_tiny_reports_the_runs_own_peak_memory():
    """A fresh process, as a user runs it: the process holds hundreds of MB (torch), the run a few tens."""
    result = run_cli_process("run", "tiny", "--repeats", "2", "--warmup", "1", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    memory = record["memory"]
    assert 0 <= record["peak_memory_mb"] < 100
    assert memory["baseline_mb"] > 100  # what the process held before: not the run's
    assert memory["process_peak_mb"] == pytest.approx(memory["baseline_mb"] + record["peak_memory_mb"])
    assert "clear_refs" in memory["method"] or "CUDA" in memory["method"]


def test_runs_in_one_process_do_not_inherit_each_others_peaks():
    big = ablate.measure("tiny", ["encoder.image_size=1024", "batch_size=2"], warmup=0, repeats=1)
    assert big.peak_memory_mb > 100  # so a run that inherited it would show
    peaks = [ablate.measure("tiny", warmup=1, repeats=2).peak_memory_mb for _ in range(3)]
    assert all(0 <= peak < 100 for peak in peaks), peaks
    assert peaks[-1] <= peaks[0] + 10, peaks  # not growing with earlier cells


def test_count_only_has_no_allocation_peak_and_says_why():
    record = ablate.measure("tiny", count_only=True)
    assert record.peak_memory_mb is None and "count-only" in record.memory.method
    assert record.timing.repeats is None and record.timing.flags == []
