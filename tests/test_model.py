"""Assembly: the VLM equals its parts run by hand; splicing; meta builds; build-time checks."""

from __future__ import annotations

import pytest
import torch

import ablate
from ablate.api.components import StageContext
from ablate.api.errors import ConfigError, ImageSizeError, IncompatibleComponentsError

TINY = "tiny"


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return ablate.build(TINY)


def pixels(vlm, batch=1, seed=0):
    size = vlm.config.encoder.image_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_prefill_returns_first_token_logits(vlm):
    ids = vlm.make_prompt(prompt_tokens=7, batch_size=2)
    with torch.no_grad():
        logits = vlm.prefill(pixels(vlm, 2), ids)
    assert logits.shape == (2, vlm.decoder.vocab_size)
    assert torch.isfinite(logits).all()


def test_prefill_equals_the_parts_run_by_hand(vlm):
    """The toolkit's chain must be exactly encoder -> connector -> LM on the spliced sequence."""
    x = pixels(vlm)
    ids = vlm.make_prompt(prompt_tokens=5)
    with torch.no_grad():
        visual = vlm.connector.layers(vlm.encoder(StageContext(pixel_values=x)).tokens)
        text = vlm.decoder.lm.get_input_embeddings()(ids)
        embeds = torch.cat([visual, text[:, 1:]], dim=1)  # the placeholder is first in make_prompt
        expected = vlm.decoder.lm(inputs_embeds=embeds).logits[:, -1]
        assert torch.allclose(vlm.prefill(x, ids), expected, atol=1e-5)


def test_splice_replaces_the_placeholder_wherever_it_is(vlm):
    visual = torch.randn(2, 3, vlm.decoder.hidden_size)
    ids = torch.tensor([[5, vlm.image_token_id, 6, 7], [5, 6, 7, vlm.image_token_id]])
    embeds, _, _ = vlm.splice(visual, ids)
    table = vlm.decoder.lm.get_input_embeddings().weight
    assert embeds.shape == (2, 6, vlm.decoder.hidden_size)
    assert torch.equal(embeds[0, 1:4], visual[0]) and torch.equal(embeds[0, 4], table[6])
    assert torch.equal(embeds[1, 3:6], visual[1]) and torch.equal(embeds[1, 0], table[5])


@pytest.mark.parametrize("ids", [[[1, 2, 3]], [[1023, 2, 1023]]])
def test_splice_demands_exactly_one_placeholder(vlm, ids):
    with pytest.raises(ConfigError, match="exactly one image placeholder"):
        vlm.splice(torch.randn(1, 2, vlm.decoder.hidden_size), torch.tensor(ids))


def test_declared_tokens_match_the_real_ones(vlm):
    with torch.no_grad():
        real = vlm.visual_embeds(pixels(vlm)).shape[1]
    assert vlm.num_visual_tokens() == real == vlm.encoder.num_tokens()


def test_meta_build_counts_like_the_real_build(vlm):
    meta = ablate.build(TINY, meta=True)
    assert all(p.is_meta for p in meta.parameters())
    assert meta.params() == vlm.params()
    assert vlm.params()["total"] == sum(vlm.params()[k] for k in ("encoder", "reducer", "connector", "decoder"))


def test_connector_sizes_come_from_the_neighbours(vlm):
    assert vlm.connector.in_width == vlm.encoder.width
    assert vlm.connector.out_width == vlm.decoder.hidden_size


def test_dtype_build():
    vlm = ablate.build(TINY, ["run.dtype=bfloat16"])
    assert {p.dtype for p in vlm.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = vlm.prefill(pixels(vlm), vlm.make_prompt(3))
    assert logits.dtype == torch.bfloat16


def test_components_in_different_dtypes():
    """A float32 encoder before a bfloat16 LLM: each stage computes in its own dtype, cast only at the boundary."""
    torch.manual_seed(0)
    vlm = ablate.build(TINY, ["run.dtype=bfloat16", "run.dtypes.encoder=float32"])
    assert {p.dtype for p in vlm.encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in vlm.decoder.parameters()} == {torch.bfloat16}
    ctx = vlm.start(pixels(vlm), vlm.make_prompt(3))
    with torch.no_grad():
        encoded = vlm.encode(ctx)
        connected = vlm.connect(vlm.reduce(encoded))
        logits = vlm.prefill_stage(connected)
    assert encoded.tokens.dtype == torch.float32 and connected.tokens.dtype == torch.bfloat16
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_training_contract_loss_and_all_logits():
    """forward() with labels gives the loss over the text positions only (visual positions are ignored)."""
    torch.manual_seed(0)
    vlm = ablate.build(TINY, train=True)
    assert vlm.training
    ids = vlm.make_prompt(6, batch_size=2)
    labels = ids.clone()
    labels[:, :3] = -100  # the placeholder and the first two text tokens are not learned
    out = vlm(pixels(vlm, 2), ids, labels=labels)
    n = vlm.num_visual_tokens()
    assert out.logits.shape == (2, ids.shape[1] - 1 + n, vlm.decoder.vocab_size)
    spliced_labels = torch.cat([torch.full((2, n), -100), labels[:, 1:]], dim=1)  # placeholder -> n ignored slots
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), spliced_labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert (
        vlm.connector.layers[0].weight.grad.abs().sum() > 0
        and vlm.encoder.model.stem[0].reparam_conv.weight.grad is not None
    )


def test_bad_image_size_fails_at_build():
    with pytest.raises(ImageSizeError, match="multiple of 64"):
        ablate.build(TINY, ["encoder.image_size=100"], meta=True)


def test_reducer_needs_are_checked_before_anything_runs():
    with pytest.raises(IncompatibleComponentsError, match="prumerge.*cls"):
        ablate.build(TINY, ["reducer=prumerge", "reducer.score=cls"], meta=True)


def test_prumerge_on_a_vit_with_cls_and_attention():
    overrides = [
        "encoder=timm",
        "encoder.model_name=vit_tiny_patch16_224",
        "encoder.image_size=64",
        "encoder.feature_block=-2",
        "reducer=prumerge",
    ]
    torch.manual_seed(0)
    vlm = ablate.build(TINY, overrides)
    with torch.no_grad():
        features = vlm.encode(vlm.start(pixels(vlm, 2), vlm.make_prompt(4, 2)))
        assert features.cls.shape == (2, 192) and features.attention.keys.shape == (2, 3, 17, 64)
        reduced = vlm.reduce(features)
        logits = vlm.prefill(pixels(vlm, 2), vlm.make_prompt(4, 2))
    assert 2 <= reduced.tokens.shape[1] <= 16 + 1  # kept tokens + the one summary token
    assert reduced.layout.grid is None and reduced.layout.loose == reduced.tokens.shape[1]
    assert logits.shape == (2, vlm.decoder.vocab_size)
