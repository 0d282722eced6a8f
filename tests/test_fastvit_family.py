"""The FastViT family: exact timm equivalence, token counts, train/inference forms, fusion, weight files."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from ablate.errors import CheckpointError, ConfigError, ImageSizeError
from ablate_plugins.encoders.fastvit import FastViT, FastViTConfig, FastViTHD, FastViTMCi2, FastViTMCi4, FastViTTiny

RESOLUTIONS = [256, 512, 768, 1024, 1536]


def count(module):
    return sum(p.numel() for p in module.parameters())


def on_meta(cls, **options):
    with torch.device("meta"):
        return cls(cls.Config(**options))


def timm_twin(encoder, timm_name):
    """The same timm model, holding the encoder's weights."""
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0, inference_mode=True).eval()
    missing, unexpected = reference.load_state_dict(encoder.model.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("head") for key in missing)
    return reference


def test_fastvithd_has_the_papers_parameter_count_without_the_clip_head():
    assert count(on_meta(FastViTHD)) == 122_714_208
    assert on_meta(FastViTHD).width == 3072


@pytest.mark.parametrize("cls,timm_name,width", [(FastViTMCi2, "fastvit_mci2", 1280), (FastViTMCi4, "fastvit_mci4", 4096)])
def test_siblings_match_timm(cls, timm_name, width):
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0, inference_mode=True)
    assert count(on_meta(cls)) == count(reference)
    assert on_meta(cls).width == width


@pytest.mark.parametrize("size", [256, 512])
def test_fastvithd_output_equals_timm_fastvit_mci3(size):
    torch.manual_seed(0)
    encoder = FastViTHD(FastViTHD.Config(image_size=size)).eval()
    reference = timm_twin(encoder, "fastvit_mci3")
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        ours = encoder(x)
        expected = reference.forward_features(x).flatten(2).transpose(1, 2)
    assert ours.grid == (size // 64, size // 64)
    assert (ours.tokens - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", RESOLUTIONS)
def test_token_counts(size):
    for cls, stride in ((FastViTHD, 64), (FastViTMCi2, 32)):
        encoder = on_meta(cls, image_size=size)
        assert encoder.num_tokens() == (size // stride) ** 2
        out = encoder(torch.empty(1, 3, size, size, device="meta"))  # the real shapes, no memory
        assert out.tokens.shape == (1, (size // stride) ** 2, encoder.width)


def test_sizes_that_do_not_tile_are_refused_with_a_suggestion():
    with pytest.raises(ImageSizeError, match=r"1000.*encoder.image_size=960"):
        on_meta(FastViTHD).num_tokens(1000)


def test_inconsistent_config_names_the_key():
    with pytest.raises(ConfigError, match="encoder.embed_dims"):
        FastViT(FastViTConfig(layers=[1, 1]))
    with pytest.raises(ConfigError, match="multiple of 32"):
        FastViT(FastViTConfig(embed_dims=[16, 16, 32, 32, 48]))


def randomize_batchnorm(model):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)


def test_train_form_reparameterizes_to_the_same_outputs():
    torch.manual_seed(0)
    encoder = FastViTTiny(FastViTTiny.Config(inference_mode=False))
    assert encoder.form == "train"
    params_train = count(encoder)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.05)
    for _ in range(3):  # a few real training steps move every branch away from its initialization
        loss = encoder(torch.rand(2, 3, 128, 128)).tokens.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        randomize_batchnorm(encoder)
    encoder.eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        before = encoder(x).tokens
        encoder.reparameterize()
        after = encoder(x).tokens
    assert encoder.form == "inference" and count(encoder) < params_train
    assert (before - after).abs().max().item() <= 1e-4
    # and the fused model has exactly the natively built inference form's structure
    native = FastViTTiny(FastViTTiny.Config())
    assert {k: v.shape for k, v in encoder.state_dict().items()} == {k: v.shape for k, v in native.state_dict().items()}


@pytest.mark.parametrize("fusion", ["dwconv", "avgpool"])
def test_multi_scale_fusion(fusion):
    base = FastViTTiny(FastViTTiny.Config())
    fused = FastViTTiny(FastViTTiny.Config(fusion_stages=[2, 3], fusion=fusion))
    dims = fused.config.embed_dims  # [16, 16, 32, 32, 64]; stage strides 4, 8, 16, 32, 64
    factors = {2: 64 // 16, 3: 64 // 32}
    expected_extra = sum(dims[s] * f * f + dims[s] for s, f in factors.items()) if fusion == "dwconv" else 0
    assert count(fused) == count(base) + expected_extra
    assert fused.width == base.width + dims[2] + dims[3]
    out = fused(torch.rand(1, 3, 256, 256))
    assert out.tokens.shape == (1, fused.num_tokens(256), fused.width) == (1, 16, 128 + 64)


def test_fusion_of_the_last_stage_is_refused():
    with pytest.raises(ConfigError, match="fusion_stages"):
        FastViTTiny(FastViTTiny.Config(fusion_stages=[4]))


def test_final_conv_off_gives_last_stage_tokens():
    encoder = FastViTTiny(FastViTTiny.Config(final_conv=False))
    assert encoder.width == 64 and encoder(torch.rand(1, 3, 128, 128)).tokens.shape == (1, 4, 64)


# ------------------------------------------------------------------------------------- weight files


def official_names(timm_state):
    """timm FastViT keys -> the official ml-fastvlm/MobileCLIP fused names (inverse of the loader's map)."""
    places = {"stages.0.blocks": "network.0", "stages.1.downsample": "network.1", "stages.1.blocks": "network.2",
              "stages.2.downsample": "network.3", "stages.2.blocks": "network.4", "stages.3.downsample": "network.5",
              "stages.3.pos_emb": "network.6", "stages.3.blocks": "network.7", "stages.4.downsample": "network.8",
              "stages.4.pos_emb": "network.9", "stages.4.blocks": "network.10"}
    out = {}
    for key, value in timm_state.items():
        for new, old in places.items():
            if key.startswith(new + "."):
                key = old + key[len(new):]
        key = (key.replace("stem", "patch_embed").replace("final_conv", "conv_exp").replace("mlp", "convffn")
               .replace("se.fc1", "se.reduce").replace("se.fc2", "se.expand").replace(".gamma", ""))
        key = key.replace("proj.0.reparam_conv", "proj.0.lkb_reparam")
        out[key] = value
    out["head.proj"] = torch.zeros(128, 768)  # the CLIP projection the VLM ignores
    return out


@pytest.fixture
def trained_tiny():
    torch.manual_seed(1)
    return FastViTTiny(FastViTTiny.Config()).eval()


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_encoder_weights_load_from_either_layout(tmp_path, trained_tiny, layout):
    state = trained_tiny.model.state_dict()
    path = tmp_path / "encoder.safetensors"
    save_file(official_names(state) if layout == "official" else state, str(path))
    loaded = FastViTTiny(FastViTTiny.Config(weights=str(path))).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x).tokens, trained_tiny(x).tokens)


def test_pickled_weights_load_with_weights_only(tmp_path, trained_tiny):
    path = tmp_path / "encoder.pt"
    torch.save(trained_tiny.model.state_dict(), path)
    loaded = FastViTTiny(FastViTTiny.Config(weights=str(path)))
    assert torch.equal(loaded.model.final_conv.reparam_conv.weight, trained_tiny.model.final_conv.reparam_conv.weight)


def test_renamed_and_reshaped_tensors_are_named(tmp_path, trained_tiny):
    state = dict(trained_tiny.model.state_dict())
    state["stages.2.blocks.0.mlp.fc1.weightt"] = state.pop("stages.2.blocks.0.mlp.fc1.weight")
    save_file(state, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: model.stages.2.blocks.0.mlp.fc1.weight;.*weightt"):
        FastViTTiny(FastViTTiny.Config(weights=str(tmp_path / "renamed.safetensors")))

    state = dict(trained_tiny.model.state_dict())
    state["final_conv.se.fc1.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "reshaped.safetensors"))
    with pytest.raises(CheckpointError, match=r"mis-shaped: model.final_conv.se.fc1.bias \(3,\) vs"):
        FastViTTiny(FastViTTiny.Config(weights=str(tmp_path / "reshaped.safetensors")))


def test_missing_weights_file_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        FastViTTiny(FastViTTiny.Config(weights=str(tmp_path / "nope.safetensors")))
