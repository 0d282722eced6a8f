"""W&B tracking with the real wandb client, offline: what it wrote is read back from its run files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from ablate.cli import main
from ablate.grid.expansion import load_grid


def read_run(run_file: Path) -> dict:
    """The records of one offline run file (W&B's log format: a 7-byte header, then 32 KiB blocks of chunks, each
    with a 7-byte header: CRC, length, type 1 full / 2 first / 3 middle / 4 last), as {kind: [protobuf, ...]}."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records: dict[str, list] = {}
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.setdefault(record.WhichOneof("record_type"), []).append(record)
            pending = b""
    return records


def offline_runs(folder: Path) -> list[dict]:
    """Each offline run: its group, job type, name, config, summary and exit code."""
    import wandb

    wandb.teardown()  # waits for W&B's service to write out everything it holds
    runs = []
    for run_file in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        records = read_run(run_file)
        run = records["run"][0].run
        summary = {}
        for item in records.get("summary", []):
            summary.update({update.key: json.loads(update.value_json) for update in item.summary.update if update.key})
        runs.append(
            {
                "group": run.run_group,
                "job_type": run.job_type,
                "name": run.display_name,
                "project": run.project,
                "config": {update.key: json.loads(update.value_json) for update in run.config.update},
                "summary": summary,
                "exit_code": records["exit"][0].exit.exit_code if "exit" in records else None,
                "files": run_file.parent,
            }
        )
    return runs


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline into this test's folder. wandb reads its environment once per process (wandb.setup), so the
    fixture tears that down around each test, as a fresh `ablate` process would start afresh."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "from-the-environment")
    for name in ("WANDB_ENTITY", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    wandb.teardown()


def test_a_grid_logs_one_run_per_cell_and_a_grid_run_grouped_by_grid_id(offline, capsys):
    sweep = ["encoder.image_size=128,192,100"]  # 100 px is impossible for this encoder
    args = ["grid", "tiny", *sweep, "--db", str(offline / "r.db"), "--repeats", "1", "--warmup", "0", "--wandb"]
    assert main(args) == 1
    capsys.readouterr()
    grid_id = load_grid("tiny", sweep, {"repeats": 1, "warmup": 0}).id
    runs = offline_runs(offline)
    assert len(runs) == 4 and {run["group"] for run in runs} == {grid_id}
    assert {run["project"] for run in runs} == {"from-the-environment"}  # W&B's settings decide, not ablate
    cells = {run["name"]: run for run in runs if run["job_type"] == "cell"}
    assert set(cells) == {f"encoder.image_size={size}" for size in (128, 192, 100)}
    ok, failed = cells["encoder.image_size=128"], cells["encoder.image_size=100"]
    assert ok["exit_code"] == 0 and failed["exit_code"] == 1  # a failed cell's run is a failed run
    assert ok["config"]["encoder.image_size"] == 128 and ok["config"]["decoder.arch"] == "qwen2-tiny"
    assert ok["config"]["run.repeats"] == 1 and ok["config"]["grid.id"] == grid_id
    assert ok["summary"]["visual_tokens"] == 4 and ok["summary"]["latency_ms/ttft"] > 0
    assert ok["summary"]["params/total"] > 0 and ok["summary"]["status"] == "ok"
    assert failed["summary"]["status"] == "failed" and failed["summary"]["error/type"] == "ImageSizeError"
    (grid_run,) = [run for run in runs if run["job_type"] == "grid"]
    assert grid_run["name"] == grid_id and grid_run["exit_code"] == 1
    assert grid_run["summary"]["cells"] == 3 and grid_run["summary"]["cells_failed"] == 1
    tables = list(grid_run["files"].glob("files/media/table/cells_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 3 and "latency_ms/ttft" in table["columns"]
    assert list(grid_run["files"].glob("files/media/images/plots/ttft_vs_tokens_*.png"))


def test_a_resumed_grid_logs_only_what_it_has_not_logged(offline, capsys):
    args = ["grid", "tiny", "encoder.image_size=128,192", "--db", str(offline / "r.db"), "--count-only"]
    assert main(args) == 0  # without W&B
    assert main([*args, "--wandb"]) == 0  # resumed with W&B: the stored cells are logged once
    assert main([*args, "--wandb"]) == 0  # again: nothing new per cell, one more grid run
    capsys.readouterr()
    jobs = sorted(run["job_type"] for run in offline_runs(offline))
    assert jobs == ["cell", "cell", "grid", "grid"]


def test_run_logs_one_run_and_config_can_ask_for_it(offline, capsys):
    assert main(["run", "tiny", "--count-only", "--wandb", "--json"]) == 0
    assert main(["run", "tiny", "--count-only", "wandb=true", "encoder.image_size=100"]) == 2
    capsys.readouterr()
    runs = offline_runs(offline)
    assert [(run["job_type"], run["exit_code"]) for run in runs] == [("run", 0), ("run", 1)] or [
        (run["job_type"], run["exit_code"]) for run in runs
    ] == [("run", 1), ("run", 0)]
    assert {run["summary"]["status"] for run in runs} == {"ok", "failed"}


def test_a_batch_grid_with_decoding_logs_its_figures_and_plots_under_stable_names(offline, capsys):
    """The decode, throughput and KV-cache figures reach each cell's summary under the record's own paths, and the
    grid run holds the plots drawn from them."""
    sweep = ["batch_size=1,2"]
    options = ["--repeats", "1", "--warmup", "0", "--max-new-tokens", "3", "--wandb"]
    assert main(["grid", "tiny", *sweep, "--db", str(offline / "r.db"), *options]) == 0
    capsys.readouterr()
    runs = offline_runs(offline)
    cells = {run["name"]: run["summary"] for run in runs if run["job_type"] == "cell"}
    assert set(cells) == {"batch_size=1", "batch_size=2"}
    for batch, summary in ((1, cells["batch_size=1"]), (2, cells["batch_size=2"])):
        assert summary["decode/steps"] == 2 and summary["decode/per_token_ms/median"] > 0
        assert summary["throughput/output_tokens_per_s"] > 0 and summary["throughput/images_per_s"] > 0
        assert summary["kv_cache/bytes"] == summary["kv_cache/measured_bytes"]
        assert summary["kv_cache/bytes"] == batch * summary["kv_cache/bytes_per_token"] * summary["kv_cache/tokens"]
    (grid_run,) = [run for run in runs if run["job_type"] == "grid"]
    images = grid_run["files"] / "files/media/images/plots"
    for plot in ("throughput_vs_batch", "ttft_vs_time_per_token", "kv_cache_vs_tokens"):
        assert list(images.glob(f"{plot}_*.png")), f"no {plot} plot in the grid run"
