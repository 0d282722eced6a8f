"""Real weights, offline: transformers and ml-fastvlm checkpoint directories written here, loaded strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_fastvit_family import official_key_list, official_names
from transformers import CLIPImageProcessor, FastVlmConfig, FastVlmForConditionalGeneration

import ablate
from ablate.api.errors import CheckpointError
from ablate.api.weights import read_tensors
from ablate.config.checkpoint_folders import checkpoint_config


def ablate_config(directory):
    return checkpoint_config(Path(directory))


IMAGE_TOKEN = 1000
TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1024,
    rope_theta=50_000.0,
)
# A FastViTHD-shaped tower shrunk through timm's create_model arguments, as TimmWrapperConfig passes them.
TINY_VISION = dict(
    model_type="timm_wrapper",
    architecture="fastvit_mci3",
    hidden_size=128,
    do_pooling=False,
    model_args={"inference_mode": True, "layers": [1, 1, 1, 1, 1], "embed_dims": [16, 16, 32, 32, 64]},
)


def save_hf_fastvlm(directory, image_size=128, **config):
    """A tiny FastVlmForConditionalGeneration and its image processor, saved by transformers (sharded)."""
    torch.manual_seed(0)
    config = FastVlmConfig(vision_config=TINY_VISION, image_token_id=IMAGE_TOKEN, **config)
    model = FastVlmForConditionalGeneration(config).eval()
    model.save_pretrained(directory, max_shard_size="300KB")
    size = {"height": image_size, "width": image_size}
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size=size, image_mean=[0.0] * 3, image_std=[1.0] * 3
    ).save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fastvlm-hf")
    return directory, save_hf_fastvlm(directory, text_config=dict(TINY_TEXT, tie_word_embeddings=False))


def first_token_logits_match(vlm, hf_model, batch=2):
    """ablate's prefill vs transformers' last-position logits on the same pixels and prompt."""
    size = vlm.config.encoder.image_size
    pixels = torch.rand(batch, 3, size, size)
    ours_ids = torch.tensor([[5, IMAGE_TOKEN, 7, 8, 9]] * batch)
    hf_ids = torch.tensor([[5] + [IMAGE_TOKEN] * vlm.num_visual_tokens() + [7, 8, 9]] * batch)  # HF expands it
    with torch.no_grad():
        ours = vlm.prefill(pixels, ours_ids)
        theirs = hf_model(input_ids=hf_ids, pixel_values=pixels).logits[:, -1]
    return (ours - theirs).abs().max().item() < 1e-4


def test_transformers_checkpoint_gives_the_same_first_token_logits(hf_checkpoint):
    directory, hf_model = hf_checkpoint
    assert len(list(directory.glob("*.safetensors"))) > 1  # sharded
    vlm = ablate.from_checkpoint(directory)
    assert vlm.config.encoder.name == "fastvithd" and vlm.config.encoder.layers == [1, 1, 1, 1, 1]
    assert vlm.config.encoder.image_size == 128 and vlm.image_token_id == IMAGE_TOKEN
    assert vlm.decoder.lm.config.rope_parameters["rope_theta"] == 50_000.0
    assert first_token_logits_match(vlm, hf_model)


def test_tied_lm_head(hf_checkpoint, tmp_path):
    # FastVlmConfig ties when its top level says so, even if the text config does not; the head is then not saved.
    hf_model = save_hf_fastvlm(
        tmp_path, text_config=dict(TINY_TEXT, tie_word_embeddings=False), tie_word_embeddings=True
    )
    assert "lm_head.weight" not in read_tensors(tmp_path)
    vlm = ablate.from_checkpoint(tmp_path)
    assert vlm.decoder.lm.lm_head.weight is vlm.decoder.lm.model.embed_tokens.weight
    assert first_token_logits_match(vlm, hf_model, batch=1)
    with pytest.raises(CheckpointError, match=r"1 missing: decoder.lm.lm_head.weight.*tie_word_embeddings=true"):
        ablate.from_checkpoint(tmp_path, ["decoder.overrides.tie_word_embeddings=false"])
    untied, _ = hf_checkpoint
    with pytest.raises(CheckpointError, match=r"different values for .*lm_head.weight.*tie_word_embeddings=false"):
        ablate.from_checkpoint(untied, ["decoder.overrides.tie_word_embeddings=true"])


def test_weights_key_in_a_config_file_or_override(hf_checkpoint, tmp_path):
    directory, hf_model = hf_checkpoint
    config = {key: value for key, value in ablate_config(directory).items() if key != "weights"}
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    random_vlm = ablate.build(path)
    vlm = ablate.build(path, [f"weights={directory}"])
    expected = hf_model.model.multi_modal_projector.linear_1.weight
    assert torch.equal(vlm.connector.layers[0].weight, expected)
    assert not torch.equal(random_vlm.connector.layers[0].weight, expected)
    path.write_text(json.dumps({**config, "weights": str(directory)}))
    assert torch.equal(ablate.build(path).connector.layers[0].weight, expected)


def edited_copy(source, target, edit):
    target.mkdir()
    for config in source.glob("*.json"):  # config.json and the image processor's
        (target / config.name).write_text(config.read_text())
    tensors = read_tensors(source)
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_a_renamed_tensor_is_named(hf_checkpoint, tmp_path):
    source, _ = hf_checkpoint
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    broken = edited_copy(source, tmp_path / "renamed", lambda t: t.__setitem__(key + "_x", t.pop(key)))
    with pytest.raises(CheckpointError) as info:
        ablate.from_checkpoint(broken)
    message = str(info.value)
    assert "1 missing: decoder.lm.model.layers.1.mlp.up_proj.weight" in message
    assert "1 unexpected: decoder.lm.model.layers.1.mlp.up_proj.weight_x" in message


def test_a_reshaped_tensor_is_named_with_both_shapes(hf_checkpoint, tmp_path):
    source, _ = hf_checkpoint
    key = "model.multi_modal_projector.linear_1.bias"
    broken = edited_copy(source, tmp_path / "reshaped", lambda t: t.__setitem__(key, torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"mis-shaped: connector.layers.0.bias \(3,\) vs \(64,\) expected"):
        ablate.from_checkpoint(broken)


def test_ml_fastvlm_llava_layout(tmp_path):
    """The original release layout: fused official vision names (head.proj included), mm_projector, Qwen2 keys."""
    torch.manual_seed(3)
    size = 256
    source = ablate.build("tiny", [f"encoder.image_size={size}", "decoder.overrides.tie_word_embeddings=false"])
    vision = official_names(source.encoder.model.state_dict(), head_width=source.encoder.width)
    tensors = {f"model.vision_tower.vision_tower.model.{k}": v for k, v in vision.items()}
    tensors.update({f"model.mm_projector.{k}": v for k, v in source.connector.layers.state_dict().items()})
    tensors.update({f"model.{k}": v for k, v in source.decoder.lm.model.state_dict().items()})
    tensors["lm_head.weight"] = source.decoder.lm.lm_head.weight
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    config = dict(
        TINY_TEXT,
        model_type="llava_qwen2",
        mm_vision_tower=f"mobileclip_l_{size}",
        mm_hidden_size=128,
        mm_projector_type="mlp2x_gelu",
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        mm_vision_select_layer=-2,
        image_aspect_ratio="pad",
        tokenizer_model_max_length=8192,
        unfreeze_mm_vision_tower=True,
    )
    (tmp_path / "config.json").write_text(json.dumps(config))

    described = ablate_config(tmp_path)
    assert described["encoder"] == {"name": "fastvithd", "image_size": size}
    assert "mm_vision_tower" not in described["decoder"]["overrides"]
    # A LLaVA config cannot name a tiny tower: swap it in, keeping the checkpoint's size.
    vlm = ablate.from_checkpoint(tmp_path, ["encoder=fastvit-tiny", f"encoder.image_size={size}"])
    pixels, ids = torch.rand(1, 3, size, size), vlm.make_prompt(6)
    with torch.no_grad():
        assert torch.allclose(vlm.prefill(pixels, ids), source.prefill(pixels, ids), atol=1e-5)


def meta_tensors(module, rename):
    return {rename(key): value for key, value in module.state_dict().items()}


def test_full_size_fastvlm_configs_and_key_maps(tmp_path):
    """Released sizes, on the meta device: FastViTHD at 1024 px, Qwen2-0.5B, every key mapped and shaped right.

    The vision keys are Apple's own (tests/data/fastvithd_official_keys.txt, listed from ml-fastvlm's mci.py)."""
    from ablate.api.weights import load_state_dict_strict
    from ablate_plugins.checkpoints.fastvlm import MlFastVLMLlava, TransformersFastVLM

    qwen2_05b = dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=32768,
    )
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(
        json.dumps(
            dict(
                qwen2_05b,
                model_type="llava_qwen2",
                architectures=["LlavaQwen2ForCausalLM"],
                vocab_size=151936,
                mm_vision_tower="mobileclip_l_1024",
                mm_hidden_size=3072,
                mm_projector_type="mlp2x_gelu",
                tie_word_embeddings=False,
            )
        )
    )
    config = ablate_config(llava)
    assert config["encoder"] == {"name": "fastvithd", "image_size": 1024}
    assert config["decoder"]["arch"] == "auto" and config["image_token_id"] is None  # the LLM from its own config
    assert ablate.load_config(config).decoder.arch == "qwen2-0.5b"  # named after the preset of that size
    vlm = ablate.build(config, meta=True)
    assert vlm.num_visual_tokens() == 256 and vlm.params()["connector"] == 3_557_120
    checkpoint = {
        f"model.vision_tower.vision_tower.model.{key}": torch.empty(shape, device="meta")
        for key, shape in official_key_list()
    }
    assert len(checkpoint) == 629  # ml-fastvlm's released tower keys, head.proj included
    checkpoint.update(meta_tensors(vlm.connector.layers, lambda k: f"model.mm_projector.{k}"))
    checkpoint.update(meta_tensors(vlm.decoder.lm, lambda k: k))
    load_state_dict_strict(vlm, MlFastVLMLlava().to_vlm_keys(checkpoint, vlm)[0], "full-size LLaVA layout")

    hf_dir = tmp_path / "hf"
    FastVlmConfig(text_config=dict(qwen2_05b, vocab_size=152000), image_token_id=151646).save_pretrained(hf_dir)
    with torch.device("meta"):
        hf_model = FastVlmForConditionalGeneration(FastVlmConfig.from_pretrained(hf_dir))
    vlm = ablate.build(ablate_config(hf_dir), meta=True)
    assert vlm.config.encoder.name == "fastvithd" and vlm.config.encoder.inference_mode
    assert vlm.image_token_id == 151646 and vlm.decoder.vocab_size == 152000
    load_state_dict_strict(
        vlm, TransformersFastVLM().to_vlm_keys(hf_model.state_dict(), vlm)[0], "full-size transformers layout"
    )


def write_hf_config(directory, **model_args):
    vision = dict(TINY_VISION, model_args=model_args)
    (directory / "config.json").write_text(FastVlmConfig(text_config=TINY_TEXT, vision_config=vision).to_json_string())


def test_transformers_config_details(tmp_path):
    write_hf_config(tmp_path, inference_mode=True, drop_path_rate=0.1)  # a training-only argument is dropped
    processor = {
        "image_processor": {
            "crop_size": {"height": 192, "width": 192},
            "image_mean": [0.5] * 3,
            "image_std": [0.25] * 3,
        },
        "processor_class": "LlavaProcessor",
    }
    (tmp_path / "processor_config.json").write_text(json.dumps(processor))  # transformers v5 nests it here
    encoder = ablate_config(tmp_path)["encoder"]
    assert (encoder["image_size"], encoder["mean"], encoder["std"]) == (192, [0.5] * 3, [0.25] * 3)
    assert encoder["inference_mode"] and "drop_path_rate" not in encoder
    write_hf_config(tmp_path)
    assert ablate_config(tmp_path)["encoder"]["inference_mode"] is False  # timm's default: the train form
    write_hf_config(tmp_path, features_only=True)
    with pytest.raises(CheckpointError, match=r"model_args \['features_only'\] have no counterpart in encoder"):
        ablate_config(tmp_path)


def test_not_a_vlm_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json.*encoder.weights=PATH"):
        ablate.from_checkpoint(tmp_path)
    weights_file = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights_file))
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        ablate.build("tiny", [f"weights={weights_file}"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="Unknown checkpoint format.*'bert'.*encoder.weights=PATH"):
        ablate.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "fastvit_mci3", "num_classes": 768}))
    with pytest.raises(CheckpointError, match="timm 'fastvit_mci3' model.*encoder.weights="):
        ablate.from_checkpoint(tmp_path)


def test_cli_runs_a_checkpoint_directory(hf_checkpoint):
    from conftest import run_json

    directory, _ = hf_checkpoint
    record = run_json(str(directory), "--repeats", "1", "--warmup", "0")
    assert record["error"] is None and record["visual_tokens"] == 4
    assert record["config"]["weights"] == str(directory)


TOY_FORMAT = """
from ablate.api import CheckpointFormat, hookimpl

RENAMES = {"vision.": "encoder.", "proj.": "connector.", "llm.": "decoder."}


class ToyVLM(CheckpointFormat):
    \"\"\"Toy VLM checkpoints (model_type toy_vlm): vision.*, proj.*, llm.* keys.\"\"\"

    name = "toy-vlm"

    def detect(self, directory, hf_config):
        return hf_config.get("model_type") == "toy_vlm"

    def config(self, directory, hf_config):
        return {
            "encoder": {"name": "fastvit-tiny", "image_size": hf_config["image_size"]},
            "reducer": "none",
            "connector": "mlp2x_gelu",
            "decoder": {"name": "hf-causal-lm", "arch": "qwen2-tiny"},
        }

    def to_vlm_keys(self, tensors, vlm):
        mapped = {}
        for key, value in tensors.items():
            prefix = next((p for p in RENAMES if key.startswith(p)), "")
            mapped[RENAMES.get(prefix, "") + key[len(prefix):]] = value
        return mapped, ""


@hookimpl
def register_checkpoint_formats(register):
    register(ToyVLM)
"""

PREFILL = """
import json, sys, torch, ablate
vlm = ablate.from_checkpoint(sys.argv[1])
pixels = torch.load(sys.argv[2])
with torch.no_grad():
    logits = vlm.prefill(pixels, vlm.make_prompt(4))
print(json.dumps({"logits": logits[0, :8].tolist(), "weights": vlm.loaded_weights}))
"""


def test_a_third_party_package_adds_a_checkpoint_format(tmp_path):
    """A format plugin installed on the path (no change to ablate) makes its directories loadable, strictly."""
    from conftest import install_plugin, run_cli_process

    env = install_plugin(tmp_path, "toy_format", TOY_FORMAT, "toy-format")
    torch.manual_seed(5)
    source = ablate.build("tiny")
    renames = {"encoder.": "vision.", "connector.": "proj.", "decoder.": "llm."}
    tensors = {}
    for key, value in source.state_dict().items():
        prefix = next(p for p in renames if key.startswith(p))
        tensors[renames[prefix] + key[len(prefix) :]] = value.clone()  # tied tensors saved once each
    checkpoint = tmp_path / "toy-checkpoint"
    checkpoint.mkdir()
    save_file(tensors, str(checkpoint / "model.safetensors"))
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "toy_vlm", "image_size": 128}))
    pixels = torch.rand(1, 3, 128, 128)
    torch.save(pixels, tmp_path / "pixels.pt")

    listing = run_cli_process("list", "formats", env=env)
    assert "toy-vlm" in listing.stdout and "fast-vlm-hf" in listing.stdout
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", PREFILL, str(checkpoint), str(tmp_path / "pixels.pt")],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout)
    assert loaded["weights"] == [f"vlm: {checkpoint} (toy-vlm)"]
    with torch.no_grad():
        expected = source.prefill(pixels, source.make_prompt(4))[0, :8]
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-5)
    tensors["llm.lm.model.norm.weight_renamed"] = tensors.pop("llm.lm.model.norm.weight")
    save_file(tensors, str(checkpoint / "model.safetensors"))
    broken = run_cli_process("run", str(checkpoint), "--repeats", "1", "--warmup", "0", env=env)
    assert broken.returncode == 2
    assert "1 missing: decoder.lm.model.norm.weight" in broken.stderr and "toy-vlm checkpoint" in broken.stderr
