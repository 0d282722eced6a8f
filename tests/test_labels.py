"""Cell labels (ablate.report.labels): only the keys that vary, only where they apply, what ran, short."""

from __future__ import annotations

import pytest

import ablate
from ablate.report.labels import cell_label, cell_labels, cell_values, varying_keys

VIT = ["encoder=timm", "encoder.model_name=vit_tiny_patch16_224", "encoder.image_size=64"]
FIT = "encoder.image_size_fit=nearest"  # in every record, so that it does not vary


@pytest.fixture(scope="module")
def records():
    """Real count-only records: tiny's FastViT-shaped encoder asked for 100 px (snapped to 128), a timm ViT at 64 px,
    and a second timm ViT with PruMerge."""

    def measure(*overrides):
        return ablate.measure("tiny", [*overrides, FIT], count_only=True).to_dict()

    return {
        "fastvit": measure("encoder.image_size=100"),
        "vit": measure(*VIT),
        "vit_small": measure(*VIT[:1], "encoder.model_name=vit_small_patch16_224", "encoder.image_size=64"),
        "vit_pruned": measure(*VIT, "reducer=prumerge"),
    }


def test_labels_name_only_what_varies_and_applies(records):
    fastvit, vit = records["fastvit"], records["vit"]
    # the ViT's model_name is an option FastViT lacks, one value per encoder: the name says it
    assert varying_keys([fastvit, vit]) == ["encoder.name", "encoder.image_size"]
    assert cell_labels([fastvit, vit]) == ["fastvit-tiny 128px", "timm 64px"]  # 128: the size that ran, not 100
    assert "None" not in " ".join(cell_labels([fastvit, vit, records["vit_pruned"]]))
    assert cell_values(fastvit, ["encoder.model_name", "encoder.image_size"]) == {"encoder.image_size": 128}


def test_an_option_that_varies_within_one_component_is_kept(records):
    vit, small = records["vit"], records["vit_small"]
    assert cell_labels([vit, small]) == ["model_name=vit_tiny_patch16_224", "model_name=vit_small_patch16_224"]
    # FastViT has no model_name: its label leaves the option out rather than writing model_name=None
    labels = cell_labels([records["fastvit"], vit, small])
    assert labels == [
        "fastvit-tiny 128px",
        "timm 64px model_name=vit_tiny_patch16_224",
        "timm 64px model_name=vit_small_patch16_224",
    ]


def test_other_components_and_their_chosen_options_are_named_by_kind(records):
    vit, pruned = records["vit"], records["vit_pruned"]
    assert pruned["choices"] == {"reducer.score": "cls"}  # `auto` took the ViT's CLS attention
    # the score is an option only PruMerge has, one value here: the reducer's name says it
    assert cell_labels([vit, pruned]) == ["reducer=none", "reducer=prumerge"]
    fastvit_pruned = ablate.measure("tiny", ["encoder.image_size=128", "reducer=prumerge", FIT], count_only=True)
    # two encoders under `auto`, two scores: now the score tells the cells apart, and it is what ran
    labels = cell_labels([pruned, fastvit_pruned.to_dict()])
    assert fastvit_pruned.choices["reducer.score"] != "cls"  # FastViT has no CLS token
    assert labels == ["timm 64px score=cls", f"fastvit-tiny 128px score={fastvit_pruned.choices['reducer.score']}"]


def test_labels_without_a_varying_key_fall_back_to_the_name(records):
    vit = records["vit"]
    assert varying_keys([vit, vit]) == []
    assert cell_labels([vit, vit]) == ["tiny", "tiny"]
    assert cell_label(vit, [], fallback="(base)") == "(base)"


def test_keys_that_read_alike_keep_their_kind():
    def record(encoder_weights, decoder_weights):
        return {"config": {"encoder": {"weights": encoder_weights}, "decoder": {"weights": decoder_weights}}}

    records = [record("a.pt", "x.pt"), record("b.pt", "y.pt")]
    assert cell_labels(records) == [
        "encoder.weights=a.pt decoder.weights=x.pt",
        "encoder.weights=b.pt decoder.weights=y.pt",
    ]
