"""Config composition: precedence, swaps, strict keys, errors that name the key and the fix."""

from __future__ import annotations

import pytest

from ablate.api.errors import ConfigError, UnknownComponentError
from ablate.config.compose import load_config


def write(path, text):
    path.write_text(text)
    return path


def test_preset_loads_with_component_defaults():
    config = load_config("fastvlm-0.5b")
    assert config.encoder.name == "fastvithd"
    assert config.encoder.image_size == 1024
    assert config.decoder.arch == "qwen2-0.5b"
    assert config.prompt_tokens == 64
    assert config.reducer.position == "before_connector"  # a default the preset does not spell out


def test_precedence_preset_then_user_file_then_overrides(tmp_path):
    user = write(
        tmp_path / "mine.yaml", "base: fastvlm-0.5b\nname: mine\nencoder:\n  image_size: 512\nprompt_tokens: 8\n"
    )
    config = load_config(user, ["prompt_tokens=4"])
    assert config.name == "mine"
    assert config.encoder.image_size == 512  # user file beats preset
    assert config.prompt_tokens == 4  # command line beats user file
    assert config.decoder.arch == "qwen2-0.5b"  # untouched preset value survives
    assert [s.rsplit("/", 1)[-1] for s in config.sources] == ["fastvlm-0.5b.yaml", "mine.yaml"]


def test_base_chain_of_presets():
    config = load_config("fastvlm-7b")
    assert config.decoder.arch == "qwen2-7b"
    assert config.encoder.name == "fastvithd"


def test_swap_resets_options_to_the_new_components_defaults():
    config = load_config("fastvlm-0.5b", ["encoder=timm", "encoder.model_name=vit_large_patch14_clip_336"])
    assert config.encoder.name == "timm"
    assert config.encoder.model_name == "vit_large_patch14_clip_336"
    # image_size 1024 came from the fastvithd node and must not leak into the timm encoder's options: the timm
    # encoder's default (its model's native size) is resolved instead
    assert config.encoder.image_size == 336


def test_swap_in_a_file_resets_options_too(tmp_path):
    user = write(tmp_path / "clip.yaml", "base: fastvlm-0.5b\nencoder:\n  name: timm\n  model_name: convnext_atto\n")
    config = load_config(user)
    assert config.encoder.model_name == "convnext_atto"
    assert config.encoder.image_size == 224  # convnext_atto's native size, not the fastvithd node's 1024


def test_overrides_parse_yaml_values():
    config = load_config("tiny", ["decoder.overrides.num_hidden_layers=3", "image_token_id=5"])
    assert config.decoder.overrides == {"num_hidden_layers": 3}
    assert config.image_token_id == 5


def test_unknown_component_key_names_full_path_and_suggestion():
    with pytest.raises(ConfigError) as info:
        load_config("fastvlm-0.5b", ["encoder.imag_size=512"])
    message = str(info.value)
    assert "encoder.imag_size" in message and "image_size" in message


def test_unknown_top_level_key_in_file(tmp_path):
    user = write(tmp_path / "bad.yaml", "base: tiny\nprompt_tokenz: 3\n")
    with pytest.raises(ConfigError, match="prompt_tokenz.*prompt_tokens"):
        load_config(user)


def test_unknown_component_name_lists_options_and_key():
    with pytest.raises(UnknownComponentError) as info:
        load_config("tiny", ["connector=mlp2x_gleu"])
    message = str(info.value)
    assert "connector.name" in message and "mlp2x_gelu" in message and "linear" in message


def test_wrong_value_type_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder.image_size"):
        load_config("tiny", ["encoder.image_size=big"])


def test_malformed_override_and_missing_preset():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["encoder.image_size"])
    with pytest.raises(ConfigError, match="neither a file nor a preset.*tiny"):
        load_config("tinyy")


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="itself"):
        load_config(tmp_path / "a.yaml")


def test_missing_component_is_explained():
    with pytest.raises(ConfigError, match="names no decoder"):
        load_config({"encoder": "timm", "reducer": "none", "connector": "linear"})


def test_round_trip_through_dict():
    config = load_config("tiny", ["encoder.image_size=192"])
    again = load_config(config.to_dict())
    assert again.to_dict() == config.to_dict()
