"""The 2025 reducers (DivPrune, VisPruner, CDPruner, DART) against loop transcriptions of their released code, written
here from its description (per row, Python lists and sets, independent of the vectorized plugins); exact budgets,
batched, on every kind of encoder; DART's layer states against transformers' own forward."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import ablate
from ablate.api.components import Attention, DecoderPruning, LayerStates, StageContext, TokenLayout
from ablate.api.errors import ConfigError
from ablate.api.registry import get_registry
from ablate_plugins.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig
from ablate_plugins.reducers.dart import dart_select


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on this shared 2-core machine, more threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reducer(name: str, **options):
    cls = get_registry().get("reducer", name)
    return cls(cls.Config(name=name, **options)).eval()


def context(batch: int, n: int, width: int = 32, heads: int = 4, seed: int = 0, text: int = 0) -> StageContext:
    """Tokens (B, N, C), a CLS-first attention layer's per-head q/k, and optionally `text` prompt embeddings."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, 1 + n, width // heads, generator=g) * 2 for _ in range(2))
    return StageContext(
        tokens=torch.randn(batch, n, width, generator=g),
        layout=TokenLayout.unstructured(n),
        cls=torch.randn(batch, width, generator=g),
        attention=Attention(queries=q, keys=k, num_prefix_tokens=1),
        text_embeds=torch.randn(batch, text, width, generator=g) if text else None,
    )


def kept_rows(out: StageContext, ctx: StageContext) -> list[list[int]]:
    """Which input tokens each output row holds (the 2025 reducers select, they never merge)."""
    return [
        [int((ctx.tokens[b] == token).all(dim=1).nonzero()) for token in out.tokens[b]] for b in range(len(ctx.tokens))
    ]


# ------------------------------------------------------------------------------------------------- DivPrune


def released_divprune(x: torch.Tensor, keep: int) -> list[int]:
    """vbdi/divprune's DivPrune on one image's (N, C) features: 1 - cosine similarity; the first pick maximises the
    second-smallest distance of its column, each next one the smallest distance to the picks so far."""
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()
    picks: list[int] = []
    for i in range(keep):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(distance[picks], dim=0).values
        picks.append(int(torch.argmax(scores)))
    return sorted(picks)


@pytest.mark.parametrize("n,keep", [(576, 56), (64, 16), (16, 1), (16, 16)])
def test_divprune_equals_the_released_loop(n, keep):
    ctx = context(2, n, seed=n + keep)
    out = reducer("divprune", tokens=keep)(ctx)
    assert out.tokens.shape == (2, keep, 32) and out.layout.num_tokens == keep
    assert kept_rows(out, ctx) == [released_divprune(ctx.tokens[b], keep) for b in range(2)]


def test_divprune_default_ratio_is_the_readmes():
    ctx = context(1, 576)
    assert reducer("divprune")(ctx).num_tokens == 56 == round(0.098 * 576)
    assert reducer("divprune", keep_ratio=0.25).output_layout(ctx.layout).num_tokens == 144


# ------------------------------------------------------------------------------------------------- VisPruner


def released_vispruner(x: torch.Tensor, cls_attention: torch.Tensor, tokens: int, ratio: float) -> list[int]:
    """Theia-4869/VisPruner's encode_images on one image: important by CLS attention (descending), then rounds that
    split the rest into even/odd places, score each even one by its best cosine match among the odd ones and drop
    the min(8, R - diverse) best-matched, until `diverse` are left."""
    important_count = int(tokens * ratio)
    diverse = tokens - important_count
    order = cls_attention.argsort(descending=True).tolist()
    important, residual = order[:important_count], order[important_count:]
    unit = x / x.norm(dim=-1, keepdim=True)
    while True:
        r = min(8, len(residual) - diverse)
        if r <= 0:
            break
        a, b = residual[::2], residual[1::2]
        best = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda t: -best[t])
        residual = [a[t] for t in ranked[r:]] + b
    return sorted(important + residual)


def cls_attention_mean_over_heads(ctx: StageContext) -> torch.Tensor:
    q, k = ctx.attention.queries, ctx.attention.keys
    rows = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (B, h, 1, 1+N)
    return rows[:, :, 0, 1:].mean(dim=1)


@pytest.mark.parametrize("n,tokens,ratio", [(576, 64, 0.5), (576, 64, 0.75), (576, 128, 0.5), (40, 9, 0.5), (16, 6, 0)])
def test_vispruner_equals_the_released_loop(n, tokens, ratio):
    ctx = context(2, n, seed=tokens)
    out = reducer("vispruner", tokens=tokens, important_ratio=ratio, score="cls")(ctx)
    attention = cls_attention_mean_over_heads(ctx)
    assert out.tokens.shape == (2, tokens, 32)
    expected = [released_vispruner(ctx.tokens[b], attention[b], tokens, ratio) for b in range(2)]
    assert kept_rows(out, ctx) == expected


def test_vispruner_all_important_keeps_the_top_scores():
    ctx = context(1, 16)
    out = reducer("vispruner", tokens=5, important_ratio=1.0, score="cls")(ctx)
    assert kept_rows(out, ctx)[0] == sorted(cls_attention_mean_over_heads(ctx)[0].topk(5).indices.tolist())


# ------------------------------------------------------------------------------------------------- CDPruner


def released_cdpruner(x: torch.Tensor, text: torch.Tensor, keep: int) -> list[int]:
    """Theia-4869/CDPruner's encode_images on one image: kernel r_i cos(x_i, x_j) r_j with r the min-max normalised
    mean of -cos(x_i, t_m); greedy MAP by the incremental Cholesky update, one pick at a time."""
    unit = x / x.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.t()
    relevance = (-(unit @ (text / text.norm(dim=-1, keepdim=True)).t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    gains = torch.diagonal(kernel).clone()
    factors: list[torch.Tensor] = []
    picks: list[int] = []
    for _ in range(keep):
        j = int(torch.argmax(gains))
        picks.append(j)
        projection = sum((c[j] * c for c in factors), torch.zeros_like(gains))
        e = (kernel[j] - projection) / torch.sqrt(gains[j])
        factors.append(e)
        gains = gains - e**2
        gains[j] = -float("inf")
    return sorted(picks)


@pytest.mark.parametrize("n,width,keep", [(16, 32, 6), (24, 64, 24), (64, 128, 32)])
def test_cdpruner_equals_the_released_loop(n, width, keep):
    """Full-rank kernels (N <= width), where the released update is defined at every step."""
    ctx = context(2, n, width=width, seed=keep, text=5)
    out = reducer("cdpruner", tokens=keep)(ctx)
    assert out.tokens.shape == (2, keep, width)
    expected = [released_cdpruner(ctx.tokens[b], ctx.text_embeds[b], keep) for b in range(2)]
    assert kept_rows(out, ctx) == expected


def test_cdpruner_past_the_kernels_rank_still_keeps_distinct_tokens():
    """576 tokens 16 wide: the kernel has rank 16, yet 144 distinct tokens come out (the released update would divide
    by zero there)."""
    ctx = context(2, 576, width=16, text=3)
    out = reducer("cdpruner", tokens=144)(ctx)
    rows = kept_rows(out, ctx)
    assert all(len(set(row)) == 144 for row in rows) and not torch.isnan(out.tokens).any()


def test_cdpruner_follows_the_prompt():
    """The same image under two prompts keeps different tokens: the relevance term is live."""
    ctx = context(1, 64, width=64, text=4, seed=3)
    other = StageContext(tokens=ctx.tokens, layout=ctx.layout, text_embeds=torch.randn(1, 4, 64))
    cdpruner = reducer("cdpruner", tokens=16)
    assert kept_rows(cdpruner(ctx), ctx) != kept_rows(cdpruner(other), other)


# ------------------------------------------------------------------------------------------------- DART


def released_dart(hidden, keys, start, n, counts, pivot_image, pivot_text) -> list[int]:
    """ZichenWen1/DART's get_retained_image_token on one row: pivots by the L1 norm of the keys (visual ones among the
    image, text ones after it); each pivot in turn adds the `counts[i]` remaining visual tokens least cosine-similar
    to it; the text pivots are dropped at the end. Indices into the visual tokens."""
    image = list(range(start, start + n))
    image_pivots = [image[i] for i in keys[start : start + n].abs().sum(-1).topk(pivot_image).indices.tolist()]
    text_pivots = [start + n + i for i in keys[start + n :].abs().sum(-1).topk(pivot_text).indices.tolist()]
    kept = set(image_pivots + text_pivots)
    valid = set(image) - set(image_pivots)
    for count, item in zip(counts, sorted(image_pivots + text_pivots)):
        candidates = sorted(valid)
        dissimilarity = -F.cosine_similarity(hidden[item][None], hidden[candidates], dim=-1)
        chosen = [candidates[i] for i in dissimilarity.topk(count).indices.tolist()]
        kept.update(chosen)
        valid.difference_update(chosen)
    kept.difference_update(text_pivots)
    return sorted(p - start for p in kept)


def layer_states(batch=2, length=30, start=2, n=20, seed=0) -> LayerStates:
    g = torch.Generator().manual_seed(seed)
    positions = (start + torch.arange(n)).expand(batch, -1)
    return LayerStates(
        torch.randn(batch, length, 24, generator=g), torch.randn(batch, length, 16, generator=g), positions
    )


@pytest.mark.parametrize("keep,counts", [(10, [2, 2, 2, 2]), (9, [2, 2, 2, 1]), (2, [0, 0, 0, 0]), (20, [5, 5, 4, 4])])
def test_dart_equals_the_released_loop(keep, counts):
    """Two visual and two text pivots over 20 visual tokens: the released uniform share (keep=10: 2 per pivot) and
    exact budgets, whose remainder goes to the first pivots."""
    states = layer_states()
    chosen = dart_select(states, keep, pivot_image=2, pivot_text=2, pivot="key_norm")
    assert chosen.shape == (2, keep)
    expected = [released_dart(states.hidden[b], states.keys[b], 2, 20, counts, 2, 2) for b in range(2)]
    assert chosen.tolist() == expected


def test_dart_counts_as_released():
    dart = reducer("dart")
    assert dart.kept(576) == 4 + 8 * (128 // 8) == 132  # max_num_trunction 128 at reduction ratio 0.778
    assert reducer("dart", tokens=64).kept(576) == 64
    with pytest.raises(ConfigError, match="pivot_image"):
        reducer("dart", tokens=3)


def tiny_decoder() -> HFCausalLM:
    torch.manual_seed(0)
    config = HFCausalLMConfig(name="hf-causal-lm", arch="qwen2-tiny", overrides={"num_hidden_layers": 3})
    return HFCausalLM(config).eval()


@pytest.mark.parametrize("layer", [1, 2])
def test_dart_reads_layer_k_minus_1s_normed_output_and_cached_keys(layer):
    """What `select_states` receives equals transformers' own forward: hidden_states[K] through the final norm, and
    the keys its KV cache holds for layer K-1."""
    lm = tiny_decoder()
    embeds = torch.randn(2, 14, 64, generator=torch.Generator().manual_seed(1))
    positions = (1 + torch.arange(8)).expand(2, -1)
    seen = {}

    def select(states):
        seen["states"] = states
        return dart_select(states, 3, pivot_image=1, pivot_text=2, pivot="key_norm")

    with torch.no_grad():
        lm.prefill_pruned(embeds, positions, DecoderPruning(layer=layer, keep=3, select_states=select))
        plain = lm.lm(inputs_embeds=embeds, output_hidden_states=True, use_cache=True)
    states = seen["states"]
    torch.testing.assert_close(states.hidden, lm.lm.model.norm(plain.hidden_states[layer]), rtol=1e-5, atol=1e-5)
    keys = plain.past_key_values.layers[layer - 1].keys.transpose(1, 2).flatten(2)
    torch.testing.assert_close(states.keys, keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(states.visual_positions, positions)


DART = ["encoder.image_size=256", "decoder.overrides.num_hidden_layers=4", "reducer=dart", "reducer.layer=2"]


def test_dart_in_the_pipeline_counts_per_layer_and_keeps_rows_apart():
    record = ablate.measure("tiny", [*DART, "reducer.tokens=6", "reducer.pivot_image=2"], count_only=True).to_dict()
    note = next(note for note in record["notes"] if "drops visual tokens inside the LLM" in note)
    assert "layers 0..1 see 16, layers 2..3 see 6 (11.0 per layer on average" in note
    vlm = ablate.build("tiny", [*DART, "reducer.tokens=6", "reducer.pivot_image=2"])
    pixels, ids = torch.rand(3, 3, 256, 256), vlm.make_prompt(8, batch_size=3)
    with torch.no_grad():
        together = vlm.prefill(pixels, ids)
        alone = torch.cat([vlm.prefill(pixels[i : i + 1], ids[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- budgets

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
SCORE_OF = {"vit (CLS)": "cls", "siglip (no CLS)": "mean_query", "convnext (no attention)": "mean_similarity"}


@pytest.mark.parametrize("encoder", TINY_ENCODERS)
@pytest.mark.parametrize("name", ["divprune", "vispruner", "cdpruner"])
def test_an_exact_budget_on_every_encoder_batched(encoder, name):
    """6 of 16 tokens per row, for a batch of 3 different images, each row as it is alone; VisPruner's auto score
    is the CLS attention where there is a CLS, a substitute elsewhere."""
    torch.manual_seed(0)
    vlm = ablate.build("tiny", [*TINY_ENCODERS[encoder], f"reducer={name}", "reducer.tokens=6"])
    size = vlm.encoder.config.image_size
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = vlm.make_prompt(5, batch_size=3)
    with torch.no_grad():
        together = vlm.run_vision(vlm.start(pixels, ids)).tokens
        alone = torch.cat([vlm.run_vision(vlm.start(pixels[i : i + 1], ids[i : i + 1])).tokens for i in range(3)])
    assert together.shape == (3, 6, vlm.decoder.hidden_size)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    if name == "vispruner":
        assert vlm.reducer.choices()["score"] == SCORE_OF.get(encoder, "mean_query")


@pytest.mark.parametrize(
    "name,options,visual",
    [
        ("divprune", [], 56),
        ("divprune", ["reducer.tokens=144"], 144),
        ("vispruner", ["reducer.tokens=64"], 64),
        ("cdpruner", ["reducer.tokens=256"], 256),
        (
            "dart",
            ["reducer.tokens=144", "reducer.layer=1"],
            576,
        ),  # in the LLM: its input keeps all 576; the note gives the layers
    ],
)
def test_counts_on_llava_15s_encoder(name, options, visual):
    overrides = ["encoder=timm", "encoder.model_name=vit_large_patch14_clip_336", "encoder.feature_block=22"]
    record = ablate.measure("tiny", [*overrides, f"reducer={name}", *options], count_only=True).to_dict()
    assert record["error"] is None and record["tokens"]["encoder"] == 576 and record["visual_tokens"] == visual


# ------------------------------------------------------------------------------------------------- the grid


def test_the_comparison_grid_gives_every_method_the_same_budget():
    """reducer-comparison: 48 cells x 4 encoders, none failing to resolve; at 144 tokens on CLIP ViT-L every method
    hands the LLM 144 visual tokens (the in-LLM ones from layer 2 on, as their note says)."""
    from ablate.grid.expansion import load_grid

    folder = get_registry().preset_folders[0][1] / "grids"
    grid = load_grid(str(folder / "reducer-comparison.yaml"), run_options={"count_only": True})
    assert len(grid.cells) == 192 and not any(cell.error for cell in grid.cells)
    reducers = {cell.values["reducer"] for cell in grid.cells}
    assert {"divprune", "vispruner", "cdpruner", "dart", "random", "avgpool", "none"} <= reducers
    chosen = [
        cell
        for cell in grid.cells
        if cell.values["encoder"] == "clip-vit-l14-336"
        and 144 in (cell.values.get("reducer.tokens"), cell.values.get("encoder.target_tokens"))
    ]
    assert len(chosen) == 12  # downsampling, random, avgpool, matryoshka and the eight scored methods
    for cell in chosen:
        record = ablate.measure(grid.base, list(cell.overrides), count_only=True).to_dict()
        assert record["error"] is None, cell.label
        if cell.values["reducer"] in ("fastv", "dart"):
            assert record["visual_tokens"] == 576, cell.label
            assert any("layers 2..23 see 144" in note for note in record["notes"]), cell.label
        else:
            assert record["visual_tokens"] == 144, cell.label


# ------------------------------------------------------------------------------------------------- accounting


def test_llm_tokens_count_every_reducer_one_way():
    """Per layer, layer average and KV cache: pre-LLM reducers give their output to every layer; in-LLM ones (FastV,
    DART) all tokens up to their layer and their budget after it; the KV cache adds the prompt in every layer."""
    base = ["encoder.image_size=256", "decoder.overrides.num_hidden_layers=4", "prompt_tokens=8"]
    expected = {
        "reducer=divprune reducer.tokens=6": [6, 6, 6, 6],
        "reducer=random reducer.tokens=6": [6, 6, 6, 6],
        "reducer=fastv reducer.layer=1 reducer.tokens=6": [16, 6, 6, 6],
        "reducer=dart reducer.layer=3 reducer.tokens=6 reducer.pivot_image=2": [16, 16, 16, 6],
        "reducer=none": [16, 16, 16, 16],
    }
    for options, per_layer in expected.items():
        record = ablate.measure("tiny", [*base, *options.split()], count_only=True).to_dict()
        assert record["llm_tokens"] == {
            "visual_per_layer": per_layer,
            "visual_layer_average": sum(per_layer) / 4,
            "kv_positions": sum(per_layer) + 8 * 4,
        }, options


def test_the_reducers_view_is_a_papers_table(tmp_path):
    """`ablate results --columns reducers`: method, budget, LLM tokens per layer on average, KV cache, latencies and
    fidelity; columns no row has (accuracy, and latency under --count-only) left out."""
    from conftest import run_cli

    db, grid = str(tmp_path / "r.db"), tmp_path / "g.yaml"
    grid.write_text(
        "base: tiny\ncells:\n  - {reducer: random, reducer.tokens: 2}\n  - {reducer: divprune, reducer.tokens: 2}\n"
        "  - {reducer: dart, reducer.layer: 1, reducer.tokens: 2, reducer.pivot_image: 1}\n"
    )
    assert run_cli("grid", str(grid), "--count-only", "--db", db).returncode == 0
    shown = run_cli("results", "--db", db, "--columns", "reducers", "--json")
    table = json.loads(shown.stdout)
    assert table["columns"] == [
        "reducer",
        "reducer.tokens",
        "encoder",
        "llm_tokens.visual_layer_average",
        "llm_tokens.kv_positions",
    ]
    averages = {row["reducer"]: row["llm_tokens.visual_layer_average"] for row in table["rows"]}
    assert averages == {"random": 2.0, "divprune": 2.0, "dart": 3.0}  # dart: 4 tokens in layer 0, 2 in layer 1


def test_fidelity_vs_ttft_plot_marks_the_front(tmp_path):
    """TTFT against first-token KL, one point per method and budget; the front keeps the runs nothing beats."""
    from ablate.measurement.record import Record
    from ablate.report.plots import write_plots

    def row(reducer: str, tokens: int, ttft: float, kl: float) -> dict:
        record = {**Record().to_dict(), "visual_tokens": tokens, "name": "x"}
        record.update(
            latency_ms={"encoder": 1.0, "reducer": 0.1, "connector": 0.2, "prefill": ttft - 1.3, "ttft": ttft},
            fidelity={"top1_agreement": 1.0, "kl": kl, "rows": 1, "reference": "no reduction"},
            run={"device": "cpu", "dtype": "float32", "mode": "eager"},
            env={"device_name": "Test CPU"},
            config={"encoder": {"name": "e", "image_size": 336}, "reducer": {"name": reducer, "tokens": tokens}},
        )
        return record

    rows = [row("divprune", 64, 10.0, 0.05), row("random", 64, 10.0, 0.08), row("divprune", 144, 14.0, 0.01)]
    files, notes = write_plots(rows, tmp_path)
    assert tmp_path / "fidelity_vs_ttft.png" in files and not [n for n in notes if n.startswith("fidelity")]
    html = (tmp_path / "fidelity_vs_ttft.html").read_text()
    assert "Pareto front" in html and "random" in html and "lower is better" in html
