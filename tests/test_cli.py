"""The `ablate` command as users run it: JSON record, tables, and one-paragraph errors."""

from __future__ import annotations

import pytest
from conftest import run_cli, run_json

import ablate

LATENCY_KEYS = {"preprocess", "encoder", "reducer", "connector", "prefill", "stage_sum", "ttft"}


def test_run_json_record_has_every_field():
    record = run_json("tiny", "--repeats", "2", "--warmup", "1")
    assert record["error"] is None
    assert record["visual_tokens"] == 4 and record["prompt_tokens"] == 16  # 128 px / stride 64 = 2x2
    assert set(record["params"]) == {"encoder", "reducer", "connector", "decoder", "total"}
    assert record["params"]["total"] == sum(record["params"][k] for k in ("encoder", "reducer", "connector", "decoder"))
    assert set(record["flops"]) >= {"encoder", "connector", "prefill", "total"}
    assert record["flops"]["encoder"] > 0 and record["flops"]["prefill"] > 0
    assert (
        set(record["latency_ms"]) == LATENCY_KEYS == set(record["latency_spread_ms"]) == set(record["latency_min_ms"])
    )
    assert all(record["latency_ms"][k] > 0 for k in LATENCY_KEYS)
    assert record["latency_ms"]["stage_sum"] >= record["latency_ms"]["encoder"]
    assert record["run"]["mode"] == "eager" and record["run"]["dtype"] == "float32"
    assert record["run"]["device"] == "cpu" and record["run"]["threads"] >= 1
    assert {"ablate", "plugins", "libraries", "python", "device_name"} <= set(record["env"])
    assert {"torch", "timm", "transformers", "omegaconf"} <= set(record["env"]["libraries"])
    assert record["env"]["plugins"]["fastvit"] == record["env"]["ablate"]  # built-ins share ablate's version
    assert record["tokens"] == {"encoder": 4, "reducer": 4, "connector": 4, "llm_input": 20}
    assert record["image"] == {"source": "synthetic", "width": 128, "height": 128, "sha256": None}
    assert record["run"]["seed"] == 0
    assert record["config"]["encoder"]["name"] == "fastvit-tiny"
    assert 0 <= record["peak_memory_mb"] < 100 < record["memory"]["baseline_mb"]  # the run's own, not the process's
    assert record["timing"]["repeats"] == 2 and record["timing"]["stop"] == "repeats"


def test_table_output_and_threads():
    result = run_cli("run", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "TTFT" in result.stdout and "stage sum" in result.stdout and "1 threads" in result.stdout
    assert (
        "min ms" in result.stdout
        and "medians of 1 repeats" in result.stdout
        and "allocated by the run" in result.stdout
    )


def test_count_only_fastvlm_0_5b_at_512():
    record = run_json("fastvlm-0.5b", "encoder.image_size=512", "--count-only")
    assert record["visual_tokens"] == 64
    assert record["params"]["encoder"] == 122_714_208
    assert record["params"]["connector"] == 3_557_120
    assert record["latency_ms"]["ttft"] is None


@pytest.mark.parametrize("size,tokens", [(256, 16), (768, 144), (1024, 256)])
def test_fastvithd_token_counts(size, tokens):
    assert run_json("fastvlm-0.5b", f"encoder.image_size={size}", "--count-only")["visual_tokens"] == tokens


def test_count_only_7b_on_a_small_machine():
    record = run_json("fastvlm-7b", "--count-only")
    assert record["visual_tokens"] == 256
    assert record["params"]["connector"] == 23_862_272
    assert record["params"]["decoder"] == 7_615_616_512
    assert record["flops"]["prefill"] > 1e12


def test_7b_in_float32_is_refused_when_it_cannot_fit():
    import torch

    from ablate.measurement.machine import available_memory

    if (available_memory(torch.device("cpu")) or 0) > 40 * 2**30:
        pytest.skip("this machine has room for a 7B model in float32")
    result = run_cli("run", "fastvlm-7b", "--repeats", "1")
    assert result.returncode != 0
    assert "--count-only" in result.stderr and "bfloat16" in result.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["tiny", "encoder=fastvithdd"], "Did you mean 'fastvithd'"),
        (["tiny", "encoder.imagesize=128"], "encoder.imagesize"),
        (["tiny", "encoder.image_size=100"], "multiple of 64"),
        (["tiny", "reducer=prumerge", "reducer.score=cls"], "needs cls from the encoder"),
    ],
)
def test_bad_input_exits_nonzero_with_one_paragraph(args, expected):
    result = run_cli("run", *args, "--count-only")
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n\n") == 0  # one paragraph


def test_json_error_is_still_one_object():
    import json

    result = run_cli("run", "tiny", "encoder=nope", "--json")
    assert result.returncode == 2
    assert "nope" in json.loads(result.stdout)["error"]["message"]


def test_show_list_plugins():
    show = run_cli("show", "fastvlm-0.5b", "encoder.image_size=512")
    assert show.returncode == 0 and "image_size: 512" in show.stdout
    listing = run_cli("list", "encoder")
    assert listing.returncode == 0 and "fastvithd" in listing.stdout and "timm" in listing.stdout
    plugins = run_cli("plugins")
    assert plugins.returncode == 0 and "fastvit" in plugins.stdout and "error" not in plugins.stdout


def test_swap_to_clip_vit_in_one_override():
    record = run_json(
        "fastvlm-0.5b",
        "encoder=timm",
        "encoder.model_name=vit_large_patch14_clip_336",
        "encoder.image_size=336",
        "--count-only",
    )
    assert record["visual_tokens"] == 576
    assert record["params"]["connector"] == 1024 * 896 + 896 + 896 * 896 + 896


def test_version_and_the_shipped_files():
    version = run_cli("--version")
    assert version.returncode == 0 and f"ablate {ablate.__version__} (distribution ablate-vlm)" in version.stdout
    grids = run_cli("list", "grids")
    assert grids.returncode == 0 and "fastvlm-resolution" in grids.stdout and "encoder-comparison" in grids.stdout
    for kind, shipped in (("claims", "fastvlm"), ("stages", "stage1_5"), ("presets", "llava-onevision-0.5b")):
        listing = run_cli("list", kind)
        assert listing.returncode == 0 and shipped in listing.stdout, (kind, listing.stdout)


def test_a_grid_of_gpu_cells_expands_here_and_each_cell_fails_on_its_own(tmp_path):
    """Expanding a grid never checks this machine; each cell's run does, and stores its own error row."""
    import torch

    from ablate.grid.store import Store

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the cells would run")
    grid = ["grid", "tiny", "encoder.image_size=64,128", "--device", "cuda", "--db", str(tmp_path / "r.db")]
    dry = run_cli(*grid, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "encoder.image_size=64" in dry.stdout and "encoder.image_size=128" in dry.stdout
    assert "2 to run" in dry.stdout and "will fail" not in dry.stdout
    ran = run_cli(*grid, "--repeats", "1")
    assert ran.returncode == 1 and "2 of 2 cells failed" in ran.stderr
    with Store(tmp_path / "r.db", create=False) as store:
        rows = store.rows(status="failed")
    assert len(rows) == 2
    for row in rows:
        assert row.record["error"]["type"] == "ResourceError" and "no CUDA GPU" in row.record["error"]["message"]
        assert row.record["config"]["run"]["device"] == "cuda"  # the failed row keeps its config for filters
