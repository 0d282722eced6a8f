"""Reducers x encoders (tiny variants), every cell measured: the grid FastVLM's table 5 implies, with the plain
downsampling baseline beside the reducers.

Written as a plain loop over `ablate.measure` calls while the grid runner is being built; when `ablate grid` lands,
switch `test_grid_reducers_x_encoders` to it (same cells: one encoder axis, one reducer axis, the budget)."""

from __future__ import annotations

import pytest

import ablate
from ablate.model.downsampling import downsampled

ENCODERS = {  # 16 visual tokens each; the score each one offers in place of the CLS attention where it has none
    "vit": (
        [
            "encoder=timm",
            "encoder.model_name=vit_tiny_patch16_224",
            "encoder.image_size=64",
            "encoder.feature_block=-2",
        ],
        "cls",
    ),
    "fastvit": (["encoder=fastvit-tiny", "encoder.image_size=256"], "mean_query"),
    "convnext": (["encoder=timm", "encoder.model_name=convnext_atto", "encoder.image_size=128"], "mean_similarity"),
}
BUDGET = 4
DECODER = ["decoder.overrides.num_hidden_layers=3"]


def cells(encoder: str) -> dict[str, list[str]]:
    overrides, score = ENCODERS[encoder]
    base = overrides + DECODER
    scored = [f"reducer.score={score}", "reducer.k_nn=4"]
    return {
        "none": [*base, "reducer=none"],
        "avgpool": [*base, "reducer=avgpool", f"reducer.tokens={BUDGET}"],
        "matryoshka": [*base, "reducer=matryoshka", f"reducer.tokens={BUDGET}"],
        "prumerge (adaptive)": [*base, "reducer=prumerge", *scored],
        "prumerge": [*base, "reducer=prumerge", f"reducer.tokens={BUDGET}", *scored],
        "prumerge-plus": [*base, "reducer=prumerge-plus", f"reducer.tokens={BUDGET}", *scored],
        "visionzip": [*base, "reducer=visionzip", f"reducer.tokens={BUDGET}", f"reducer.score={score}"],
        "random": [*base, "reducer=random", f"reducer.tokens={BUDGET}"],
        "fastv": [*base, "reducer=fastv", "reducer.layer=1", f"reducer.tokens={BUDGET}"],
        "downsample": downsampled("tiny", BUDGET, base),
    }


@pytest.mark.parametrize("encoder", ENCODERS)
def test_grid_reducers_x_encoders(encoder):
    records = {
        name: ablate.measure("tiny", overrides, repeats=1, warmup=0, threads=1, fidelity=True).to_dict()
        for name, overrides in cells(encoder).items()
    }
    for name, record in records.items():
        assert record["error"] is None, name
        assert record["tokens"]["encoder"] == (16 if name != "downsample" else BUDGET), name
        assert all(record["latency_ms"][stage] is not None for stage in ("reducer", "ttft")), name
        assert record["flops"]["total"] is not None and record["fidelity"] is not None, name
    visual = {name: record["visual_tokens"] for name, record in records.items()}
    assert visual == {
        **dict.fromkeys(records, BUDGET),
        "none": 16,
        "fastv": 16,
        "prumerge (adaptive)": visual["prumerge (adaptive)"],
    }
    assert records["none"]["fidelity"] == {**records["none"]["fidelity"], "top1_agreement": 1.0, "kl": 0.0}
    assert records["fastv"]["flops"]["prefill"] < records["none"]["flops"]["prefill"]
    unchanged = {name for name, r in records.items() if any("leaves the LLM input unchanged" in n for n in r["notes"])}
    assert unchanged == {"fastv"}
