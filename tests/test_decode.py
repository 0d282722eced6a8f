"""Beyond the first token: generation with the KV cache (run.max_new_tokens), the cache's size against the bytes of
transformers' own cache tensors, decoding after in-LLM pruning against a recomputation, and the record's decode and
throughput blocks from a real run of the tiny preset."""

from __future__ import annotations

import pytest
import torch
from conftest import run_json

import ablate
from ablate.api.components import DECODER_PRUNING, DecoderPruning
from ablate.api.registry import get_registry
from ablate.config.compose import load_config
from ablate.measurement.decoding import EagerDecoding, StaticDecoding, kv_cache
from ablate.model.build import build
from ablate.train.evaluation import generate as generate_without_cache
from ablate_plugins.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig
from ablate_plugins.reducers.fastv import top_received

TOKENS = 5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vlm(*overrides: str):
    torch.manual_seed(0)
    config = load_config("tiny", list(overrides), get_registry())
    return build(config).eval(), config


def vision_output(vlm, batch: int = 2):
    pixels = torch.randn(batch, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ids = vlm.make_prompt(16, batch)
    return vlm.run_vision(vlm.start(pixels, ids)), pixels, ids


def tensor_bytes(cache) -> int:
    """What transformers' cache tensors hold, read off the cache itself (not through the decoder)."""
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return sum(t.numel() * t.element_size() for pair in layers for t in pair)


@pytest.mark.parametrize(
    "overrides",
    [
        ["reducer.name=none"],
        ["reducer.name=fastv", "reducer.layer=1", "reducer.tokens=1"],
        ["decoder.arch=qwen3-tiny"],  # head_dim 32, not hidden / heads
        ["decoder.arch=llama-tiny", "run.dtype=bfloat16"],  # as many key/value heads as query heads, 2 bytes each
    ],
    ids=["none", "fastv", "qwen3", "llama-bf16"],
)
def test_the_computed_cache_size_is_what_transformers_allocates(overrides):
    vlm, config = tiny_vlm(*overrides)
    with torch.inference_mode():
        ctx, _, ids = vision_output(vlm)
        _, cache = vlm.generate(ctx, TOKENS)
    llm_input = ids.shape[1] - 1 + ctx.tokens.shape[1]
    computed = kv_cache(
        vlm.decoder,
        config.run.dtype_of("decoder"),
        2,
        llm_input,
        ctx.tokens.shape[1],
        ctx.extras.get(DECODER_PRUNING),
        TOKENS,
    )
    assert computed.bytes == tensor_bytes(cache) == vlm.decoder.cache_bytes(cache)
    lengths = {layer.keys.shape[-2] for layer in cache.layers}
    assert max(lengths) == computed.tokens == llm_input + TOKENS - 1
    if computed.pruned_layers:
        assert min(lengths) == computed.pruned_layer_tokens < computed.tokens
        assert computed.bytes < computed.unpruned_bytes


def test_the_run_records_the_cache_it_measured_and_fastv_shrinks_it():
    records = {
        name: ablate.measure("tiny", overrides, max_new_tokens=3, repeats=1, warmup=0, threads=1).kv_cache
        for name, overrides in {
            "none": [],
            "fastv": ["reducer.name=fastv", "reducer.layer=1", "reducer.tokens=1"],
        }.items()
    }
    for cache in records.values():
        assert cache.measured_bytes == cache.bytes
    assert records["fastv"].bytes < records["none"].bytes == records["fastv"].unpruned_bytes
    # one layer of two drops 3 of its 4 visual tokens: 3 tokens x one layer's key and value
    per_layer = records["none"].bytes_per_token // records["none"].layers
    assert records["none"].bytes - records["fastv"].bytes == 3 * per_layer


def test_generation_with_the_cache_picks_the_tokens_a_full_recomputation_picks():
    vlm, _ = tiny_vlm()
    with torch.inference_mode():
        ctx, pixels, ids = vision_output(vlm)
        cached, _ = vlm.generate(ctx, TOKENS)
        recomputed = generate_without_cache(vlm, pixels, ids.tolist(), None, TOKENS)
    assert cached.shape == (2, TOKENS)
    assert cached.tolist() == recomputed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_step_after_fastv_pruning_equals_the_pruned_prefill_of_the_longer_sequence(attn):
    """Decoding on a pruned cache (layers from K on hold the kept tokens only, with their original positions) gives
    the logits of a pruned prefill over the sequence with that token appended, keeping the same visual tokens."""
    torch.manual_seed(0)
    config = HFCausalLMConfig(
        name="hf-causal-lm", arch="qwen2-tiny", overrides={"num_hidden_layers": 3}, attn_implementation=attn
    )
    decoder = HFCausalLM(config).eval()
    embeds = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(2))
    positions = (1 + torch.arange(6)).expand(2, -1)
    chosen = {}

    def select(attention):
        chosen["ids"] = top_received(attention, 2)
        return chosen["ids"]

    with torch.inference_mode():
        first = decoder.prefill_pruned(embeds, positions, DecoderPruning(layer=2, keep=2, select=select))
        token = first.logits.argmax(dim=-1, keepdim=True)
        stepped = decoder.step(token, first.cache, 12).logits
        longer = torch.cat([embeds, decoder.embed(token)], dim=1)
        same = DecoderPruning(layer=2, keep=2, select=lambda _: chosen["ids"])
        expected = decoder.prefill_pruned(longer, positions, same).logits
    assert [layer.keys.shape[-2] for layer in first.cache.layers] == [13, 13, 9]
    torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=1e-5)


def test_the_decode_block_from_a_timed_run():
    record = ablate.measure("tiny", ["batch_size=2"], max_new_tokens=4, repeats=2, warmup=1, threads=1)
    decode, rate, ttft = record.decode, record.throughput, record.latency_ms.ttft
    assert (decode.max_new_tokens, decode.steps, decode.cache, decode.mode) == (4, 3, "DynamicCache", "eager")
    assert decode.per_token_ms.samples == 2 * 3 and decode.end_to_end_ms.samples == 2
    per_token = decode.per_token_ms
    assert 0 < per_token.min <= per_token.median <= per_token.p90
    assert decode.predicted_end_to_end_ms == pytest.approx(ttft + 3 * per_token.median)
    assert rate.output_tokens_per_s == pytest.approx(2 * 4 * 1000 / decode.end_to_end_ms.median)
    assert rate.images_per_s == pytest.approx(2 * 1000 / ttft)
    assert rate.request_latency_ms == decode.end_to_end_ms.median
    # the cache after 4 tokens: the prefill's tokens and the 3 fed back
    assert record.kv_cache.tokens == record.tokens.llm_input + 3
    # a step's FLOPs: each row through every linear layer of the decoder (2 FLOPs per weight), plus a little
    # attention over the cache; its roofline reads the weights once and the cache
    vlm, _ = tiny_vlm()
    linear = sum(m.weight.numel() for m in vlm.decoder.modules() if isinstance(m, torch.nn.Linear))
    assert 2 * 2 * linear <= decode.step_flops < 1.1 * 2 * 2 * linear
    step = record.roofline.stages["decode_step"]
    assert step.measured_ms == per_token.median and step.floor_ms > 0
    assert step.bytes > record.kv_cache.prefill_bytes + 4 * linear  # float32 weights, read once


def test_without_max_new_tokens_nothing_is_decoded_and_the_prefill_cache_is_counted():
    record = ablate.measure("tiny", repeats=1, warmup=0, threads=1)
    assert record.decode is None and record.throughput.output_tokens_per_s is None
    assert record.throughput.request_latency_ms == record.latency_ms.ttft
    assert record.kv_cache.tokens == record.tokens.llm_input and record.kv_cache.measured_bytes is None


def test_count_only_gives_fastvlm_s_cache_from_qwen2_s_published_shape():
    """Qwen2-0.5B: 24 layers, 2 key/value heads of 64 channels: 2 x 24 x 2 x 64 x 2 bytes = 12 KiB per token in
    bfloat16; FastVLM-0.5B at 512 px sends 64 visual tokens, with its 64 prompt tokens 128 in all."""
    record = ablate.measure(
        "fastvlm-0.5b", ["encoder.image_size=512"], count_only=True, max_new_tokens=32, dtype="bfloat16"
    )
    cache = record.kv_cache
    assert (cache.layers, cache.kv_heads, cache.head_dim, cache.bytes_per_token) == (24, 2, 64, 12 * 1024)
    assert cache.tokens == 64 + 64 + 31 and cache.bytes == 12 * 1024 * cache.tokens
    assert record.decode is None  # count-only times nothing


def test_the_cli_prints_the_decode_and_json_holds_it():
    record = run_json("tiny", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0")
    assert record["decode"]["steps"] == 2 and record["run"]["max_new_tokens"] == 3


@pytest.mark.parametrize("arch", ["qwen2-tiny", "qwen3-tiny"])
def test_decoding_into_a_static_cache_picks_the_tokens_the_eager_loop_picks(arch):
    """The static path (what compile and cudagraph modes compile or capture), run eagerly: same greedy tokens as the
    decoder's own growing cache for a batch, logits within float32 rounding, and exactly the computed bytes."""
    vlm, config = tiny_vlm(f"decoder.arch={arch}")
    with torch.inference_mode():
        out, _, ids = vision_output(vlm)
        eager = EagerDecoding(vlm)
        eager.prefill(out)
        expected = [eager.step() for _ in range(TOKENS - 1)]
        prefill = ids.shape[1] - 1 + out.tokens.shape[1]
        cache = vlm.decoder.static_cache(2, prefill + TOKENS - 1, torch.float32, torch.device("cpu"))
        static = StaticDecoding(vlm, out, cache, vlm.image_position(ids), prefill + TOKENS - 1)
        for _ in range(2):  # a second generation rewinds the cache: the same again
            static.prefill(out)
            got = [static.step() for _ in range(TOKENS - 1)]
    assert static.position.tolist() == [[prefill + TOKENS - 1]] * 2
    for step, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(step, reference, atol=1e-5, rtol=1e-5)
        assert torch.equal(step.argmax(-1), reference.argmax(-1))
    computed = kv_cache(vlm.decoder, torch.float32, 2, prefill, out.tokens.shape[1], None, TOKENS)
    assert vlm.decoder.cache_bytes(cache) == tensor_bytes(cache) == computed.bytes


def test_compile_mode_compiles_the_decoding_step_on_a_static_cache():
    record = ablate.measure("tiny", ["batch_size=2"], mode="compile", max_new_tokens=4, repeats=2, warmup=1, threads=1)
    decode, cache = record.decode, record.kv_cache
    assert (decode.mode, decode.cache, decode.static_length) == ("compile", "StaticCache", cache.tokens)
    assert decode.deviation_from_eager < 1e-4 and decode.setup_s > 0
    assert not any("decode" in sentence for sentence in record.execution.fallbacks)
    assert cache.measured_bytes == cache.bytes  # sized for exactly the run's tokens
    assert decode.per_token_ms.samples == 2 * 3 and decode.per_token_ms.median > 0
    # a static step attends over the whole cache: its roofline reads all of it, every step
    step = record.roofline.stages["decode_step"]
    assert step.bytes > cache.bytes and step.measured_ms == decode.per_token_ms.median


def test_compile_mode_decodes_in_llm_pruning_eagerly_and_says_why():
    record = ablate.measure(
        "tiny",
        ["reducer.name=fastv", "reducer.layer=1", "reducer.tokens=1"],
        mode="compile",
        max_new_tokens=2,
        repeats=1,
        warmup=0,
        threads=1,
    )
    assert (record.decode.mode, record.decode.cache) == ("eager", "DynamicCache")
    assert any(
        "the decode ran eagerly, not in compile mode: in-LLM pruning" in sentence
        for sentence in record.execution.fallbacks
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["eager", "cudagraph"])
def test_decode_on_a_gpu(mode):
    """The decode figures on a GPU, timed with CUDA events; in cudagraph mode the prefill into a static cache and
    the step are CUDA graphs, and each timed step is one graph replay."""
    record = ablate.measure("tiny", device="cuda", mode=mode, max_new_tokens=8, repeats=3, warmup=1)
    assert record.execution.timer == "cuda-events" and record.decode.per_token_ms.median > 0
    assert record.kv_cache.measured_bytes == record.kv_cache.bytes
    assert record.roofline.stages["decode_step"].floor_ms > 0
    assert record.decode.mode == mode
    assert not any("decode" in sentence for sentence in record.execution.fallbacks)
    if mode == "cudagraph":
        assert record.decode.cache == "StaticCache" and record.decode.deviation_from_eager < 1e-4
