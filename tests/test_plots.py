"""`ablate plot`: PNG and interactive HTML from a real grid's store; the Pareto front; rows without figures."""

from __future__ import annotations

import pytest

from ablate.cli import main
from ablate.grid.store import Store
from ablate.measurement.record import Record
from ablate.report.plots import pareto_front, write_plots

PLOTS = ("ttft_vs_tokens", "stage_latency", "encoder_vs_resolution")


def test_pareto_front_keeps_the_points_nothing_beats():
    # (visual tokens, TTFT ms): 1 is beaten by 0 (as many tokens, faster); 3 by 2 (more tokens, as fast)
    points = [(16, 10.0), (16, 12.0), (64, 20.0), (36, 20.0), (256, 80.0), (144, 90.0)]
    assert pareto_front(points) == [0, 2, 4]


@pytest.fixture(scope="module")
def grid_db(tmp_path_factory):
    """A timed tiny grid (two resolutions x two prompt lengths) plus a failed and a count-only row."""
    db = tmp_path_factory.mktemp("plot") / "r.db"
    args = ["grid", "tiny", "encoder.image_size=128,192,100", "prompt_tokens=4,8", "--db", str(db)]
    assert main([*args, "--repeats", "1", "--warmup", "0"]) == 1  # the 100 px cells fail
    assert main(["grid", "tiny", "encoder.image_size=256", "--db", str(db), "--count-only"]) == 0
    return db


def test_plot_writes_non_empty_png_and_html(grid_db, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", "--db", str(grid_db), "--out", str(out)]) == 0
    for name in PLOTS:
        png, html = out / f"{name}.png", out / f"{name}.html"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        text = html.read_text()
        assert "plotly" in text.lower() and "(ms)" in text  # the axes carry their units
    assert (out / "plotly.min.js").stat().st_size > 1_000_000  # offline: plotly.js beside the pages
    html = (out / "ttft_vs_tokens.html").read_text()
    assert "Pareto front" in html and "cpu (" in html and "eager" in html  # device and mode in the title
    assert "wrote" in capsys.readouterr().err


def test_plots_leave_out_rows_without_timings_and_tolerate_extra_fields(tmp_path):
    timed = {**Record().to_dict(), "visual_tokens": 16, "accuracy": 0.6, "name": "x"}
    timed.update(
        latency_ms={"encoder": 1.0, "reducer": 0.1, "connector": 0.2, "prefill": 3.0, "ttft": 4.5},
        run={"device": "cpu", "dtype": "float32", "mode": "eager"},
        env={"device_name": "Test CPU"},
        config={"encoder": {"name": "e", "image_size": 256}},
    )
    bigger = {**timed, "visual_tokens": 64, "config": {"encoder": {"name": "e", "image_size": 512}}}
    bigger["latency_ms"] = {**timed["latency_ms"], "ttft": 9.0}
    count_only = {**Record().to_dict(), "visual_tokens": 4}
    failed = {**Record().to_dict(), "error": {"type": "X", "message": "m"}}
    files, notes = write_plots([timed, bigger, count_only, failed, {"schema_version": 9}], tmp_path)
    assert sorted(path.name for path in files) == sorted(f"{n}.{ext}" for n in PLOTS for ext in ("png", "html"))
    assert notes == ["accuracy_vs_ttft: no row has an accuracy (`ablate eval --db` stores one)"]


def test_accuracy_vs_ttft_marks_the_pareto_front_and_chance(tmp_path):
    def evaluated(size: int, ttft: float, exact_match: float) -> dict:
        record = {**Record().to_dict(), "name": "synth-tiny", "visual_tokens": (size // 64) ** 2}
        record.update(
            latency_ms={"encoder": ttft / 2, "reducer": 0.0, "connector": 0.1, "prefill": ttft / 2, "ttft": ttft},
            run={"device": "cpu", "dtype": "float32", "mode": "eager"},
            env={"device_name": "Test CPU"},
            config={"encoder": {"name": "e", "image_size": size}},
            accuracy={"exact_match": exact_match, "anls": exact_match, "n": 10, "chance": 0.0625},
        )
        return record

    # 192 px is slower than 128 px and no more accurate: off the front
    records = [
        evaluated(64, 20.0, 0.1),
        evaluated(128, 25.0, 0.8),
        evaluated(192, 30.0, 0.7),
        evaluated(256, 40.0, 0.9),
    ]
    files, notes = write_plots(records, tmp_path)
    assert tmp_path / "accuracy_vs_ttft.png" in files and notes == []
    html = (tmp_path / "accuracy_vs_ttft.html").read_text()
    assert "exact match (%)" in html and "Pareto front" in html and "chance" in html
    front = pareto_front([(r["accuracy"]["exact_match"], r["latency_ms"]["ttft"]) for r in records])
    assert front == [0, 1, 3]


def test_a_store_without_timings_says_why_nothing_is_plotted(tmp_path, capsys):
    with Store(tmp_path / "c.db") as store:
        store.put("a", {**Record().to_dict(), "visual_tokens": 4}, "a")
    assert main(["plot", "--db", str(tmp_path / "c.db"), "--out", str(tmp_path / "p")]) == 2
    assert "count-only or failed cells only" in capsys.readouterr().err
