"""The FastViT family: exact timm equivalence, token counts, train/inference forms, fusion, weight files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ablate.api.components import StageContext
from ablate.api.errors import CheckpointError, ConfigError, ImageSizeError
from ablate.api.weights import read_tensors
from ablate_plugins.encoders.fastvit import (
    FastViT,
    FastViTConfig,
    FastViTHD,
    FastViTMCi2,
    FastViTMCi4,
    FastViTTiny,
    convert_mci_state_dict,
)

RESOLUTIONS = [256, 512, 768, 1024, 1536]


def encode(encoder, pixels):
    return encoder(StageContext(pixel_values=pixels))


def with_weights(cls, path, **options):
    """Built, then given its weights, as `ablate.build` does with `encoder.weights`."""
    encoder = cls(cls.Config(**options))
    encoder.load_weights(path)
    return encoder


def count(module):
    return sum(p.numel() for p in module.parameters())


def on_meta(cls, **options):
    with torch.device("meta"):
        return cls(cls.Config(**options))


def timm_meta(timm_name):
    with torch.device("meta"):
        return timm.create_model(timm_name, pretrained=False, num_classes=0, inference_mode=True)


# ------------------------------------------------------------------------------- architecture vs timm


def test_fastvithd_has_the_papers_parameter_count_without_the_clip_head():
    encoder = on_meta(FastViTHD)
    assert count(encoder) == 122_714_208
    assert encoder.width == 3072 and encoder.stride == 64 and encoder.form == "inference"


@pytest.mark.parametrize(
    "cls,timm_name,width",
    [(FastViTHD, "fastvit_mci3", 3072), (FastViTMCi2, "fastvit_mci2", 1280), (FastViTMCi4, "fastvit_mci4", 4096)],
)
def test_presets_are_timms_models(cls, timm_name, width):
    encoder, reference = on_meta(cls), timm_meta(timm_name)
    assert count(encoder) == count(reference)
    assert {k: v.shape for k, v in encoder.model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert encoder.width == width == reference.num_features


@pytest.fixture(scope="module")
def fastvithd_and_timm():
    """FastViTHD with random weights, and timm's fastvit_mci3 holding the very same tensors."""
    torch.manual_seed(0)
    encoder = FastViTHD(FastViTHD.Config()).eval()
    reference = timm_meta("fastvit_mci3").eval()
    reference.load_state_dict(encoder.model.state_dict(), strict=True, assign=True)
    return encoder, reference


@pytest.mark.parametrize("size", [256, pytest.param(512, marks=pytest.mark.slow)])
def test_fastvithd_output_equals_timm_fastvit_mci3(fastvithd_and_timm, size):
    encoder, reference = fastvithd_and_timm
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        ours = encode(encoder, x)
        expected = reference.forward_features(x).flatten(2).transpose(1, 2)
    assert ours.layout.grid == (size // 64, size // 64)
    assert ours.tokens.shape == expected.shape == (1, (size // 64) ** 2, 3072)
    assert (ours.tokens - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cls,stride", [(FastViTHD, 64), (FastViTMCi2, 32)])
def test_token_counts(cls, stride):
    encoder = on_meta(cls)
    for size in RESOLUTIONS:
        assert encoder.num_tokens(size) == (size // stride) ** 2
        out = encode(encoder, torch.empty(1, 3, size, size, device="meta"))  # real shapes, no memory
        assert out.tokens.shape == (1, (size // stride) ** 2, encoder.width)
        assert out.layout.grid == (size // stride, size // stride)
    assert on_meta(cls, image_size=1024).num_tokens() == (1024 // stride) ** 2


def test_fastvithd_token_counts_match_the_paper():
    encoder = on_meta(FastViTHD)
    assert [encoder.num_tokens(s) for s in (768, 1024, 1536)] == [144, 256, 576]


def test_sizes_that_do_not_tile_are_refused_with_a_suggestion():
    with pytest.raises(ImageSizeError, match=r"1000.*multiple of 64.*encoder.image_size=960"):
        on_meta(FastViTHD).num_tokens(1000)
    with pytest.raises(ImageSizeError, match=r"100.*multiple of 32.*encoder.image_size=96"):
        on_meta(FastViTMCi2).num_tokens(100)


def test_preprocessing_is_fastvlms():
    pre = FastViTTiny(FastViTTiny.Config()).preprocessing
    assert (pre.image_size, pre.mean, pre.std, pre.resize, pre.interpolation) == (
        128,
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        "pad",
        "bicubic",
    )
    assert on_meta(FastViTHD, mean=[0.5] * 3).preprocessing.mean == (0.5, 0.5, 0.5)
    assert on_meta(FastViTHD).preprocessing.image_size == 1024
    assert on_meta(FastViTMCi2).preprocessing.image_size == 768


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(layers=[1, 1]), r"encoder.embed_dims has 5 entries but encoder.layers has 2"),
        (dict(embed_dims=[16, 16, 32, 32, 48]), r"encoder.embed_dims\[4\]=48 .*multiple of 32"),
        (dict(token_mixers=["repmixer"] * 4 + ["mhsa"]), r"encoder.token_mixers\[4\]='mhsa'.*'attention'"),
        (dict(pos_embs=[None] * 4 + ["rcpe5"]), r"encoder.pos_embs\[4\]='rcpe5'"),
        (
            dict(downsamples=[False, False, True, True, True], embed_dims=[16, 32, 32, 32, 64]),
            r"encoder.downsamples\[1\] is false but stage 1 changes width",
        ),
        (dict(fusion_stages=[4]), r"encoder.fusion_stages holds 4.*0..3"),
        (dict(fusion_stages=[1, 1]), r"encoder.fusion_stages.*twice"),
        (dict(fusion="maxpool"), r"'encoder.fusion': 'maxpool'. Choose one of: dwconv, avgpool"),
        (dict(mean=[0.5]), r"encoder.mean needs 3 values"),
    ],
)
def test_inconsistent_config_names_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        FastViT(FastViTConfig(**options))


def test_a_stride_32_family_member():
    """Downsampling is a config key: drop the last downsample and the same layout has stride 32."""
    encoder = FastViT(FastViTConfig(downsamples=[False, True, True, True, False], embed_dims=[16, 16, 32, 64, 64]))
    assert encoder.stride == 32 and encoder.num_tokens(128) == 16
    assert encode(encoder, torch.rand(1, 3, 128, 128)).tokens.shape == (1, 16, 128)


def test_final_conv_off_gives_last_stage_tokens():
    encoder = FastViTTiny(FastViTTiny.Config(final_conv=False))
    assert encoder.width == 64 and encode(encoder, torch.rand(1, 3, 128, 128)).tokens.shape == (1, 4, 64)


# ------------------------------------------------------------------------------- train vs inference form


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
    for _ in range(3):  # real steps move every branch and layer scale away from its initialization
        loss = encode(encoder, torch.rand(2, 3, 128, 128)).tokens.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        randomize_batchnorm(encoder)
    encoder.eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        before = encode(encoder, x).tokens
        encoder.reparameterize()
        after = encode(encoder, x).tokens
    assert encoder.form == "inference" and count(encoder) < params_train
    assert (before - after).abs().max().item() <= 1e-4
    # and the fused model has exactly the natively built inference form's structure
    native = FastViTTiny(FastViTTiny.Config())
    assert {k: v.shape for k, v in encoder.state_dict().items()} == {k: v.shape for k, v in native.state_dict().items()}


# ------------------------------------------------------------------------------------ multi-scale fusion


@pytest.mark.parametrize("fusion", ["dwconv", "avgpool"])
def test_multi_scale_fusion(fusion):
    base = FastViTTiny(FastViTTiny.Config())
    fused = FastViTTiny(FastViTTiny.Config(fusion_stages=[2, 3], fusion=fusion))
    dims = fused.config.embed_dims  # [16, 16, 32, 32, 64]; stage strides 4, 8, 16, 32, 64
    factors = {2: 64 // 16, 3: 64 // 32}
    expected_extra = sum(dims[s] * f * f + dims[s] for s, f in factors.items()) if fusion == "dwconv" else 0
    assert count(fused) == count(base) + expected_extra
    assert fused.width == base.width + dims[2] + dims[3] == 128 + 64
    out = encode(fused, torch.rand(1, 3, 256, 256))
    assert out.tokens.shape == (1, fused.num_tokens(256), fused.width) == (1, 16, 192)
    assert out.layout.grid == (4, 4)


def test_avgpool_fusion_appends_the_pooled_stage_after_the_final_features():
    torch.manual_seed(0)
    encoder = FastViTTiny(FastViTTiny.Config(fusion_stages=[3], fusion="avgpool")).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        tokens = encode(encoder, x).tokens
        stage3 = encoder.model.stages[:4](encoder.model.stem(x))
    expected = torch.nn.functional.avg_pool2d(stage3, 2).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens[..., 128:], expected)


# ----------------------------------------------------------------------------------------- weight files

# timm -> official names inside a module (ml-fastvlm's mci.py), written here independently of the loader.
TIMM_TO_OFFICIAL = [
    ("stem.", "patch_embed."),
    ("final_conv.", "conv_exp."),
    ("mlp.", "convffn."),
    ("se.fc1.", "se.reduce."),
    ("se.fc2.", "se.expand."),
    ("conv_kxk.", "rbr_conv."),
    ("conv_scale.", "rbr_scale."),
    ("identity.", "rbr_skip."),
    ("large_conv.", "lkb_origin."),
    ("proj.0.reparam_conv.", "proj.0.lkb_reparam."),
]
STAGE_PART = re.compile(r"stages\.(\d+)\.(downsample|pos_emb|blocks)\.")
PART_ORDER = {"downsample": 0, "pos_emb": 1, "blocks": 2}


def official_names(timm_state, head_width=None):
    """timm FastViT keys -> the official ml-fastvlm / MobileCLIP names: the flat `network` list holds each stage's
    downsample, RepCPE and blocks in turn; module renames as in the official code; `.gamma` dropped."""
    found = {(int(m[1]), m[2]) for m in map(STAGE_PART.match, timm_state) if m}
    parts = sorted(found, key=lambda part: (part[0], PART_ORDER[part[1]]))
    network = {f"stages.{stage}.{part}.": f"network.{index}." for index, (stage, part) in enumerate(parts)}
    out = {}
    for key, value in timm_state.items():
        prefix = STAGE_PART.match(key)
        if prefix:
            key = network[prefix[0]] + key[prefix.end() :]
            key = re.sub(r"^(network\.\d+\.)pos_enc\.", r"\1pe.", key)  # RepCPE's train-form conv
        for timm_name, official_name in TIMM_TO_OFFICIAL:
            key = key.replace(timm_name, official_name)
        out[key.removesuffix(".gamma")] = value
    if head_width:
        out["head.proj"] = torch.zeros(head_width, 768)  # the CLIP projection the VLM ignores
    return out


@pytest.mark.parametrize("cls", [FastViTHD, FastViTMCi2, FastViTMCi4])
def test_official_key_map_round_trips_on_every_layout(cls):
    state = on_meta(cls).model.state_dict()
    official = official_names(state, head_width=1)
    assert any(key.startswith("network.") and ".lkb_reparam." in key for key in official)
    assert set(convert_mci_state_dict(official)) == set(state)


OFFICIAL_KEYS = Path(__file__).parent / "data" / "fastvithd_official_keys.txt"


def official_key_list() -> list[tuple[str, tuple[int, ...]]]:
    """Apple's FastViTHD state-dict keys and shapes, as ml-fastvlm's own mci.py builds them (see the file's header)."""
    rows = [line.split("\t") for line in OFFICIAL_KEYS.read_text().splitlines() if not line.startswith("#")]
    return [(key, tuple(int(n) for n in shape.split(",") if n)) for key, shape in rows]


def test_apples_own_fastvithd_keys_convert_onto_timm_fastvit_mci3():
    """The fixed list of Apple's key names (not derived from our map) loads strictly into our FastViTHD."""
    from ablate.api.weights import load_state_dict_strict

    official = {key: torch.empty(shape, device="meta") for key, shape in official_key_list()}
    assert len(official) == 629 and "head.proj" in official
    encoder = on_meta(FastViTHD)
    load_state_dict_strict(encoder.model, convert_mci_state_dict(official), "Apple's FastViTHD keys")


def test_fastvithd_official_checkpoint_has_the_spec_key_count_and_the_12_fused_keys():
    official = {key: torch.empty(shape, device="meta") for key, shape in official_key_list()}
    assert len(official) == 629  # as in the released FastVLM checkpoints' vision tower
    fused = [key for key in official if "lkb_reparam" in key or re.fullmatch(r"network\.(6|9)\.reparam_conv\.\w+", key)]
    assert len(fused) == 12
    converted = convert_mci_state_dict(official)
    moved = {old: new for old, new in zip(official, converted) if old in fused}  # dicts keep their order
    assert moved["network.1.proj.0.lkb_reparam.weight"] == "stages.1.downsample.proj.0.reparam_conv.weight"
    assert moved["network.9.reparam_conv.bias"] == "stages.4.pos_emb.reparam_conv.bias"
    assert len(converted) == 628  # head.proj dropped


@pytest.fixture(scope="module")
def trained_tiny():
    torch.manual_seed(1)
    return FastViTTiny(FastViTTiny.Config()).eval()


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_encoder_weights_load_from_either_layout(tmp_path, trained_tiny, layout):
    state = trained_tiny.model.state_dict()
    path = tmp_path / "encoder.safetensors"
    save_file(official_names(state, head_width=128) if layout == "official" else state, str(path))
    loaded = with_weights(FastViTTiny, str(path)).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(encode(loaded, x).tokens, encode(trained_tiny, x).tokens)


def test_train_form_official_weights_load_into_the_train_form(tmp_path):
    torch.manual_seed(2)
    source = FastViTTiny(FastViTTiny.Config(inference_mode=False)).eval()
    official = official_names(source.model.state_dict())
    assert any(".rbr_conv." in key for key in official) and "network.6.pe.weight" in official
    save_file(official, str(tmp_path / "train.safetensors"))
    loaded = with_weights(FastViTTiny, str(tmp_path / "train.safetensors"), inference_mode=False).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(encode(loaded, x).tokens, encode(source, x).tokens)
    with pytest.raises(CheckpointError, match="train-form.*encoder.inference_mode=false"):
        with_weights(FastViTTiny, str(tmp_path / "train.safetensors"))


def test_own_state_dict_with_fusion_weights_loads(tmp_path, trained_tiny):
    source = FastViTTiny(FastViTTiny.Config(fusion_stages=[1]))
    save_file(source.state_dict(), str(tmp_path / "own.safetensors"))
    loaded = with_weights(FastViTTiny, str(tmp_path / "own.safetensors"), fusion_stages=[1])
    assert torch.equal(loaded.fusion["1"].weight, source.fusion["1"].weight)


def test_pickled_weights_load_with_weights_only(tmp_path, trained_tiny):
    path = tmp_path / "encoder.pt"
    torch.save(trained_tiny.model.state_dict(), path)
    loaded = with_weights(FastViTTiny, str(path))
    assert torch.equal(loaded.model.final_conv.reparam_conv.weight, trained_tiny.model.final_conv.reparam_conv.weight)


def test_a_directory_of_safetensors_shards_is_merged(tmp_path, trained_tiny):
    state = trained_tiny.model.state_dict()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, str(tmp_path / "shard-1.safetensors"))
    save_file({k: state[k] for k in keys[len(keys) // 2 :]}, str(tmp_path / "shard-2.safetensors"))
    assert set(read_tensors(tmp_path)) == set(keys)
    with_weights(FastViTTiny, str(tmp_path))


def test_renamed_and_reshaped_tensors_are_named(tmp_path, trained_tiny):
    state = dict(trained_tiny.model.state_dict())
    state["stages.2.blocks.0.mlp.fc1.weightt"] = state.pop("stages.2.blocks.0.mlp.fc1.weight")
    save_file(state, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: stages.2.blocks.0.mlp.fc1.weight;.*1 unexpected: .*weightt"):
        with_weights(FastViTTiny, str(tmp_path / "renamed.safetensors"))

    state = dict(trained_tiny.model.state_dict())
    state["final_conv.se.fc1.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "reshaped.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 mis-shaped: final_conv.se.fc1.bias \(3,\) vs \(8,\)"):
        with_weights(FastViTTiny, str(tmp_path / "reshaped.safetensors"))


def test_missing_weights_file_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        with_weights(FastViTTiny, str(tmp_path / "nope.safetensors"))


def test_meta_builds_skip_weight_files(tmp_path):
    import ablate

    weights = tmp_path / "never-read.safetensors"
    weights.write_text("not a safetensors file")  # it exists (paths are checked), but a meta build never reads it
    vlm = ablate.build("tiny", [f"encoder.weights={weights}"], meta=True)
    assert vlm.encoder.width == 128 and vlm.loaded_weights == []
