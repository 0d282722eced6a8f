"""AnyRes tiling and LLaVA-OneVision's merge, checked against transformers' own LLaVA-OneVision code (nothing is
downloaded: the processor gets a tiny in-memory tokenizer)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import (
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

import ablate
from ablate.api.components import StageContext, TokenLayout
from ablate.api.errors import ConfigError
from ablate_plugins.connectors.anyres import AnyResMerge
from ablate_plugins.connectors.downsample import LDPv2, PixelShuffle
from ablate_plugins.encoders.anyres import AnyRes, select_best_resolution

SIGLIP_MEAN = [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def onevision():
    """The paper's LLaVA-OneVision-0.5B vision side on the meta device: counts for any input size."""
    return ablate.build("llava-onevision-0.5b", meta=True)


@pytest.fixture(scope="module")
def processor():
    vocab = {"<image>": 0, "<video>": 1, "[UNK]": 2, "a": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    image_processor = LlavaOnevisionImageProcessorPil(image_mean=SIGLIP_MEAN, image_std=SIGLIP_MEAN)
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def our_count(vlm, width: int, height: int) -> int:
    vlm.encoder.input_size = (width, height)
    return vlm.num_visual_tokens()


SIZES = [(1152, 1152), (1920, 1080), (1080, 1920), (384, 384), (1, 1), (5000, 37), (37, 5000), (640, 480), (2304, 2304)]
SIZES += [(random.Random(seed).randint(1, 4000), random.Random(seed + 1000).randint(1, 4000)) for seed in range(200)]


def test_paper_settings(onevision):
    assert our_count(onevision, 1152, 1152) == 729 + 81 * (81 + 1) == 7371
    assert our_count(onevision, 1920, 1080) == 7269


@pytest.mark.parametrize("width,height", SIZES[:9] + SIZES[9::20])
def test_count_equals_the_processors_formula(onevision, processor, width, height):
    expected = processor._get_number_of_features(height, width, 384, 384)
    assert our_count(onevision, width, height) == expected


def test_count_equals_the_processors_formula_for_many_sizes(onevision, processor):
    mismatches = [
        (w, h) for w, h in SIZES if our_count(onevision, w, h) != processor._get_number_of_features(h, w, 384, 384)
    ]
    assert not mismatches


@pytest.mark.parametrize("width,height", [(1920, 1080), (500, 333), (90, 700)])
def test_count_and_crops_equal_the_processor_run_on_an_image(onevision, processor, width, height):
    """The whole processor on a real image: its image-token count and its crops equal ours."""
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    inputs = processor(images=image, text="<image>", return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == our_count(onevision, width, height)
    # SigLIP tiles as LLaVA-OneVision preprocesses them (one block: prepare needs no weights).
    tile = {"name": "siglip-so400m", "model_kwargs": {"depth": 1}}
    ours = AnyRes(AnyRes.Config(name="anyres", tile=tile)).prepare(image)
    theirs = inputs["pixel_values"][0]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), atol=0.02, rtol=0)  # both PIL bicubic; uint8 rounding only


def test_best_resolution_equals_transformers():
    candidates = [(384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)]
    for w, h in SIZES:
        assert select_best_resolution((h, w), candidates) == hf_select_best_resolution((h, w), candidates)


def test_layout_declares_the_tiles(onevision):
    onevision.encoder.input_size = (1920, 1080)
    layout = onevision.encoder.output_layout()
    assert layout.image_size == (1920, 1080) and layout.crops[0].tile is None
    assert [crop.tile for crop in layout.crops[1:]] == [(r, c) for r in range(3) for c in range(5)]
    merged = onevision.connector.output_layout(layout)
    assert merged.crops[-1].newlines and merged.num_tokens == 7269


def tiny_anyres(**options) -> AnyRes:
    tile = {"name": "timm", "model_name": "vit_tiny_patch16_224", "image_size": 32}
    return AnyRes(AnyRes.Config(name="anyres", tile=tile, **options)).eval()


def test_forward_runs_every_crop_through_the_tile_encoder():
    encoder = tiny_anyres()
    encoder.input_size = (100, 50)
    image = Image.new("RGB", (100, 50), (200, 10, 10))
    pixels = encoder.prepare(image).unsqueeze(0)
    assert tuple(pixels.shape) == encoder.input_shape(1)
    with torch.no_grad():
        out = encoder(StageContext(pixel_values=pixels, layout=TokenLayout(image_size=(100, 50))))
        crop = encoder.tile(StageContext(pixel_values=pixels[:, 2])).tokens
    assert out.layout.num_tokens == out.tokens.shape[1] == pixels.shape[1] * 4
    torch.testing.assert_close(out.tokens[:, 8:12], crop)  # the second crop's tokens, in order


def test_merge_drops_padding_and_adds_newlines():
    encoder = tiny_anyres()
    connector = AnyResMerge(AnyResMerge.Config(name="llava-anyres"), encoder.width, 8).eval()
    encoder.input_size = (96, 40)  # 1 row x 3 tiles of 2x2 tokens -> a 2x6 map; the image fills 40/32 of 64 rows
    layout = encoder.output_layout()
    out_layout = connector.output_layout(layout)
    tokens = torch.randn(1, layout.num_tokens, encoder.width)
    with torch.no_grad():
        out = connector(StageContext(tokens=tokens, layout=layout))
    assert out.tokens.shape[1] == out_layout.num_tokens == out.layout.num_tokens
    rows, cols = out_layout.crops[-1].grid
    newline = out.tokens[0, 4 + cols :: cols + 1]  # after the base crop's 4 tokens, every row's last token
    assert newline.shape[0] == rows and torch.allclose(newline, connector.image_newline.expand_as(newline))


def test_anyres_refuses_tiles_with_loose_tokens():
    tile = {"name": "timm", "model_name": "vit_tiny_patch16_224", "image_size": 32, "keep_prefix_tokens": True}
    with pytest.raises(ConfigError, match="one grid of tokens per tile"):
        AnyRes(AnyRes.Config(name="anyres", tile=tile))


def test_anyres_checks_the_tile_node_strictly():
    with pytest.raises(ConfigError, match="Unknown config key 'encoder.tile.imagesize'.*image_size"):
        ablate.load_config("llava-onevision-0.5b", ["encoder.tile.imagesize=384"])
    with pytest.raises(ConfigError, match="Unknown encoder 'nope'"):
        ablate.load_config("llava-onevision-0.5b", ["encoder.tile.name=nope"])


def test_pixel_shuffle_equals_internvl():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    connector = PixelShuffle(PixelShuffle.Config(name="pixel-shuffle"), 8, 16)
    tokens = torch.randn(2, 6 * 4, 8)
    expected = InternVLModel.pixel_shuffle(None, tokens.reshape(2, 6, 4, 8), 0.5).reshape(2, -1, 32)
    with torch.no_grad():
        out = connector(StageContext(tokens=tokens, layout=TokenLayout.grid_of(6, 4)))
        reference = connector.mlp(connector.norm(expected))
    assert out.layout == TokenLayout.grid_of(3, 2)
    torch.testing.assert_close(out.tokens, reference)


def test_ldpv2_pools_576_to_144():
    connector = LDPv2(LDPv2.Config(name="ldpv2"), 32, 16).eval()
    with torch.no_grad():
        out = connector(StageContext(tokens=torch.randn(1, 576, 32), layout=TokenLayout.grid_of(24, 24)))
    assert out.tokens.shape == (1, 144, 16) and out.layout == TokenLayout.grid_of(12, 12)
