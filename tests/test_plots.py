"""`ablate plot`: PNG and interactive HTML from a real grid's store; the Pareto front; rows without figures."""

from __future__ import annotations

import pytest

from ablate.cli import main
from ablate.grid.store import Store
from ablate.measurement.record import Record
from ablate.report.plots import pareto_front, write_plots

PLOTS = ("ttft_vs_tokens", "stage_latency", "encoder_vs_resolution")
COUNT_PLOTS = ("flops_vs_tokens", "encoder_flops_vs_resolution", "params", "kv_cache_vs_tokens")
DECODE_PLOTS = ("throughput_vs_batch", "ttft_vs_time_per_token")  # rows with several batch sizes, decode timings


def assert_sane_png(path) -> None:
    """A chart that fills its picture: neither a strip 5000 px wide nor a tower."""
    from PIL import Image

    width, height = Image.open(path).size
    assert 400 <= width < 1600 and 250 <= height < 2500, (path.name, width, height)
    assert 0.4 <= width / height <= 3.0, (path.name, width, height)
    assert path.stat().st_size < 200_000


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
    for name in PLOTS + COUNT_PLOTS:
        png, html = out / f"{name}.png", out / f"{name}.html"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert_sane_png(png)
        text = html.read_text()
        assert "plotly" in text.lower() and any(unit in text for unit in ("(ms)", "FLOPs", "millions", "MiB"))
        assert "=None" not in text and "encoder.weights" not in text  # only the keys that vary and apply
    assert (out / "plotly.min.js").stat().st_size > 1_000_000  # offline: plotly.js beside the pages
    html = (out / "ttft_vs_tokens.html").read_text()
    assert "Pareto front" in html and "cpu (" in html and "eager" in html  # device and mode in the title
    assert "lower is better" in html and "better: right and down" in html  # which way is better, what the front is
    assert "128px prompt_tokens=4" in html  # a cell's label: its size and the other key that varies
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
    assert notes[0] == "accuracy_vs_ttft: no row has an accuracy (`ablate eval --db` stores one)"
    assert notes[1] == "fidelity_vs_ttft: no row has a fidelity (`--fidelity` measures one)"
    assert [note.split(":")[0] for note in notes[2:4]] == list(DECODE_PLOTS)
    assert notes[4:] == [f"{name}: no row has FLOP counts" for name in COUNT_PLOTS]


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
    assert tmp_path / "accuracy_vs_ttft.png" in files and not [n for n in notes if n.startswith("accuracy")]
    html = (tmp_path / "accuracy_vs_ttft.html").read_text()
    assert "exact match (%)" in html and "Pareto front" in html and "chance" in html
    front = pareto_front([(r["accuracy"]["exact_match"], r["latency_ms"]["ttft"]) for r in records])
    assert front == [0, 1, 3]


def test_a_count_only_grid_gets_flops_and_params_plots(tmp_path, capsys):
    db, out = tmp_path / "c.db", tmp_path / "p"
    # two encoders of different kinds at two sizes: the labels name the encoder, and no option only one has
    args = ["grid", "tiny", "encoder=fastvit-tiny,example-patchconv", "encoder.image_size=64,128"]
    assert main([*args, "--count-only", "--db", str(db)]) == 0
    assert main(["plot", "--db", str(db), "--out", str(out)]) == 0
    for name in COUNT_PLOTS:
        assert_sane_png(out / f"{name}.png")
    html = (out / "flops_vs_tokens.html").read_text()
    assert "example-patchconv 64px" in html and "fastvit-tiny 128px" in html and "patch_size" not in html
    assert "skipped ttft_vs_tokens: no row has timings" in capsys.readouterr().err


def test_a_store_of_failed_cells_says_why_nothing_is_plotted(tmp_path, capsys):
    with Store(tmp_path / "c.db") as store:
        store.put("a", {**Record().to_dict(), "error": {"type": "X", "message": "m"}}, "a")
    assert main(["plot", "--db", str(tmp_path / "c.db"), "--out", str(tmp_path / "p")]) == 2
    assert "failed cells only" in capsys.readouterr().err


def test_a_decode_grid_over_batch_sizes_and_reducers_plots_throughput(tmp_path, capsys):
    db, out = tmp_path / "d.db", tmp_path / "p"
    args = ["grid", "tiny", "batch_size=1,2", "reducer=none,avgpool", "--max-new-tokens", "3", "--db", str(db)]
    assert main([*args, "--repeats", "1", "--warmup", "0", "--threads", "1"]) == 0
    assert main(["plot", "--db", str(db), "--out", str(out)]) == 0
    for name in DECODE_PLOTS:
        assert_sane_png(out / f"{name}.png")
    html = (out / "throughput_vs_batch.html").read_text()
    assert "output tokens" in html and "reducer=avgpool" in html and "batch size" in html
    capsys.readouterr()
    assert main(["results", "--db", str(db)]) == 0
    assert "ms/token" in capsys.readouterr().out  # the decode columns in the stored rows' table
