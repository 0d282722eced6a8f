"""`ablate results` and `ablate.results()` on a store written by a real count-only grid: compact labels, one line a
row, sort, columns, pivots, patterns in filters, what an empty answer or a mistyped path says, and the Python rows
(a pandas DataFrame when pandas is there)."""

from __future__ import annotations

import inspect
import json
import sys
import warnings

import pytest

import ablate
from ablate.api.errors import ConfigError
from ablate.cli import main
from ablate.cli.flags import DEFAULT_DB
from ablate.grid.store import Store

# 6 cells: 128 px gives 4 visual tokens, 192 px 9; 100 px is no multiple of the encoder's stride (64) and fails.
SWEEP = ["encoder.image_size=128,192,100", "prompt_tokens=4,8"]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("results") / "r.db"
    assert main(["grid", "tiny", *SWEEP, "--count-only", "--db", str(path)]) == 1  # two cells fail
    return str(path)


def results_json(capsys, *args) -> dict:
    assert main(["results", "--db", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_table_has_one_line_per_row_and_short_labels(db, capsys):
    assert main(["results", "--db", db]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("│")]
    assert len(lines) == 6, table  # no label or error wrapped onto a second line
    assert "128px prompt_tokens=4" in table and "encoder.image_size=" not in table  # only what varies, short
    assert "TTFT ms" not in table  # count-only: no row has a timing, so no timing column
    assert "ImageSizeError" in table


def test_sort_and_columns(db, capsys):
    shown = results_json(
        capsys, db, "--sort", "visual_tokens,prompt_tokens", "--desc", "--columns", "label,visual_tokens"
    )
    assert shown["columns"] == ["label", "visual_tokens"]
    assert [(row["label"], row["visual_tokens"]) for row in shown["rows"]] == [
        ("192px prompt_tokens=8", 9),
        ("192px prompt_tokens=4", 9),
        ("128px prompt_tokens=8", 4),
        ("128px prompt_tokens=4", 4),
        ("100px prompt_tokens=8", None),  # no visual tokens: last, whichever the direction; by prompt_tokens
        ("100px prompt_tokens=4", None),
    ]
    ascending = results_json(capsys, db, "--sort", "visual_tokens", "--columns", "visual_tokens")
    assert [row["visual_tokens"] for row in ascending["rows"]] == [4, 4, 9, 9, None, None]
    # a block of the record gives each of its fields; the table heads them with their units
    blocks = results_json(capsys, db, "--columns", "params", "--status", "ok")["columns"]
    assert {"params.total", "params.encoder", "params.decoder"} <= set(blocks)
    assert main(["results", "--db", db, "--columns", "label,params.total,error", "--sort", "label"]) == 0
    table = capsys.readouterr().out
    assert "params M" in table and "ImageSizeError" in table


def test_a_pivot_lays_out_one_value_by_two_keys(db, capsys):
    shown = results_json(capsys, db, "--pivot", "encoder.image_size,prompt_tokens,visual_tokens")
    assert shown["index"] == ["encoder.image_size"] and shown["columns"] == "prompt_tokens"
    assert shown["rows"] == [
        {"encoder.image_size": 128, "4": 4, "8": 4},
        {"encoder.image_size": 192, "4": 9, "8": 9},
        {"encoder.image_size": 100, "4": None, "8": None},
    ]
    assert main(["results", "--db", db, "--pivot", "encoder.image_size,prompt_tokens,visual_tokens"]) == 0
    table = capsys.readouterr().out
    assert "visual tok by encoder.image_size (lines) and prompt_tokens" in table
    assert table.count("failed") == 2  # the 100 px cells
    # several rows in one place with different values: say what tells them apart, and how to pick
    assert main(["results", "--db", db, "--pivot", "encoder,prompt_tokens,visual_tokens"]) == 2
    error = capsys.readouterr().err
    assert "they differ in encoder.image_size" in error
    assert "--pivot encoder+encoder.image_size,prompt_tokens,visual_tokens" in error


def test_patterns_in_filters_and_an_empty_answer_names_the_values_there(db, capsys):
    assert len(results_json(capsys, db, "error.type=Image*")["rows"]) == 2
    assert len(results_json(capsys, db, "encoder=fastvit*")["rows"]) == 6
    assert len(results_json(capsys, db, "error.type!=Image*")["rows"]) == 4  # rows without an error too
    assert len(results_json(capsys, db, "encoder=fastvit-tiny")["rows"]) == 6  # a plain value matches exactly
    assert main(["results", "--db", db, "encoder=fastvit"]) == 0
    captured = capsys.readouterr()
    assert "'encoder=fastvit' matches no row: config.encoder.name there is one of fastvit-tiny." in captured.err
    assert "'encoder=fastvit*'" in captured.err
    assert main(["results", "--db", db, "encoder.image_size=128", "prompt_tokens=16"]) == 0
    assert "'prompt_tokens=16' matches no row: prompt_tokens there is one of 4, 8." in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["encodr.image_size=128"], "No row has 'encodr.image_size'. Did you mean 'encoder'? Paths at the top"),
        (["encoder.imagesize=128"], "Did you mean 'image_size'? Keys of config.encoder: "),
        (["--sort", "latency_ms.tfft"], "Unknown --sort path 'latency_ms.tfft': No row has 'latency_ms.tfft'. Did"),
        (["--columns", "label,visual_token"], "Did you mean 'visual_tokens'?"),
        (["--pivot", "encoder,encoder.imagesize,visual_tokens"], "Unknown --pivot path 'encoder.imagesize'"),
        (["--pivot", "encoder,prompt_tokens"], "is not ROWS,COLUMNS,VALUE"),
        (["--pivot", "encoder,prompt_tokens,latency_ms"], "name one of them: latency_ms.preprocess"),
        (["--sort", "params"], "'params' is a block of values; name one of them: params.encoder"),
    ],
)
def test_a_mistyped_path_names_the_paths_there(db, capsys, args, phrase):
    assert main(["results", "--db", db, *args, "--json"]) == 2
    captured = capsys.readouterr()
    assert phrase in captured.err and "(none)" not in captured.err and "Traceback" not in captured.err
    record = json.loads(captured.out)  # with --json: one record with the error filled
    assert phrase in record["error"]["message"]


def test_csv_takes_the_columns_too(db, capsys):
    assert main(["results", "--db", db, "--csv", "-", "--columns", "encoder.image_size,visual_tokens"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "encoder.image_size,visual_tokens" and lines[1:3] == ["128,4", "128,4"]


def test_accuracy_columns_when_rows_have_them(db, capsys, tmp_path):
    """A scored row (what `ablate eval --db` stores: a record with its accuracy block) beside the grid's rows."""
    copy = tmp_path / "scored.db"
    with Store(db) as source, Store(copy) as target:
        for row in source.rows():
            target.put(row.key, row.record, row.label)
        scored = {**row.record, "error": None, "accuracy": {"exact_match": 0.625, "anls": 0.7, "n": 8}}
        target.put("scored", scored, "eval")
    assert main(["results", "--db", str(copy), "accuracy.exact_match>0.5"]) == 0
    table = capsys.readouterr().out
    assert "exact match" in table and "0.625" in table and "ANLS" in table
    assert results_json(capsys, str(copy))["columns"][-3:] == ["accuracy.exact_match", "accuracy.anls", "accuracy.n"]
    assert "accuracy.exact_match" not in results_json(capsys, db)["columns"]  # no row scored: no column


def test_the_python_function_returns_the_rows(db):
    assert "results" in ablate.__all__ and inspect.signature(ablate.results).parameters["db"].default == DEFAULT_DB
    rows = ablate.results(db, where=["visual_tokens>=4"], sort="visual_tokens", descending=True)
    assert [row["visual_tokens"] for row in rows] == [9, 9, 4, 4]
    assert {"key", "label", "status", "latency_ms.ttft", "config.encoder.image_size"} <= set(rows[0])
    picked = ablate.results(db, where="error.type=Image*", columns=["label", "encoder.image_size"])
    assert picked == [  # labels name what varies among the rows found: here, the size does not
        {"label": "prompt_tokens=4", "encoder.image_size": 100},
        {"label": "prompt_tokens=8", "encoder.image_size": 100},
    ]
    with pytest.warns(UserWarning, match="config.encoder.name there is one of fastvit-tiny"):
        assert ablate.results(db, where="encoder=fastvit") == []
    with pytest.raises(ConfigError, match="Unknown sort 'visual_tok'"):
        ablate.results(db, sort="visual_tok")


def test_a_dataframe_with_pandas_and_a_clear_error_without(db, monkeypatch):
    pandas = pytest.importorskip("pandas")
    frame = ablate.results(db, status="ok", as_frame=True)
    assert isinstance(frame, pandas.DataFrame) and len(frame) == 4
    table = frame.pivot_table(index="config.encoder.image_size", columns="prompt_tokens", values="visual_tokens")
    assert table.loc[192, 8] == 9 and table.loc[128, 4] == 4
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(ConfigError, match="needs pandas"), warnings.catch_warnings():
        ablate.results(db, as_frame=True)
