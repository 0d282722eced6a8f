"""Running grids into the results store: one row per cell, failures recorded, resume after kill -9, concurrent
writers, and `ablate results` reading it back."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from ablate.cli import main
from ablate.grid.expansion import load_grid
from ablate.grid.store import Store
from ablate.measurement.record import Record

SWEEP = ["encoder.image_size=128,192,100", "prompt_tokens=4,8"]  # 100 px: not a multiple of the stride, 64


def db_rows(path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'cells'").fetchone():
            return []  # a grid that just started: the file is there, its table not yet
        return db.execute("SELECT key, status FROM cells").fetchall()


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The store of a 6-cell grid with two impossible cells (100 px), filled by the first test."""
    db = tmp_path_factory.mktemp("grid") / "r.db"
    return db


def test_a_grid_records_its_impossible_cells_completes_the_others_and_exits_non_zero(ran, capsys):
    code = main(["grid", "tiny", *SWEEP, "--db", str(ran), "--count-only", "--json"])
    captured = capsys.readouterr()
    assert code == 1
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 6 and all(set(r) == set(Record().to_dict()) for r in records)
    failed = [r for r in records if r["error"]]
    assert len(failed) == 2 and {r["config"]["encoder"]["image_size"] for r in failed} == {100}
    assert all(r["error"]["type"] == "ImageSizeError" and "multiple of 64" in r["error"]["message"] for r in failed)
    assert [r["visual_tokens"] for r in records if not r["error"]] == [4, 4, 9, 9]
    assert "2 of 6 cells failed" in captured.err
    assert "`encoder.image_size=100 prompt_tokens=8`" in captured.err
    assert "Traceback" not in captured.err
    assert sorted(status for _, status in db_rows(ran)) == ["failed"] * 2 + ["ok"] * 4


def test_a_rerun_skips_stored_cells_and_retry_failed_retries_only_those(ran, capsys):
    before = dict(db_rows(ran))
    assert main(["grid", "tiny", *SWEEP, "--db", str(ran), "--count-only"]) == 1  # still failed: still non-zero
    assert "0 measured now, 6 from the store, 2 failed" in capsys.readouterr().err
    assert main(["grid", "tiny", *SWEEP, "--db", str(ran), "--count-only", "--retry-failed"]) == 1
    assert "2 measured now, 4 from the store" in capsys.readouterr().err
    assert dict(db_rows(ran)) == before


def test_results_filters_jsonl_and_csv(ran, capsys, tmp_path):
    assert main(["results", "--db", str(ran), "--jsonl", "encoder.image_size=192", "--status", "ok"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["config"]["encoder"]["image_size"], r["prompt_tokens"]) for r in records] == [(192, 4), (192, 8)]
    assert main(["results", "--db", str(ran), "--jsonl", "prompt_tokens>=8", "error=null"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["results", "--db", str(ran), "--jsonl", "error.type=ImageSizeError"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    out = tmp_path / "rows.csv"
    assert main(["results", "--db", str(ran), "--csv", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 6 and {"key", "label", "status", "config.encoder.image_size", "latency_ms.ttft"} <= set(rows[0])
    assert sorted(row["status"] for row in rows) == ["failed"] * 2 + ["ok"] * 4
    assert main(["results", "--db", str(ran)]) == 0
    table = capsys.readouterr().out
    assert "6 rows" in table and "ImageSizeError" in table


def test_results_name_a_path_no_row_has(ran, capsys):
    assert main(["results", "--db", str(ran), "encoder.imagesize=128"]) == 2
    assert "No row has 'config.encoder.imagesize'. Did you mean 'image_size'?" in capsys.readouterr().err


def test_the_store_keeps_records_of_any_shape(tmp_path):
    """Extra fields (a later `accuracy`), other schema versions and missing figures are kept as they are."""
    with Store(tmp_path / "s.db") as store:
        store.put("a", {**Record().to_dict(), "accuracy": 0.5, "latency_ms": {"ttft": float("nan")}}, "a")
        store.put("b", {"schema_version": 99, "name": "future", "error": None}, "b")
        store.put("a", {**Record().to_dict(), "accuracy": 0.75}, "a again")
        rows = {row.key: row for row in store.rows()}
        assert rows["a"].record["accuracy"] == 0.75 and rows["a"].label == "a again"
        assert rows["b"].record == {"schema_version": 99, "name": "future", "error": None}
        assert [row.key for row in store.rows(filters=["accuracy>0.6"])] == ["a"]


WRITER = """
import sys
from ablate.grid.store import Store
name, count = sys.argv[1], int(sys.argv[2])
store = Store(sys.argv[3])
for index in range(count):
    store.put(f"{name}-{index}", {"name": name, "index": index, "error": None}, name)
    store.put(f"shared-{index}", {"name": name, "index": index, "error": None}, name)
"""


def test_several_processes_write_at_once(tmp_path):
    db = tmp_path / "shared.db"
    Store(db).close()
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, name, "60", str(db)], stderr=subprocess.PIPE, text=True)
        for name in ("w1", "w2", "w3")
    ]
    for writer in writers:
        assert writer.wait(timeout=300) == 0, writer.stderr.read()
    keys = [key for key, _ in db_rows(db)]
    assert len(keys) == len(set(keys)) == 3 * 60 + 60


def test_a_grid_killed_with_sigkill_resumes_with_one_row_per_cell(tmp_path):
    """kill -9 mid-grid, then the same command again: every cell exactly once, the finished ones not re-measured."""
    db = tmp_path / "kill.db"
    args = ["grid", "tiny", "encoder.image_size=128,192", "prompt_tokens=4,8,12,16,20,24", "--db", str(db)]
    args += ["--repeats", "2", "--warmup", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "ablate.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while time.time() < deadline and (not db.exists() or len(db_rows(db)) < 3):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    stored = len(db_rows(db))
    assert 3 <= stored < 12, f"the kill should land mid-grid, found {stored} rows"
    result = subprocess.run([sys.executable, "-m", "ablate.cli", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"{12 - stored} measured now, {stored} from the store" in result.stderr
    keys = [key for key, _ in db_rows(db)]
    assert len(keys) == len(set(keys)) == 12
    grid = load_grid("tiny", args[2:4], {"repeats": 2, "warmup": 0})
    assert set(keys) == {cell.key for cell in grid.cells}


def test_labels_and_errors_print_as_written(capsys):
    """Values with brackets (list overrides, `ablate[plot]`) are text, not rich markup."""
    from rich.console import Console

    from ablate.grid.store import Row
    from ablate.report.tables import rows_table

    failed = {**Record().to_dict(), "error": {"type": "ConfigError", "message": "install 'ablate[plot]'"}}
    console = Console(record=True, width=300)
    console.print(rows_table([Row("k", "failed", "encoder.token_mixers=[repmixer,attention]", failed)], "[t]"))
    text = console.export_text()
    assert "encoder.token_mixers=[repmixer,attention]" in text and "ablate[plot]" in text and "[t]" in text
