"""FastVLM's baselines as presets: token counts, encoder sizes and feature selection as each system uses them.

Full-size models are built on the meta device here (shapes and counts without memory); the real full-size forwards
are under `-m slow`.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image

import ablate
from ablate.cli import main
from ablate_plugins.encoders.timm_encoder import ClipViTL14, ConvLLaVA, ConvNeXtL, SigLIP

NEW_PRESETS = (
    "llava-1.5-7b",
    "convllava-768",
    "convllava-1024",
    "convllava-1536",
    "llava-onevision-0.5b",
    "mobilevlm-v2-1.7b",
)


def visual_tokens(config: str, overrides=()) -> int:
    return ablate.build(config, list(overrides), meta=True).num_visual_tokens()


@pytest.mark.parametrize(
    "config,overrides,tokens",
    [
        ("llava-1.5-7b", [], 576),
        ("convllava-768", [], 144),
        ("convllava-1024", [], 256),
        ("convllava-1536", [], 576),
        ("fastvit-mci2", [], 576),  # FastViT at 768 px: 4x FastViTHD's 144
        ("fastvlm-0.5b", ["encoder.image_size=768"], 144),
        ("llava-onevision-0.5b", [], 7371),  # 729 + 81 x (81 + 1)
        ("llava-onevision-0.5b", ["input_size=[1920,1080]"], 7269),
        ("mobilevlm-v2-1.7b", [], 144),  # LDPv2: 576 -> 12 x 12
    ],
)
def test_visual_tokens(config, overrides, tokens):
    assert visual_tokens(config, overrides) == tokens


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta(cls, **options):
    with torch.device("meta"):
        return cls(cls.Config(name=cls.name, **options))


def test_encoder_params_match_the_published_sizes():
    """Within 1% of the sizes timm's own models give: CLIP ViT-L/14 303.5M, ConvNeXt-L 198.6M, SigLIP-SO400M without
    its MAP head 413.0M before LLaVA-OneVision drops a block; and ConvLLaVA's fifth stage (a ConvNeXtStage from 1536
    to 3072 wide, 6 blocks, as its code adds it), about 473M."""
    assert _params(_meta(ClipViTL14)) == pytest.approx(303.5e6, rel=0.01)
    assert _params(_meta(ConvNeXtL)) == pytest.approx(198.6e6, rel=0.01)
    convllava = _meta(ConvLLaVA)
    assert _params(convllava.model.stages[4]) == pytest.approx(473e6, rel=0.01)  # the added fifth stage
    # SigLIP-SO400M without its MAP head is 413.0M over 27 blocks; LLaVA-OneVision drops one block.
    width, hidden = 1152, 4304
    block = 4 * width * width + 4 * width + 2 * width * hidden + hidden + width + 4 * width
    assert _params(_meta(SigLIP)) == pytest.approx(413.0e6 - block, rel=0.01)


def test_convllava_is_stride_64_and_3072_wide():
    encoder = _meta(ConvLLaVA)
    assert encoder.width == 3072 and [encoder.num_tokens(s) for s in (768, 1024, 1536)] == [144, 256, 576]


def test_clip_selection_equals_forward_intermediates_on_a_small_vit():
    """The same selection path as the full-size check below, on a 4-block ViT (fast)."""
    kwargs = {"embed_dim": 64, "depth": 4, "num_heads": 4}
    encoder = ClipViTL14(ClipViTL14.Config(name="clip-vit-l14-336", feature_block=2, model_kwargs=kwargs)).eval()
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        ours = encoder(ablate.api.StageContext(pixel_values=pixels)).tokens
        reference = encoder.model.forward_intermediates(
            pixels, indices=[2], norm=False, output_fmt="NLC", return_prefix_tokens=False, intermediates_only=True
        )[0]
    assert ours.shape == (2, 576, 64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.slow
def test_clip_selection_equals_timm_forward_intermediates_full_size():
    """LLaVA-1.5's tower: timm forward_intermediates(indices=[22], norm=False) patch tokens, exactly."""
    torch.manual_seed(0)
    encoder = ClipViTL14(ClipViTL14.Config(name="clip-vit-l14-336")).eval()
    model = timm.create_model("vit_large_patch14_clip_336", pretrained=False, num_classes=0).eval()
    model.load_state_dict(encoder.model.state_dict())
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        ours = encoder(ablate.api.StageContext(pixel_values=pixels)).tokens
        reference = model.forward_intermediates(
            pixels, indices=[22], norm=False, output_fmt="NLC", return_prefix_tokens=False, intermediates_only=True
        )[0]
    assert ours.shape == (1, 576, 1024)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_every_new_preset_runs_count_only(preset, capsys):
    assert main(["run", preset, "--count-only", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["error"] is None and record["visual_tokens"] > 0 and record["flops"]["total"] > 0


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_presets_name_their_source(preset):
    from ablate.config.presets import preset_files

    first = preset_files()[preset].read_text().splitlines()[0]
    assert first.startswith("# ") and "FastVLM table 6 row R" in first  # the paper row it reproduces


def test_image_sets_the_input_size(tmp_path, capsys):
    path = tmp_path / "wide.png"
    Image.new("RGB", (1920, 1080), (10, 20, 30)).save(path)
    assert main(["run", "llava-onevision-0.5b", "--count-only", "--json", "--image", str(path)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["visual_tokens"] == 7269 and record["config"]["input_size"] == [1920, 1080]
    assert record["image"]["width"] == 1920


def test_input_size_leaves_square_encoders_alone():
    assert visual_tokens("fastvlm-0.5b", ["input_size=[1920,1080]"]) == 256


def test_timed_run_uses_the_input_size_for_its_synthetic_image():
    record = ablate.measure("tiny", ["input_size=[200,100]"], repeats=1, warmup=0).to_dict()
    assert (record["image"]["width"], record["image"]["height"]) == (200, 100)
