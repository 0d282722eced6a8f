"""transformers causal LMs as decoders, built from architecture presets (no downloads).

The presets hold the published config values of each LLM; `decoder.overrides` changes any of them
(e.g. `decoder.overrides.num_hidden_layers=4`), and `decoder.weights` loads a local HF model directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ablate.components import Decoder, DecoderConfig
from ablate.errors import ConfigError, did_you_mean
from ablate.hookspecs import hookimpl

_QWEN2 = dict(
    model_type="qwen2",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
)
_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10_000.0, max_position_embeddings=4096)

# Sizes: Qwen2 configs (FastVLM uses 0.5B/1.5B/7B), Vicuna-7B v1.5 = Llama-2-7B shape (LLaVA-1.5).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(_QWEN2, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(_QWEN2, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(_QWEN2, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "vicuna-7b": dict(_LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    # Tiny variants for tests and demos: same code paths, milliseconds per prefill.
    "qwen2-tiny": dict(_QWEN2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
    "llama-tiny": dict(_LLAMA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=128, vocab_size=1024, tie_word_embeddings=False),
}


@dataclass
class HFCausalLMConfig(DecoderConfig):
    arch: str = "qwen2-tiny"  # one of ARCHITECTURES
    overrides: dict[str, Any] = field(default_factory=dict)  # any transformers config attribute
    attn_implementation: str = "sdpa"  # "sdpa" or "eager"


def architecture_config(arch: str, overrides: dict[str, Any] | None = None):
    """The transformers config of a preset architecture, with overrides applied."""
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"Unknown decoder architecture '{arch}' (decoder.arch).{did_you_mean(arch, ARCHITECTURES)} "
            f"Available: {', '.join(ARCHITECTURES)}. Use decoder.overrides.KEY=VALUE to change sizes."
        )
    values = dict(ARCHITECTURES[arch])
    values.update(overrides or {})
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


class HFCausalLM(Decoder):
    """A transformers causal LM prefilled from inputs_embeds; arch: qwen2-0.5b/1.5b/7b, vicuna-7b, *-tiny."""

    name = "hf-causal-lm"
    Config = HFCausalLMConfig

    def __init__(self, config: HFCausalLMConfig):
        super().__init__(config)
        if config.weights:
            # A local HF model directory (config.json + safetensors); never a download.
            self.lm = AutoModelForCausalLM.from_pretrained(
                config.weights, local_files_only=True, attn_implementation=config.attn_implementation,
                dtype=torch.get_default_dtype(),
            )
        else:
            hf_config = architecture_config(config.arch, dict(config.overrides))
            self.lm = AutoModelForCausalLM.from_config(
                hf_config, attn_implementation=config.attn_implementation, dtype=torch.get_default_dtype()
            )
        self.hidden_size = self.lm.config.hidden_size
        self.vocab_size = self.lm.config.vocab_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        # use_cache: a real first token writes the KV cache that generation goes on with, so TTFT includes it.
        # logits_to_keep=1: only the last position's logits, as generate() computes them.
        out = self.lm(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]


@hookimpl
def register_decoders(register):
    register(HFCausalLM)
