"""Reducers against plain reference implementations: pooling against torch's own, PruMerge/PruMerge+/VisionZip against
loop-based transcriptions of the released code (written here from its description, independent of the vectorized
plugins), budgets on every encoder that has a score, token counts at full size (count-only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ablate
from ablate.api.components import ATTENTION, CLS, Attention, StageContext, TokenLayout
from ablate.api.errors import ConfigError
from ablate.api.reducers import SCORES, offered_scores, token_scores
from ablate.api.registry import get_registry
from ablate_plugins.reducers.pooling import MATRYOSHKA_SCALES, nested_scales


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on this shared 2-core machine, more threads spin against each other (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reducer(name: str, **options):
    cls = get_registry().get("reducer", name)
    return cls(cls.Config(name=name, **options)).eval()


def grid_context(batch: int, side: int, width: int = 8, seed: int = 0) -> StageContext:
    tokens = torch.randn(batch, side * side, width, generator=torch.Generator().manual_seed(seed))
    return StageContext(tokens=tokens, layout=TokenLayout.grid_of(side, side))


# ------------------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("side,kernel", [(24, 2), (24, 3), (24, 5), (16, 4), (12, 5)])
def test_avgpool_kernel_equals_torch_avg_pool2d(side, kernel):
    ctx = grid_context(2, side)
    out = reducer("avgpool", kernel=kernel)(ctx)
    image = ctx.tokens.transpose(1, 2).reshape(2, 8, side, side)
    expected = F.avg_pool2d(image, kernel, stride=kernel)  # floors what does not fit, as the reducer does
    assert out.layout.grid == tuple(expected.shape[2:])
    torch.testing.assert_close(out.tokens, expected.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("side,tokens,kernel", [(24, 144, 2), (24, 64, 3), (24, 16, 6), (24, 9, 8), (16, 4, 8)])
def test_avgpool_budget_picks_the_kernel(side, tokens, kernel):
    ctx = grid_context(1, side)
    out = reducer("avgpool", tokens=tokens)(ctx)
    image = ctx.tokens.transpose(1, 2).reshape(1, 8, side, side)
    torch.testing.assert_close(out.tokens, F.avg_pool2d(image, kernel).flatten(2).transpose(1, 2))


def test_avgpool_adaptive_equals_torch_adaptive_pooling():
    ctx = grid_context(2, 16)
    out = reducer("avgpool", tokens=144, adaptive=True)(ctx)
    image = ctx.tokens.transpose(1, 2).reshape(2, 8, 16, 16)
    torch.testing.assert_close(out.tokens, F.adaptive_avg_pool2d(image, 12).flatten(2).transpose(1, 2))
    assert out.layout.grid == (12, 12)


def test_nested_scales_are_m3s():
    assert nested_scales((24, 24)) == [576, 144, 36, 9, 1]
    assert nested_scales((16, 16)) == [256, 64, 16, 4, 1]
    assert nested_scales((12, 12)) == [144, 36, 9, 1]


def test_matryoshka_all_scales_contract():
    """The interface multi-scale training relies on: tokens = budget, extras[matryoshka_scales] = {count: tokens}."""
    ctx = grid_context(2, 24)
    out = reducer("matryoshka", tokens=36, all_scales=True)(ctx)
    scales = out.extras[MATRYOSHKA_SCALES]
    assert sorted(scales) == [1, 9, 36, 144, 576]
    assert out.tokens.shape == (2, 36, 8) and torch.equal(scales[36], out.tokens)
    for count, tokens in scales.items():
        kernel = 24 // int(count**0.5)
        image = ctx.tokens.transpose(1, 2).reshape(2, 8, 24, 24)
        torch.testing.assert_close(tokens, F.avg_pool2d(image, kernel).flatten(2).transpose(1, 2))
    assert reducer("matryoshka").config.position == "after_connector"  # M3's released code pools the projector's output


def test_matryoshka_counts_on_llava_15s_encoder():
    overrides = ["encoder=timm", "encoder.model_name=vit_large_patch14_clip_336", "encoder.feature_block=22"]
    for tokens in (1, 9, 36, 144, 576):
        record = ablate.measure(
            "tiny", [*overrides, "reducer=matryoshka", f"reducer.tokens={tokens}"], count_only=True
        ).to_dict()
        assert record["visual_tokens"] == tokens and record["tokens"]["encoder"] == 576


def test_matryoshka_counts_on_fastvithd_at_1024():
    for tokens in (1, 4, 16, 64, 256):
        record = ablate.measure(
            "tiny", ["encoder=fastvithd", "reducer=matryoshka", f"reducer.tokens={tokens}"], count_only=True
        ).to_dict()
        assert record["visual_tokens"] == tokens and record["tokens"]["encoder"] == 256


def test_matryoshka_all_scales_after_a_full_size_connector():
    """On the meta device: every nested scale of FastViTHD@1024, each as wide as the decoder (after the connector)."""
    overrides = ["encoder=fastvithd", "reducer=matryoshka", "reducer.tokens=16", "reducer.all_scales=true"]
    vlm = ablate.build("tiny", overrides, meta=True)
    ctx = vlm.start(torch.empty(1, 3, 1024, 1024, device="meta"), torch.zeros(1, 2, dtype=torch.long, device="meta"))
    out = vlm.run_vision(ctx)
    assert {count: tuple(t.shape) for count, t in out.extras[MATRYOSHKA_SCALES].items()} == {
        count: (1, count, vlm.decoder.hidden_size) for count in (256, 64, 16, 4, 1)
    }


# ------------------------------------------------------------------------------------------------- PruMerge


def attention_context(batch: int, side: int, width: int = 16, heads: int = 4, seed: int = 0, sharp: float = 3.0):
    """Features (B, N, C) and the scored layer's q/k with a CLS first, C = heads * head_dim (as in a ViT)."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    x = torch.randn(batch, n, width, generator=g)
    q, k = (torch.randn(batch, 1 + n, width, generator=g) * sharp**0.5 for _ in range(2))
    per_head = [t.view(batch, 1 + n, heads, -1).transpose(1, 2) for t in (q, k)]
    ctx = StageContext(
        tokens=x,
        layout=TokenLayout.grid_of(side, side),
        cls=torch.randn(batch, width, generator=g),
        attention=Attention(queries=per_head[0], keys=per_head[1], num_prefix_tokens=1),
    )
    return ctx, q, k


def released_prumerge(x, q, k, *, plus=False, budget=None, k_nn=32, iqr_factor=1.5):
    """PruMerge / PruMerge+ as 42Shawn/LLaVA-PruMerge's clip_encoder.py does it, with its loops; q, k: (B, 1+N, C)
    as the hooks on q_proj/k_proj give them. PruMerge+ at batch > 1 appends the positions filtered against the whole
    batch's picks to every row (the released cat only runs at batch 1). `budget`: the fixed-budget option."""
    batch, n, width = x.shape
    cls_attn = torch.softmax(q @ k.transpose(-2, -1) * width**-0.5, dim=-1)[:, 0, 1:]
    if budget is None:
        flat = cls_attn.to(torch.float32).numpy().flatten()
        q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
        ratio = len(np.where(flat > q3 + iqr_factor * (q3 - q1))[0]) / len(flat)
        left = int(n * ratio)
    else:
        left = budget - 1 if not plus else -(-(budget - 1) // 2)
    idx = torch.topk(cls_attn, left, dim=1).indices
    if plus and budget is None:
        step = int(1 / ratio)
        sequence = torch.arange(0, n - 1, int(step / 3))
        taken = idx.flatten().tolist()
        filtered = torch.tensor([p for p in sequence.tolist() if p not in taken], dtype=torch.long)
        idx = torch.cat([idx, filtered.unsqueeze(0).expand(batch, -1)], dim=1)
    elif plus:
        rows = []
        for b in range(batch):
            remaining = [p for p in range(n) if p not in idx[b].tolist()]
            rest = budget - 1 - left
            rows.append(idx[b].tolist() + [remaining[(j * len(remaining)) // rest] for j in range(rest)])
        idx = torch.tensor(rows)
    keys = F.normalize(k[:, 1:], dim=-1)
    out = []
    for b in range(batch):
        kept = idx[b].tolist()
        others = [p for p in range(n) if p not in kept]
        row = []
        for i, p in enumerate(kept):
            rest = kept[:i] + kept[i + 1 :] + others
            similarity = keys[b, rest] @ keys[b, p]
            nearest = [rest[j] for j in torch.topk(similarity, k_nn).indices.tolist()]
            row.append(x[b, p] + sum(cls_attn[b, j] * x[b, j] for j in nearest))
        row.append(sum(cls_attn[b, j] * x[b, j] for j in others))
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge-plus"])
@pytest.mark.parametrize("batch,side", [(1, 24), (2, 24), (3, 6)])
def test_prumerge_adaptive_equals_the_released_loops(plus, batch, side):
    ctx, q, k = attention_context(batch, side, seed=side + batch)
    k_nn = 32 if side * side > 32 else 8
    out = reducer("prumerge-plus" if plus else "prumerge", k_nn=k_nn)(ctx)
    expected = released_prumerge(ctx.tokens, q, k, plus=plus, k_nn=k_nn)
    assert out.tokens.shape == expected.shape  # the token count included
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)
    assert out.layout.num_tokens == expected.shape[1]


@pytest.mark.parametrize("plus", [False, True], ids=["prumerge", "prumerge-plus"])
def test_prumerge_budget_equals_the_loops_and_keeps_rows_apart(plus):
    ctx, q, k = attention_context(3, 12, seed=5)
    out = reducer("prumerge-plus" if plus else "prumerge", tokens=40)(ctx)
    expected = released_prumerge(ctx.tokens, q, k, plus=plus, budget=40)
    assert out.tokens.shape == (3, 40, 16)
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)


def test_prumerge_counts_outliers_as_integers():
    """The kept count is floor(N * outliers / (B N)) in integers: the released float64 division is exact at N = 576,
    a float32 one (an earlier version) keeps one token fewer for 11, 13, ... outliers."""
    prumerge = reducer("prumerge")
    for outliers in (11, 13, 33, 40):
        scores = torch.linspace(0.0, 1.0, 576)[None].clone()
        scores[0, :outliers] = 100.0  # far above the fence
        assert prumerge.select(scores).shape[1] == outliers
        assert int(576 * (torch.tensor(outliers, dtype=torch.float32) / 576).item()) in (outliers, outliers - 1)
    batch = torch.linspace(0.0, 1.0, 576).repeat(2, 1)
    batch[0, :30] = 100.0
    batch[1, :3] = 100.0  # one fence for the batch: 33 outliers in all -> 16 kept per row
    assert prumerge.select(batch).shape == (2, 16)


# ------------------------------------------------------------------------------------------------- VisionZip


def released_visionzip(hidden, q, k, heads, dominant, contextual):
    """VisionZip as dvlab-research/VisionZip does it (hidden: (B, 1+N, C) with CLS; per-head attention summed over
    heads; metric = keys averaged over heads), written with loops. `dominant` counts the CLS."""
    batch, t, width = hidden.shape
    qh, kh = (x.view(batch, t, heads, -1).transpose(1, 2) for x in (q, k))
    attention = torch.softmax(qh @ kh.transpose(-2, -1) * qh.shape[-1] ** -0.5, dim=-1)
    metric = kh.mean(dim=1)
    out = []
    for b in range(batch):
        cls_attention = attention[b, :, 0, 1:].sum(dim=0)
        top = (cls_attention.topk(dominant - 1).indices + 1).tolist()
        keep = sorted([0, *top])
        rest = [p for p in range(t) if p not in keep]
        step = max(1, len(rest) // max(contextual, 1))  # the released code divides by zero at contextual=0
        targets = list(range(0, len(rest), step))[:contextual]
        others = [i for i in range(len(rest)) if i not in targets] if targets else []
        unit = F.normalize(metric[b, rest], dim=-1)
        groups = {target: [] for target in targets}
        for i in others:
            similarity = torch.stack([unit[i] @ unit[target] for target in targets])
            groups[targets[int(similarity.argmax())]].append(hidden[b, rest[i]])
        row = [hidden[b, p] for p in keep]
        for target in targets:
            merged = torch.stack(groups[target]).mean(dim=0) if groups[target] else torch.zeros(width)
            row.append(hidden[b, rest[target]] + merged)
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("tokens,contextual", [(64, 10), (20, 5), (9, 0)])
def test_visionzip_equals_the_released_loops(tokens, contextual):
    ctx, q, k = attention_context(2, 12, heads=4, seed=tokens)
    out = reducer("visionzip", tokens=tokens, contextual=contextual)(ctx)
    hidden = torch.cat([ctx.cls[:, None], ctx.tokens], dim=1)
    expected = released_visionzip(hidden, q, k, heads=4, dominant=tokens - contextual, contextual=contextual)
    assert out.tokens.shape == expected.shape == (2, tokens, 16)
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)


def test_visionzip_default_split_is_the_readmes():
    assert reducer("visionzip", tokens=64).contextual == 10
    assert reducer("visionzip", tokens=192).contextual == 30


# ------------------------------------------------------------------------------------------------- scores


def test_scores_are_distributions_and_cls_is_the_cls_row():
    ctx, q, k = attention_context(2, 6, heads=4)
    for score in SCORES:
        values = token_scores(ctx, score, heads="mean")
        assert values.shape == (2, 36) and bool((values >= 0).all())
        if SCORES[score]:  # attention scores leave out what goes to the prefix (CLS) token
            assert bool((values.sum(dim=1) < 1).all())
        else:
            torch.testing.assert_close(values.sum(dim=1), torch.ones(2))
    full = torch.softmax(q @ k.transpose(-2, -1) * 16**-0.5, dim=-1)
    torch.testing.assert_close(token_scores(ctx, "cls", heads="concat"), full[:, 0, 1:])
    mean_query = torch.softmax(q[:, 1:].mean(dim=1, keepdim=True) @ k.transpose(-2, -1) * 16**-0.5, dim=-1)
    torch.testing.assert_close(token_scores(ctx, "mean_query", heads="concat"), mean_query[:, 0, 1:])
    torch.testing.assert_close(token_scores(ctx, "attention_received", heads="concat"), full[:, 1:, 1:].mean(dim=1))


TINY_ENCODERS = {
    "vit (CLS)": [
        "encoder=timm",
        "encoder.model_name=vit_tiny_patch16_224",
        "encoder.image_size=64",
        "encoder.feature_block=-2",
    ],
    "siglip (no CLS)": [
        "encoder=timm",
        "encoder.model_name=vit_base_patch16_siglip_224",
        "encoder.image_size=64",
        "encoder.model_kwargs={depth: 2, embed_dim: 64, num_heads: 2}",
    ],
    "convnext (no attention)": ["encoder=timm", "encoder.model_name=convnext_atto", "encoder.image_size=128"],
    "fastvit": ["encoder=fastvit-tiny", "encoder.image_size=256"],
}
OFFERED = {
    "vit (CLS)": list(SCORES),
    "siglip (no CLS)": ["mean_query", "attention_received", "mean_similarity", "norm"],
    "convnext (no attention)": ["mean_similarity", "norm"],
    "fastvit": ["mean_query", "attention_received", "mean_similarity", "norm"],
}


@pytest.mark.parametrize("encoder", TINY_ENCODERS)
def test_each_encoder_declares_its_scores(encoder):
    vlm = ablate.build("tiny", TINY_ENCODERS[encoder], meta=True)
    assert offered_scores(vlm.encoder) == OFFERED[encoder]


def test_a_score_the_encoder_cannot_give_fails_at_build_listing_the_options():
    with pytest.raises(ConfigError, match="Scores it offers: mean_similarity, norm") as info:
        overrides = [*TINY_ENCODERS["convnext (no attention)"], "reducer=prumerge", "reducer.score=mean_query"]
        ablate.build("tiny", overrides, meta=True)
    assert "reducer.score" in str(info.value)


BUDGETED = {  # reducer -> options at a budget of 6 tokens out of 16
    "prumerge": ["reducer.tokens=6", "reducer.k_nn=4"],
    "prumerge-plus": ["reducer.tokens=6", "reducer.k_nn=4"],
    "visionzip": ["reducer.tokens=6"],
    "random": ["reducer.tokens=6"],
}


@pytest.mark.parametrize("encoder", TINY_ENCODERS)
def test_a_fixed_budget_gives_exactly_that_many_tokens_batched(encoder):
    """Every scored reducer, with every score the encoder offers, on a batch of 3 different images: 6 tokens per row,
    and each row as it is alone (rows do not leak into each other at a fixed budget)."""
    pixels = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    for name, options in BUDGETED.items():
        scores = OFFERED[encoder] if name != "random" else [None]
        for score in scores:
            overrides = [*TINY_ENCODERS[encoder], f"reducer={name}", *options] + (
                [f"reducer.score={score}"] if score else []
            )
            torch.manual_seed(0)
            vlm = ablate.build("tiny", overrides)
            size = vlm.encoder.config.image_size
            images = F.interpolate(pixels, size=(size, size))
            with torch.no_grad():
                together = vlm.visual_embeds(images)
                alone = torch.cat([vlm.visual_embeds(images[i : i + 1]) for i in range(3)])
            assert together.shape == (3, 6, vlm.decoder.hidden_size), (name, score)
            torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5, msg=f"{name} {score}")


def test_random_is_seeded_and_keeps_order():
    ctx = grid_context(2, 6)
    a, b = reducer("random", tokens=10, seed=1)(ctx), reducer("random", tokens=10, seed=1)(ctx)
    c = reducer("random", tokens=10, seed=2)(ctx)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    kept = [int((ctx.tokens[0] == token).all(dim=1).nonzero()) for token in a.tokens[0]]
    assert kept == sorted(kept) and torch.equal(a.tokens[1], ctx.tokens[1, kept])


def test_encoder_attention_lines_up_with_the_tokens_it_scores():
    """FastViT's attention comes from its last attention block, on the same grid as the tokens."""
    vlm = ablate.build("tiny", ["encoder.image_size=256", "reducer=prumerge", "reducer.score=mean_query"])
    assert ATTENTION in vlm.encoder.requested and CLS not in vlm.encoder.requested
    with torch.no_grad():
        out = vlm.encode(vlm.start(torch.rand(1, 3, 256, 256), vlm.make_prompt(2)))
    assert out.attention.queries.shape[2] == out.num_tokens == 16 and out.attention.num_prefix_tokens == 0


# ------------------------------------------------------------------------------------------------- the record


def test_data_dependent_counts_come_from_the_measured_image():
    """Adaptive PruMerge: count-only gives its upper bound, labelled; a timed run recounts the reducer and the
    prefill on the real image, and its prefill FLOPs equal those of a fixed budget with the same token count."""
    overrides = ["encoder.image_size=256", "reducer=prumerge", "reducer.score=attention_received"]
    counted = ablate.measure("tiny", overrides, count_only=True).to_dict()
    # 16 tokens at 256 px: the fence keeps at most ceil(15 / 4) = 4, plus the summary token.
    assert counted["visual_tokens"] == 5 and counted["count_basis"] == "upper bound"
    assert any("at most 5 visual tokens" in note for note in counted["notes"])
    timed = ablate.measure("tiny", overrides, repeats=1, warmup=0, threads=1).to_dict()
    kept = timed["visual_tokens"]
    assert timed["count_basis"] == "measured image"
    assert 2 <= kept <= 5 and timed["tokens"]["reducer"] == kept and timed["flops"]["reducer"] > 0
    fixed = ablate.measure("tiny", [*overrides, f"reducer.tokens={kept}"], count_only=True).to_dict()
    assert timed["flops"]["prefill"] == fixed["flops"]["prefill"] and timed["latency_ms"]["reducer"] > 0


def test_a_reducer_that_leaves_the_llm_input_unchanged_is_flagged():
    unchanged = ablate.measure("tiny", ["reducer=matryoshka"], count_only=True).to_dict()
    assert "reducer 'matryoshka' leaves the LLM input unchanged: 4 visual tokens in and out." in unchanged["notes"]
    for overrides in (["reducer=none"], ["reducer=avgpool"]):
        record = ablate.measure("tiny", overrides, count_only=True).to_dict()
        assert not any("unchanged" in note for note in record["notes"]), overrides


def test_fidelity_is_in_the_record_when_asked_for(tmp_path):
    from conftest import run_json

    record = run_json("tiny", "reducer=avgpool", "--repeats", "1", "--warmup", "0", "--threads", "1", "--fidelity")
    fidelity = record["fidelity"]
    assert set(fidelity) == {"top1_agreement", "kl", "rows", "reference"} and fidelity["kl"] > 0
    assert record["config"]["run"]["fidelity"] is True
    assert ablate.measure("tiny", repeats=1, warmup=0, threads=1).to_dict()["fidelity"] is None
    counted = ablate.measure("tiny", count_only=True, fidelity=True).to_dict()
    assert counted["fidelity"] is None and any("fidelity needs a real run" in note for note in counted["notes"])


def test_plain_downsampling_baseline_gives_the_same_count():
    from ablate.model.downsampling import downsampled, image_size_for_tokens

    vit = ["encoder=timm", "encoder.model_name=vit_large_patch14_clip_336", "encoder.feature_block=22"]
    assert image_size_for_tokens("tiny", 64, vit) == 112
    assert downsampled("tiny", 16, ["encoder=fastvithd", "reducer=prumerge"]) == [
        "encoder=fastvithd",
        "reducer=prumerge",
        "reducer=none",
        "encoder.image_size=256",
    ]
    with pytest.raises(ConfigError, match="square count"):
        image_size_for_tokens("tiny", 10, ["encoder=fastvithd"])


def test_fastvit_attention_is_its_last_blocks_qkv():
    vlm = ablate.build("tiny", ["encoder.image_size=256", "reducer=prumerge", "reducer.score=mean_query"])
    block = vlm.encoder.model.stages[-1].blocks[-1]
    inputs = {}
    handle = block.token_mixer.register_forward_pre_hook(lambda module, args: inputs.update(x=args[0]))
    with torch.no_grad():
        out = vlm.encode(vlm.start(torch.rand(2, 3, 256, 256), vlm.make_prompt(2, 2)))
        qkv = block.token_mixer.qkv(inputs["x"].flatten(2).transpose(1, 2))
    handle.remove()
    heads = block.token_mixer.num_heads
    q, k = (qkv[..., i * 64 : (i + 1) * 64].unflatten(-1, (heads, -1)).transpose(1, 2) for i in (0, 1))
    torch.testing.assert_close(out.attention.queries, q)
    torch.testing.assert_close(out.attention.keys, k)
