"""In-LLM pruning (FastV): hf-causal-lm's `prefill_pruned` against transformers' own forward, the attention row it
reads against eager attention, and the FastV reducer through the whole pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ablate
from ablate.api.components import DecoderPruning
from ablate.api.errors import ConfigError
from ablate_plugins.decoders.hf_causal_lm import HFCausalLM, HFCausalLMConfig
from ablate_plugins.reducers.fastv import top_received

LAYERS, VISUAL, START, LENGTH = 4, 12, 1, 20  # visual tokens at positions 1..12 of a 20-token prompt


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def decoder(arch: str = "qwen2-tiny", attn: str = "sdpa") -> HFCausalLM:
    torch.manual_seed(0)
    config = HFCausalLMConfig(
        name="hf-causal-lm", arch=arch, overrides={"num_hidden_layers": LAYERS}, attn_implementation=attn
    )
    return HFCausalLM(config).eval()


def inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = torch.randn(batch, LENGTH, 64, generator=torch.Generator().manual_seed(seed))
    positions = (START + torch.arange(VISUAL)).expand(batch, -1)
    return embeds, positions


class Recorded:
    """A select that records what it was given and what it chose."""

    def __init__(self, keep: int):
        self.keep = keep

    def __call__(self, attention: torch.Tensor) -> torch.Tensor:
        self.attention = attention
        self.chosen = top_received(attention, self.keep)
        return self.chosen


@pytest.mark.parametrize("arch", ["qwen2-tiny", "qwen3-tiny", "llama-tiny"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keeping_every_token_is_the_plain_prefill(arch, attn):
    lm, (embeds, positions) = decoder(arch, attn), inputs()
    with torch.no_grad():
        plain = lm(embeds).logits
        pruned = lm.prefill_pruned(embeds, positions, DecoderPruning(layer=2, keep=VISUAL, select=Recorded(VISUAL)))
    torch.testing.assert_close(pruned.logits, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_the_scores_are_the_last_tokens_eager_attention_in_layer_k_minus_1(layer):
    """What `select` receives equals transformers' eager attention probabilities of layer K-1 (output_attentions),
    last query row, at the visual positions, although the pruned prefill itself runs SDPA."""
    embeds, positions = inputs()
    select = Recorded(4)
    with torch.no_grad():
        decoder().prefill_pruned(embeds, positions, DecoderPruning(layer=layer, keep=4, select=select))
        eager = decoder(attn="eager").lm(inputs_embeds=embeds, output_attentions=True, use_cache=False)
    expected = eager.attentions[layer - 1][:, :, -1, START : START + VISUAL]
    torch.testing.assert_close(select.attention, expected, rtol=1e-4, atol=1e-6)


def truncated(lm: nn.Module, layers: slice, final_norm: bool) -> nn.Module:
    """A copy of a transformers causal LM holding only some of its layers (transformers runs it as usual)."""
    part = copy.deepcopy(lm)
    part.model.layers = part.model.layers[layers]
    part.config.num_hidden_layers = len(part.model.layers)
    if not final_norm:
        part.model.norm = nn.Identity()
    return part


@pytest.mark.parametrize("arch", ["qwen2-tiny", "qwen3-tiny", "llama-tiny"])
def test_pruned_prefill_equals_transformers_run_in_two_parts(arch):
    """Reference: transformers' own forward over layers 0..K-1 on every token, then over layers K.. on the text and
    the chosen visual tokens with their original position ids (RoPE) and a causal mask among them."""
    lm, (embeds, positions), layer = decoder(arch), inputs(), 2
    select = Recorded(5)
    with torch.no_grad():
        pruned = lm.prefill_pruned(embeds, positions, DecoderPruning(layer=layer, keep=5, select=select)).logits
        hidden = truncated(lm.lm, slice(0, layer), final_norm=False).model(inputs_embeds=embeds).last_hidden_state
        rows = []
        for b in range(2):
            visual = set((START + select.chosen[b]).tolist())
            rows.append([p for p in range(LENGTH) if not START <= p < START + VISUAL or p in visual])
        kept = torch.tensor(rows)
        count = kept.shape[1]
        causal = torch.full((count, count), torch.finfo(embeds.dtype).min).triu(1)[None, None].expand(2, 1, -1, -1)
        rest = truncated(lm.lm, slice(layer, LAYERS), final_norm=True)
        subset = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
        reference = rest(inputs_embeds=subset, position_ids=kept, attention_mask=causal, use_cache=False).logits[:, -1]
    assert kept.shape == (2, LENGTH - VISUAL + 5)
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruned, lm(embeds).logits, atol=1e-4)  # pruning changed the answer


def test_rows_choose_their_own_tokens():
    lm = decoder()
    embeds, positions = inputs(batch=3, seed=4)
    plan = DecoderPruning(layer=2, keep=4, select=lambda attention: top_received(attention, 4))
    with torch.no_grad():
        together = lm.prefill_pruned(embeds, positions, plan).logits
        alone = torch.cat([lm.prefill_pruned(embeds[i : i + 1], positions[i : i + 1], plan).logits for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_the_default_prefill_path_is_untouched():
    """No hook, no swapped config and no probe stay behind on the model after a pruned prefill."""
    lm, (embeds, positions) = decoder(), inputs()
    configs = [layer.self_attn.config for layer in lm.lm.model.layers]
    with torch.no_grad():
        before = lm(embeds).logits
        lm.prefill_pruned(embeds, positions, DecoderPruning(layer=2, keep=4, select=Recorded(4)))
        after = lm(embeds).logits
    assert all(layer.self_attn.config is config for layer, config in zip(lm.lm.model.layers, configs))
    assert configs[0]._attn_implementation == "sdpa"
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in lm.modules())
    assert torch.equal(before, after)


# ----------------------------------------------------------------------------------------------- pipeline

FASTV = ["encoder.image_size=256", "decoder.overrides.num_hidden_layers=4", "reducer=fastv", "reducer.layer=2"]


def test_fastv_record_flags_the_unchanged_input_and_counts_the_pruned_prefill():
    full = ablate.measure("tiny", FASTV[:2], count_only=True).to_dict()
    record = ablate.measure(
        "tiny", [*FASTV, "reducer.tokens=4"], repeats=1, warmup=0, threads=1, fidelity=True
    ).to_dict()
    assert record["tokens"] == full["tokens"] == {"encoder": 16, "reducer": 16, "connector": 16, "llm_input": 32}
    assert record["flops"]["prefill"] < full["flops"]["prefill"]
    note = next(note for note in record["notes"] if "leaves the LLM input unchanged" in note)
    assert "layers 0..1 see 16, layers 2..3 see 4 (10.0 per layer on average" in note
    assert 0 <= record["fidelity"]["top1_agreement"] <= 1 and record["fidelity"]["kl"] >= 0


def test_fastv_ratio_as_released():
    vlm = ablate.build("tiny", [*FASTV, "reducer.keep_ratio=0.25"])
    ctx = vlm.run_vision(vlm.start(torch.rand(1, 3, 256, 256), vlm.make_prompt(8)))
    assert ctx.extras["decoder_pruning"].keep == 4 and ctx.num_tokens == 16  # round(16 * 0.25), the tokens untouched


def test_training_through_an_in_llm_reducer_is_refused():
    vlm = ablate.build("tiny", FASTV)
    ids = vlm.make_prompt(8)
    with pytest.raises(ConfigError, match="first token's logits only"):
        vlm(torch.rand(1, 3, 256, 256), ids, labels=ids)
