"""Real weights, offline: transformers and ml-fastvlm checkpoint directories written here, loaded strictly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FastVlmConfig, FastVlmForConditionalGeneration

import ablate
from ablate.errors import CheckpointError
from test_fastvit_family import official_names

IMAGE_TOKEN = 1000
TINY_TEXT = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny FastVlmForConditionalGeneration (FastViTHD-shaped tower via timm model_args) saved by transformers."""
    torch.manual_seed(0)
    config = FastVlmConfig(
        vision_config=dict(model_type="timm_wrapper", architecture="fastvit_mci3", hidden_size=128, do_pooling=False,
                           model_args={"inference_mode": True, "layers": [1, 1, 1, 1, 1],
                                       "embed_dims": [16, 16, 32, 32, 64]}),
        text_config=dict(TINY_TEXT, tie_word_embeddings=False),
        image_token_id=IMAGE_TOKEN,
    )
    model = FastVlmForConditionalGeneration(config).eval()
    directory = tmp_path_factory.mktemp("fastvlm-hf")
    model.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 128, "width": 128}}))
    return directory, model


def test_transformers_checkpoint_gives_the_same_first_token_logits(hf_checkpoint):
    directory, hf_model = hf_checkpoint
    vlm = ablate.from_checkpoint(directory)
    assert vlm.config.encoder.image_size == 128 and vlm.image_token_id == IMAGE_TOKEN
    pixels = torch.rand(2, 3, 128, 128)
    visual = vlm.num_visual_tokens()
    ours_ids = torch.tensor([[5, IMAGE_TOKEN, 7, 8, 9]] * 2)
    hf_ids = torch.tensor([[5] + [IMAGE_TOKEN] * visual + [7, 8, 9]] * 2)  # transformers expands the placeholder
    with torch.no_grad():
        ours = vlm.prefill(pixels, ours_ids)
        theirs = hf_model(input_ids=hf_ids, pixel_values=pixels).logits[:, -1]
    assert (ours - theirs).abs().max().item() < 1e-4


def test_weights_key_in_a_config_loads_the_same_tensors(hf_checkpoint):
    directory, hf_model = hf_checkpoint
    from ablate.checkpoints import ablate_config

    config = ablate_config(directory)
    vlm = ablate.build(config)
    assert torch.equal(vlm.connector.layers[0].weight, hf_model.model.multi_modal_projector.linear_1.weight)
    random_vlm = ablate.build({**config, "weights": None})
    assert not torch.equal(random_vlm.connector.layers[0].weight, vlm.connector.layers[0].weight)


def edited_copy(source, target, edit):
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_a_renamed_tensor_is_named(hf_checkpoint, tmp_path):
    source, _ = hf_checkpoint
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    broken = edited_copy(source, tmp_path / "renamed", lambda t: t.__setitem__(key + "_x", t.pop(key)))
    with pytest.raises(CheckpointError) as info:
        ablate.from_checkpoint(broken, ["encoder.image_size=128"])
    message = str(info.value)
    assert "1 missing: decoder.lm.model.layers.1.mlp.up_proj.weight" in message
    assert "1 unexpected: decoder.lm.model.layers.1.mlp.up_proj.weight_x" in message


def test_a_reshaped_tensor_is_named_with_both_shapes(hf_checkpoint, tmp_path):
    source, _ = hf_checkpoint
    key = "model.multi_modal_projector.linear_1.bias"
    broken = edited_copy(source, tmp_path / "reshaped", lambda t: t.__setitem__(key, torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"mis-shaped: connector.layers.0.bias \(3,\) vs \(64,\) expected"):
        ablate.from_checkpoint(broken, ["encoder.image_size=128"])


def test_ml_fastvlm_llava_layout(tmp_path):
    """The original release layout: fused official vision names (head.proj included), mm_projector, Qwen2 keys."""
    torch.manual_seed(3)
    source = ablate.build("tiny", ["decoder.arch=qwen2-tiny", "decoder.overrides.tie_word_embeddings=false"])
    tensors = {f"model.vision_tower.vision_tower.model.{k}": v
               for k, v in official_names(source.encoder.model.state_dict()).items()}
    tensors.update({f"model.mm_projector.{k}": v for k, v in source.connector.layers.state_dict().items()})
    tensors.update({f"model.{k}": v for k, v in source.decoder.lm.model.state_dict().items()})
    tensors["lm_head.weight"] = source.decoder.lm.lm_head.weight
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    config = dict(TINY_TEXT, model_type="llava_qwen2", mm_vision_tower="mobileclip_l_128", mm_hidden_size=128,
                  mm_projector_type="mlp2x_gelu", tie_word_embeddings=False, rms_norm_eps=1e-6,
                  rope_theta=1_000_000.0, mm_vision_select_layer=-2, image_aspect_ratio="pad")
    (tmp_path / "config.json").write_text(json.dumps(config))

    vlm = ablate.from_checkpoint(tmp_path, ["encoder=fastvit-tiny"])  # the tiny tower LLaVA configs cannot name
    assert vlm.config.encoder.image_size == 128
    pixels, ids = torch.rand(1, 3, 128, 128), vlm.make_prompt(6)
    with torch.no_grad():
        assert torch.allclose(vlm.prefill(pixels, ids), source.prefill(pixels, ids), atol=1e-5)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json.*encoder.weights"):
        ablate.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="Unknown checkpoint format.*bert"):
        ablate.from_checkpoint(tmp_path)


def test_cli_runs_a_checkpoint_directory(hf_checkpoint):
    from conftest import run_json

    directory, _ = hf_checkpoint
    record = run_json(str(directory), "--repeats", "1", "--warmup", "0")
    assert record["error"] is None and record["visual_tokens"] == 4
    assert record["config"]["weights"] == str(directory)
