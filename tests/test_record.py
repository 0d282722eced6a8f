"""The record is defined once: its JSON, its W&B metric names and the store's columns come from the dataclasses, a
record reads back as the same object, and schema 2 migrates."""

from __future__ import annotations

import json
import sqlite3

import pytest

import ablate
from ablate.grid.store import Store
from ablate.measurement.record import SCHEMA_VERSION, Record, _fields, columns, metrics, migrate


@pytest.fixture(scope="module")
def timed() -> Record:
    return ablate.measure("tiny", repeats=3, warmup=0, threads=1)  # 3: a median of sums is no sum of medians


def test_every_field_says_what_it_means():
    undocumented = [path for path, f, _ in _fields(Record) if not f.metadata.get("doc")]
    assert not undocumented


def test_a_record_reads_back_as_the_same_object(timed):
    data = json.loads(json.dumps(timed.to_dict()))
    assert Record.from_dict(data) == timed
    assert data["schema_version"] == SCHEMA_VERSION == 4


def test_stage_sum_is_the_sum_of_the_stage_medians(timed):
    latency = timed.latency_ms
    assert latency.stage_sum == pytest.approx(latency.encoder + latency.reducer + latency.connector + latency.prefill)


def test_schema_2_migrates():
    old = {**Record().to_dict(), "schema_version": 2}
    old["latency_ms"] = {**old["latency_ms"], "encoder": 3.0, "reducer": 0.5, "connector": 1.0, "prefill": 5.0}
    old["latency_ms"]["stage_sum"] = 9.9  # schema 2: the median of the per-repeat sums
    new = migrate(old)
    assert new["schema_version"] == 4 and new["latency_ms"]["stage_sum"] == 9.5
    assert Record.from_dict(old).latency_ms.stage_sum == 9.5


def test_schema_3_peak_becomes_the_process_peak_not_the_runs_own():
    old = {**Record().to_dict(), "schema_version": 3, "peak_memory_mb": 908.0}
    del old["memory"], old["timing"]  # schema 3 had neither block
    record = Record.from_dict(old)
    assert record.schema_version == 4 and record.peak_memory_mb is None
    assert record.memory.process_peak_mb == 908.0 and "schema 3" in record.memory.method


def test_metric_names_are_the_field_paths(timed):
    names = metrics(timed.to_dict())
    assert names["latency_ms/ttft"] == timed.latency_ms.ttft and names["visual_tokens"] == 4
    assert names["roofline/stages/prefill/floor_ms"] == timed.roofline.stages["prefill"].floor_ms
    assert names["status"] == "ok"
    assert not any(name.startswith(("config/", "run/", "env/", "image/", "schema_version")) for name in names)
    failed = metrics({**Record().to_dict(), "error": {"type": "ConfigError", "message": "m"}})
    assert failed["status"] == "failed" and failed["error/type"] == "ConfigError"


def test_the_store_indexes_the_columns_the_definition_names(tmp_path, timed):
    assert columns() == {
        "name": "name",
        "visual_tokens": "visual_tokens",
        "count_basis": "count_basis",
        "ttft_ms": "latency_ms.ttft",
        "device": "run.device",
        "mode": "run.mode",
        "runtime": "run.runtime",
        "error_type": "error.type",
    }
    with Store(tmp_path / "s.db") as store:
        store.put("k", timed, "a label")
    row = (
        sqlite3.connect(tmp_path / "s.db").execute("SELECT name, visual_tokens, ttft_ms, device FROM cells").fetchone()
    )
    assert row == ("tiny", 4, timed.latency_ms.ttft, "cpu")


def test_a_store_from_before_a_column_gains_it_filled_from_its_rows(tmp_path, timed):
    path = tmp_path / "old.db"
    with Store(path) as store:
        store.put("k", timed, "a label")
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE cells DROP COLUMN mode")  # as a store written before `mode` was indexed
    db.commit()
    db.close()
    with Store(path) as store:
        assert [row.key for row in store.rows()] == ["k"]
    assert sqlite3.connect(path).execute("SELECT mode FROM cells").fetchone() == ("eager",)
