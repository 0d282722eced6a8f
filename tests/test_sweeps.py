"""Sweeps across unlike encoders: the nearest valid image size, equal-token sizes, `reducer.score=auto`, upper
bounds for image-dependent reducers without an image, and `--dry-run` planning every cell on the meta device."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ablate
from ablate.api import ImageSizeError, meta_device
from ablate.api.errors import ConfigError
from ablate.grid.expansion import load_grid
from ablate.measurement import counting
from tests.conftest import run_cli

VIT = ["encoder=clip-vit-l14-336"]  # patch 14, a CLS token
CONVNEXT = ["encoder=convnext-l-clip"]  # stride 32, no attention
FASTVITHD = ["encoder=fastvithd"]  # stride 64, attention in its last stages, no CLS


def test_a_size_the_encoder_cannot_take_fails_naming_the_fit_option():
    with pytest.raises(ImageSizeError, match="image_size_fit=nearest") as info:
        ablate.plan("tiny", [*VIT, "encoder.image_size=256"])
    assert "Use encoder.image_size=252 or encoder.image_size=266" in str(info.value)


@pytest.mark.parametrize(("asked", "used"), [(256, 252), (259, 266), (336, 336), (20, 14)])
def test_nearest_takes_the_closest_valid_size_ties_to_the_larger_and_records_it(asked, used):
    record = ablate.plan("tiny", [*VIT, f"encoder.image_size={asked}", "encoder.image_size_fit=nearest"]).to_dict()
    assert record["config"]["encoder"]["image_size"] == asked  # the config as asked
    assert record["tokens"]["encoder"] == (used // 14) ** 2
    if used == asked:
        assert record["choices"] == {}
    else:
        assert record["choices"] == {"encoder.image_size": used}
        assert any(f"ran at {used} px" in note and f"{asked} px asked" in note for note in record["notes"])


@pytest.mark.parametrize(("encoder", "size"), [(FASTVITHD, 512), (VIT, 112), (CONVNEXT, 256)])
def test_target_tokens_runs_each_encoder_at_the_size_that_gives_that_count(encoder, size):
    record = ablate.plan("tiny", [*encoder, "encoder.target_tokens=64"]).to_dict()
    assert record["tokens"]["encoder"] == 64 and record["visual_tokens"] == 64
    assert record["choices"] == {"encoder.image_size": size}


def test_target_tokens_that_no_square_grid_gives_is_refused_with_counts_to_pick():
    with pytest.raises(ConfigError, match=r"square count \(e\.g\. 36 or 49\)"):
        ablate.plan("tiny", [*CONVNEXT, "encoder.target_tokens=40"])


def test_a_timed_run_at_the_nearest_size_feeds_the_encoder_that_size():
    record = ablate.measure(
        "tiny", ["encoder.image_size=100", "encoder.image_size_fit=nearest"], repeats=1, warmup=0, threads=1
    ).to_dict()
    assert record["error"] is None and record["choices"] == {"encoder.image_size": 128}  # tiny's stride: 64
    assert (record["image"]["width"], record["image"]["height"]) == (128, 128)
    assert record["tokens"]["encoder"] == 4


@pytest.mark.parametrize(("encoder", "score"), [(VIT, "cls"), (FASTVITHD, "mean_query"), (CONVNEXT, "mean_similarity")])
def test_score_auto_takes_the_best_score_each_encoder_offers_and_records_it(encoder, score):
    record = ablate.plan("tiny", [*encoder, "encoder.target_tokens=16", "reducer=prumerge"]).to_dict()
    assert record["config"]["reducer"]["score"] == "auto" and record["choices"]["reducer.score"] == score
    explicit = ablate.plan("tiny", [*encoder, "encoder.target_tokens=16", "reducer=visionzip", "reducer.tokens=8"])
    assert explicit.choices["reducer.score"] == score
    chosen = ablate.plan("tiny", [*encoder, "encoder.target_tokens=16", "reducer=prumerge", f"reducer.score={score}"])
    assert "reducer.score" not in chosen.choices  # nothing was left to choose


# ------------------------------------------------------------------------------------ upper bounds


def test_count_only_gives_an_adaptive_reducer_its_upper_bound_with_flops_labelled():
    record = ablate.measure("tiny", ["encoder.image_size=512", "reducer=prumerge"], count_only=True).to_dict()
    received = record["tokens"]["encoder"]
    assert received == 64
    assert record["count_basis"] == "upper bound"
    assert record["visual_tokens"] == record["tokens"]["reducer"] == math.ceil((received - 1) / 4) + 1
    assert record["flops"]["total"] is not None and record["flops"]["prefill"] > 0
    assert any("upper bound" in note and f"at most {record['visual_tokens']}" in note for note in record["notes"])
    fixed = ablate.measure("tiny", ["reducer=prumerge", "reducer.tokens=4"], count_only=True).to_dict()
    assert fixed["count_basis"] == "config" and fixed["visual_tokens"] == 4


def _most_kept(reducer_name: str, scores: torch.Tensor) -> int:
    vlm = ablate.build("tiny", ["encoder.image_size=256", f"reducer={reducer_name}"], meta=True)
    return vlm.reducer.select(scores).shape[1], vlm.reducer.most_kept(scores.shape[1])


@pytest.mark.parametrize("reducer_name", ["prumerge", "prumerge-plus"])
def test_the_stated_bound_holds_for_any_scores_and_prumerge_reaches_it(reducer_name):
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(4, 80, (1,), generator=generator))
        if trial % 2:
            scores = torch.rand(1, n, generator=generator) ** 8  # heavy right tail: many outliers
        else:
            scores = (torch.rand(1, n, generator=generator) < 0.3).float()  # a block of equal outliers
        kept, bound = _most_kept(reducer_name, scores)
        assert kept <= bound, (n, scores)
    n = 64
    extreme = torch.cat([torch.zeros(1, 48), torch.ones(1, 16)], dim=1)  # 16 of 64 clear the fence
    kept, bound = _most_kept("prumerge", extreme)
    assert kept == bound == math.ceil((n - 1) / 4)


def test_a_timed_adaptive_count_on_random_weights_says_it_means_nothing():
    record = ablate.measure(
        "tiny", ["encoder.image_size=256", "reducer=prumerge"], repeats=1, warmup=0, threads=1
    ).to_dict()
    assert record["count_basis"] == "measured image" and record["visual_tokens"] is not None
    assert any("random weights" in note and "says nothing" in note for note in record["notes"])


# ------------------------------------------------------------------------------------ counting fast


@pytest.mark.parametrize("preset", ["tiny", "fastvlm-0.5b"])
def test_prefill_flops_from_the_quadratic_fit_equal_a_direct_count(preset):
    vlm = ablate.build(preset, meta=True)
    for tokens in (1, 63, 200, 577, 3000):
        assert counting.count_prefill_flops(vlm, 2, tokens) == counting._prefill_flops(vlm, 2, tokens)


def test_meta_device_builds_the_same_shapes_without_running_initialisers():
    import timm

    for name in ("vit_small_patch16_224", "fastvit_t8", "convnext_atto"):
        with torch.device("meta"):
            plain = timm.create_model(name)
        with meta_device():
            fast = timm.create_model(name)
        assert [(k, v.shape) for k, v in plain.state_dict().items()] == [
            (k, v.shape) for k, v in fast.state_dict().items()
        ]
        assert all(p.is_meta for p in fast.parameters())
    with meta_device():
        layer = torch.nn.Linear(3, 4)
        layer.weight.requires_grad_(False)  # flags still change: only value-only operations are skipped
    assert not layer.weight.requires_grad


# ------------------------------------------------------------------------------------ grids and dry runs


def test_the_mission_grid_expands_to_90_cells_that_all_resolve():
    grid = load_grid("mission")
    assert len(grid.cells) == 90 and not [cell for cell in grid.cells if cell.error]


def test_a_subset_of_the_mission_grid_plans_with_no_failing_cell(tmp_path):
    db = tmp_path / "r.db"
    result = run_cli("grid", "mission", "decoder.arch=qwen2-0.5b", "encoder.image_size=256,1536", "--dry-run",
                     "--db", str(db), "--json")  # fmt: skip
    plans = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0, result.stderr
    assert len(plans) == 12 and all(plan["error"] is None for plan in plans)
    assert {plan["choices"].get("encoder.image_size") for plan in plans} == {None, 252, 1540}
    assert all(plan["flops"]["total"] and plan["params"]["total"] for plan in plans)
    assert not db.exists()  # a dry run stores nothing


def test_dry_run_names_the_cell_that_would_fail_with_its_error_before_anything_runs(tmp_path):
    db = tmp_path / "r.db"
    grid = ["grid", "tiny", "encoder=clip-vit-l14-336", "encoder.image_size=224,256", "--dry-run", "--db", str(db)]
    table = run_cli(*grid)
    assert table.returncode == 1 and "1 would fail" in table.stdout
    result = run_cli(*grid, "--json")
    assert result.returncode == 1
    fine, failing = [json.loads(line) for line in result.stdout.splitlines()]
    assert fine["error"] is None and fine["visual_tokens"] == 256
    assert failing["error"]["type"] == "ImageSizeError" and "multiple of 14" in failing["error"]["message"]
    assert failing["config"]["encoder"]["image_size"] == 256
    assert not db.exists()  # nothing ran, nothing was stored
