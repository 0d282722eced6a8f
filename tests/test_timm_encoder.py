"""The timm encoder: feature selection as LLaVA uses it, CLS and attention for reducers, sizes."""

from __future__ import annotations

import pytest
import torch

from ablate.api.components import ATTENTION, CLS, StageContext
from ablate.api.errors import ImageSizeError
from ablate_plugins.encoders.timm_encoder import TimmEncoder, TimmEncoderConfig


def encode(encoder, pixels):
    return encoder(StageContext(pixel_values=pixels))


def encoder(**options):
    torch.manual_seed(0)
    return TimmEncoder(TimmEncoderConfig(name="timm", **options)).eval()


def by_hand_blocks(vit, x, last_block):
    """ViT tokens after block `last_block`, computed without forward_intermediates."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for block in vit.blocks[: last_block + 1]:
        x = block(x)
    return x


def test_penultimate_block_without_cls_like_llava():
    enc = encoder(model_name="vit_tiny_patch16_224", image_size=64, feature_block=-2)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = encode(enc, x)
        expected = by_hand_blocks(enc.model, x, len(enc.model.blocks) - 2)[:, enc.model.num_prefix_tokens :]
    assert out.tokens.shape == (2, 16, 192) and out.layout.grid == (4, 4)
    assert torch.allclose(out.tokens, expected, atol=1e-6)


def test_final_features_keep_prefix_when_asked():
    enc = encoder(model_name="vit_tiny_patch16_224", image_size=64, keep_prefix_tokens=True)
    with torch.no_grad():
        out = encode(enc, torch.rand(1, 3, 64, 64))
    assert out.tokens.shape == (1, 17, 192) and out.layout.grid is None
    assert enc.num_tokens() == 17


def test_cls_and_attention_of_the_next_block_on_request():
    enc = encoder(model_name="vit_tiny_patch16_224", image_size=64, feature_block=-2)
    assert enc.provides == {CLS, ATTENTION}
    enc.request(frozenset({CLS, ATTENTION}))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = encode(enc, x)
        penultimate = by_hand_blocks(enc.model, x, len(enc.model.blocks) - 2)
        last = enc.model.blocks[-1]
        qkv = last.attn.qkv(last.norm1(penultimate))
    assert torch.allclose(out.cls, penultimate[:, 0], atol=1e-6)
    heads = last.attn.num_heads  # per head: (B, heads, T, head_dim), channels split in timm's order
    q, k = (qkv[..., i * 192 : (i + 1) * 192].unflatten(-1, (heads, -1)).transpose(1, 2) for i in (0, 1))
    assert out.attention.queries.shape == (1, heads, 17, 192 // heads)
    assert torch.allclose(out.attention.queries, q, atol=1e-5)
    assert torch.allclose(out.attention.keys, k, atol=1e-5)
    assert out.attention.num_prefix_tokens == 1


def test_convnet_map_becomes_row_major_tokens():
    enc = encoder(model_name="convnext_atto", image_size=64)
    assert enc.provides == frozenset()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = encode(enc, x)
        fmap = enc.model.forward_features(x)
    assert out.layout.grid == (2, 2) and out.tokens.shape == (1, 4, enc.width)
    assert torch.equal(out.tokens[0, 1], fmap[0, :, 0, 1])  # row 0, column 1
    with pytest.raises(ImageSizeError, match="multiple of 32"):
        enc.num_tokens(100)


def test_native_size_is_the_default():
    with torch.device("meta"):
        enc = TimmEncoder(TimmEncoderConfig(name="timm", model_name="vit_large_patch14_clip_336"))
    assert enc.config.image_size == 336 and enc.num_tokens() == 576


def test_fixed_size_vit_refuses_other_sizes_with_the_fix():
    enc = encoder(model_name="vit_tiny_patch16_224", image_size=64)
    with pytest.raises(Exception, match="encoder.image_size=128"):
        enc.num_tokens(128)


def test_unknown_timm_model_is_a_config_error():
    from ablate.api.errors import ConfigError

    with pytest.raises(ConfigError, match="encoder.model_name"):
        encoder(model_name="vit_nonexistent_patch3")


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(feature_block=99), r"encoder.feature_block=99 is out of range: vit_tiny_patch16_224 has 12 blocks"),
        (dict(model_name="convnext_atto", feature_block=7), r"feature_block=7 is out of range: convnext_atto has 4"),
        (dict(attention_block=-13), r"encoder.attention_block=-13 is out of range"),
        (dict(model_kwargs={"bogus": 1}), r"timm cannot build .*bogus.*encoder.model_kwargs"),
    ],
)
def test_bad_options_name_the_key(options, message):
    from ablate.api.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        encoder(**{"model_name": "vit_tiny_patch16_224", "image_size": 64, **options})


def test_attention_of_the_last_block_when_the_last_block_is_selected():
    enc = encoder(model_name="vit_tiny_patch16_224", image_size=64, feature_block=-1)
    assert enc._attention_module() is enc.model.blocks[-1].attn.qkv
    enc = encoder(model_name="vit_tiny_patch16_224", image_size=64, feature_block=5)
    assert enc._attention_module() is enc.model.blocks[6].attn.qkv


def test_attention_without_cls_for_siglip_like_vits():
    """A CLS-free ViT (SigLIP) gives per-head q/k with no prefix (reducers use substitute scores), not CLS."""
    enc = encoder(
        model_name="vit_base_patch16_siglip_224",
        image_size=64,
        model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
    )
    assert enc.provides == {ATTENTION}
    enc.request(frozenset({ATTENTION}))
    with torch.no_grad():
        out = encode(enc, torch.rand(2, 3, 64, 64))
    assert out.attention.queries.shape == (2, 2, 16, 32) and out.attention.num_prefix_tokens == 0


def test_attention_of_the_feature_block_stops_there():
    """VisionZip's layer (attention_block = feature_block): the tower stops after it, and q/k are that block's."""
    enc = encoder(model_name="vit_tiny_patch16_224", image_size=64, feature_block=5, attention_block=5)
    enc.request(frozenset({ATTENTION}))
    ran = []
    enc.model.blocks[6].register_forward_hook(lambda *args: ran.append(6))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = encode(enc, x)
        before = by_hand_blocks(enc.model, x, 4)
        block = enc.model.blocks[5]
        qkv = block.attn.qkv(block.norm1(before))
    assert not ran and not any("past the selected features" in note for note in enc.notes())
    q = qkv[..., :192].unflatten(-1, (block.attn.num_heads, -1)).transpose(1, 2)
    torch.testing.assert_close(out.attention.queries, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, by_hand_blocks(enc.model, x, 5)[:, 1:], atol=1e-5, rtol=1e-5)
