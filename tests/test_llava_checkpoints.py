"""transformers' LLaVA-1.5 and LLaVA-OneVision checkpoints through `ablate.from_checkpoint`: tiny models built by
transformers, saved, loaded back strictly, and compared with transformers' own first-token logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

import ablate
from ablate.api.errors import CheckpointError
from ablate.cli import main

IMAGE_TOKEN = 150
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=160)
VISION = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4, patch_size=14)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(VISION, model_type="clip_vision_model", image_size=56, projection_dim=16),
        text_config=dict(TEXT, model_type="llama", num_key_value_heads=4),
        image_token_index=IMAGE_TOKEN,
    )
    model = LlavaForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("llava")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=dict(VISION, model_type="siglip_vision_model", image_size=28, vision_use_head=False),
        text_config=dict(TEXT, model_type="qwen2", num_key_value_heads=2),
        image_token_index=IMAGE_TOKEN,
        video_token_index=IMAGE_TOKEN + 1,
        image_grid_pinpoints=[[28 * i, 28 * j] for i in range(1, 7) for j in range(1, 7)],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("onevision")
    model.save_pretrained(directory)
    return model, directory


def prompts(visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ids (one placeholder per visual token) and ablate's (one placeholder)."""
    before, after = [1, 5], [7, 9, 11]
    theirs = torch.tensor([before + [IMAGE_TOKEN] * visual + after])
    return theirs, torch.tensor([before + [IMAGE_TOKEN] + after])


def test_llava_first_token_logits_equal_transformers(llava):
    model, directory = llava
    vlm = ablate.from_checkpoint(directory)
    assert vlm.config.encoder.name == "clip-vit-l14-336" and vlm.config.encoder.feature_block == 1  # hidden_states[-2]
    assert vlm.num_visual_tokens() == 16  # 4x4 patches, CLS dropped ('default' strategy)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    theirs_ids, ours_ids = prompts(16)
    with torch.no_grad():
        reference = model(input_ids=theirs_ids.repeat(2, 1), pixel_values=pixels).logits[:, -1]
        ours = vlm.prefill(pixels, ours_ids.repeat(2, 1))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width,height", [(168, 168), (100, 60), (50, 140)])
def test_onevision_first_token_logits_equal_transformers(onevision, width, height):
    """Tiles, unpadding, the anyres_max_9 shrink (168 px: a 6x6 grid) and newlines, against transformers."""
    model, directory = onevision
    vlm = ablate.from_checkpoint(directory, [f"input_size=[{width},{height}]"])
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    pixels = vlm.encoder.prepare(image).unsqueeze(0)
    visual = vlm.num_visual_tokens()
    theirs_ids, ours_ids = prompts(visual)
    with torch.no_grad():
        reference = model(
            input_ids=theirs_ids, pixel_values=pixels, image_sizes=torch.tensor([[height, width]])
        ).logits[:, -1]
        ours = vlm.prefill_stage(vlm.run_vision(vlm.start(pixels, ours_ids, image_size=(width, height))))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_sizes_come_from_the_checkpoint_config(onevision):
    _, directory = onevision
    config = ablate.load_config(str(directory))
    tile = config.encoder.tile
    assert tile["model_kwargs"]["embed_dim"] == 32 and tile["model_kwargs"]["depth"] == 3 and tile["image_size"] == 28
    assert tile["feature_block"] == 2 and config.connector.max_tiles == 9
    assert config.decoder.overrides["hidden_size"] == 64 and config.image_token_id == IMAGE_TOKEN


def _hub_4x(key: str) -> str:
    """transformers 4.x names, as llava-hf checkpoints on disk have them (save_pretrained here drops vision_model.)."""
    return key.replace("vision_tower.", "vision_tower.vision_model.")


@pytest.mark.parametrize("layout", ["module names", "hub 4.x names"])
def test_other_key_layouts_load_too(llava, tmp_path, layout):
    """The in-memory module names (model.vision_tower.*, model.language_model.*, lm_head.*) and the 4.x hub names."""
    model, directory = llava
    if layout == "module names":
        tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    else:
        tensors = {_hub_4x(key): value for key, value in load_file(str(directory / "model.safetensors")).items()}
    assert any(
        key.startswith("model.vision_tower." if layout == "module names" else "vision_tower.vision_model.")
        for key in tensors
    )
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    pixels = torch.randn(1, 3, 56, 56)
    theirs_ids, ours_ids = prompts(16)
    with torch.no_grad():
        reference = model(input_ids=theirs_ids, pixel_values=pixels).logits[:, -1]
        ours = ablate.from_checkpoint(tmp_path).prefill(pixels, ours_ids)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_loading_is_strict(llava, tmp_path):
    _, directory = llava
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["vision_tower.encoder.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match="do not match its architecture.*self_attn"):
        ablate.from_checkpoint(tmp_path)


def test_unsupported_tower_is_named(llava, tmp_path):
    _, directory = llava
    config = json.loads((directory / "config.json").read_text())
    config["vision_feature_layer"] = [-2, -5]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_feature_layer"):
        ablate.load_config(str(tmp_path))


def test_ablate_run_on_the_directory(onevision, capsys):
    _, directory = onevision
    assert main(["run", str(directory), "--repeats", "1", "--warmup", "0", "--json", "input_size=[100,60]"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["error"] is None and record["weights"] and record["latency_ms"]["ttft"] > 0
    assert record["visual_tokens"] == 40
