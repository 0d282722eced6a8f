"""transformers causal LMs as decoders, built from named architectures or a local config.json (no downloads).

`decoder.arch` names an architecture of ARCHITECTURES: the published config.json values of that LLM, as data, built
by transformers with random weights. `decoder.config` takes any causal LM transformers can build from a local
config.json instead (a VLM's config.json gives its text model). `decoder.overrides` changes any value of either
(e.g. `decoder.overrides.num_hidden_layers=4`), and `decoder.weights` loads a local HF model directory.
`decoder.arch=auto` takes a whole transformers text config as `decoder.overrides` (what a checkpoint's config.json
holds, `model_type` included). With `config` or `auto`, `decoder.arch` in the record names the architecture of the
same shape (`custom` when there is none).
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ablate.api import (
    CheckpointError,
    ConfigError,
    Decoder,
    DecoderConfig,
    DecoderOutput,
    DecoderPruning,
    LayerStates,
    did_you_mean,
    hookimpl,
    load_state_dict_strict,
    positions_of,
    read_tensors,
    take_tokens,
)


@dataclass(frozen=True)
class Architecture:
    """One named LLM: its transformers model type and the config values that make it (the rest: that type's
    transformers defaults, which for these models are what their config.json says too)."""

    source: str  # whose config.json the values are: a Hugging Face model id, or what the shape is for
    model_type: str
    values: dict[str, Any]

    def describe(self) -> str:
        v = self.values
        tied = ", tied embeddings" if v.get("tie_word_embeddings") else ""
        return (
            f"{self.source}: {self.model_type}, {v['num_hidden_layers']} layers x {v['hidden_size']}, "
            f"{v['num_attention_heads']}/{v['num_key_value_heads']} heads, vocab {v['vocab_size']}{tied}"
        )


def _arch(source: str, model_type: str, **values: Any) -> Architecture:
    return Architecture(source, model_type, values)


# Family constants, as every config.json of that family lists them.
_QWEN = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0)
_LLAMA = dict(hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10_000.0, max_position_embeddings=4096)
_LLAMA3_ROPE = dict(  # Llama 3.1/3.2's long-context RoPE
    rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
_SMOLLM2 = dict(hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True)

# One entry per name; adding an LLM is one entry. Values from each model's config.json on the Hugging Face hub.
# (The first of two same-shaped entries names a checkpoint's own config: Qwen2-0.5B and Qwen2.5-0.5B share one.)
# fmt: off
ARCHITECTURES: dict[str, Architecture] = {
    # Qwen2 (FastVLM's LLMs: 0.5B/1.5B/7B)
    "qwen2-0.5b": _arch(
        "Qwen/Qwen2-0.5B", "qwen2", **_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2-1.5b": _arch(
        "Qwen/Qwen2-1.5B", "qwen2", **_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2-7b": _arch(
        "Qwen/Qwen2-7B", "qwen2", **_QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
    # Qwen2.5
    "qwen2.5-0.5b": _arch(
        "Qwen/Qwen2.5-0.5B", "qwen2", **_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": _arch(
        "Qwen/Qwen2.5-1.5B", "qwen2", **_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "qwen2.5-3b": _arch(
        "Qwen/Qwen2.5-3B", "qwen2", **_QWEN, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": _arch(
        "Qwen/Qwen2.5-7B", "qwen2", **_QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    # Qwen3 (dense): no QKV bias, a norm on queries and keys, head_dim 128 whatever the width
    "qwen3-0.6b": _arch(
        "Qwen/Qwen3-0.6B", "qwen3", **_QWEN, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=True,
    ),
    "qwen3-1.7b": _arch(
        "Qwen/Qwen3-1.7B", "qwen3", **_QWEN, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=True,
    ),
    "qwen3-4b": _arch(
        "Qwen/Qwen3-4B", "qwen3", **_QWEN, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=True,
    ),
    "qwen3-8b": _arch(
        "Qwen/Qwen3-8B", "qwen3", **_QWEN, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=False,
    ),
    # Llama 3.2
    "llama-3.2-1b": _arch(
        "meta-llama/Llama-3.2-1B", "llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500_000.0,
        rope_scaling=_LLAMA3_ROPE, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=True,
    ),
    "llama-3.2-3b": _arch(
        "meta-llama/Llama-3.2-3B", "llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500_000.0,
        rope_scaling=_LLAMA3_ROPE, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, tie_word_embeddings=True,
    ),
    # SmolLM2 (Llama architecture)
    "smollm2-135m": _arch(
        "HuggingFaceTB/SmolLM2-135M", "llama", **_SMOLLM2, rope_theta=100_000.0, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
    ),
    "smollm2-360m": _arch(
        "HuggingFaceTB/SmolLM2-360M", "llama", **_SMOLLM2, rope_theta=100_000.0, hidden_size=960,
        intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
    ),
    "smollm2-1.7b": _arch(
        "HuggingFaceTB/SmolLM2-1.7B", "llama", **_SMOLLM2, rope_theta=130_000.0, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=49152,
    ),
    # LLaVA-1.5's Vicuna-7B v1.5: the Llama-2-7B shape
    "vicuna-7b": _arch(
        "lmsys/vicuna-7b-v1.5", "llama", **_LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
    ),
    # MobileLLaMA-1.4B (MobileVLM / MobileVLM-V2 1.7B): the MobileVLM paper's 1.4B shape, a LLaMA with 24 layers of
    # width 2048 and 16 heads; intermediate 5632 and a 2k context as its config.json lists them [unverified here].
    "mobilellama-1.4b": _arch(
        "mtgv/MobileLLaMA-1.4B-Base", "llama", **dict(_LLAMA, rms_norm_eps=1e-6, max_position_embeddings=2048),
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False,
    ),
    # Tiny variants for tests and demos: same code paths, milliseconds per prefill.
    "qwen2-tiny": _arch(
        "tests and demos", "qwen2", **_QWEN, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, vocab_size=1024, max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "qwen3-tiny": _arch(
        "tests and demos", "qwen3", **_QWEN, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=128, vocab_size=1024, max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
    "llama-tiny": _arch(
        "tests and demos", "llama", **_LLAMA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, vocab_size=1024, tie_word_embeddings=False,
    ),
}
# fmt: on


# Config values that count something: they must be positive integers.
SIZES = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
)
# Accepted although a default transformers config does not list them: its constructor folds them into others.
FOLDED_KEYS = {"rope_theta", "rope_scaling"}
AUTO = "auto"  # decoder.arch: the preset of the overrides' model_type and sizes (a checkpoint's own text config)
# transformers config entries that are bookkeeping or generation settings, not architecture: `arch: auto` drops them.
NOT_ARCHITECTURE = {
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "use_cache",
    "auto_map",
    "id2label",
    "label2id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "tokenizer_class",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
}
# Config values that pick a same-sized preset for the record (`decoder.arch: qwen2-0.5b`). Not the vocabulary:
# converted checkpoints pad it (an added image token).
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")


CUSTOM = "custom"  # decoder.arch in the record of a `config` or `auto` decoder that no named architecture matches


@dataclass
class HFCausalLMConfig(DecoderConfig):
    arch: str = "qwen2-tiny"  # one of ARCHITECTURES, or auto (see the module docstring); ignored with weights/config
    overrides: dict[str, Any] = field(default_factory=dict)  # transformers config attributes, checked by name
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    config: str | None = None  # a local config.json (or a folder holding one) of any transformers causal LM


def architecture_config(arch: str, overrides: dict[str, Any] | None = None):
    """The transformers config of a named architecture, with overrides applied (each checked)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"Unknown decoder architecture '{arch}' (decoder.arch).{did_you_mean(arch, ARCHITECTURES)} "
            f"Available: {', '.join(ARCHITECTURES)}. Use decoder.overrides.KEY=VALUE to change sizes, or "
            f"decoder.config=PATH for a local config.json of another causal LM."
        )
    architecture = ARCHITECTURES[arch]
    check_overrides(architecture.model_type, overrides or {}, known=set(architecture.values))
    return _checked_sizes(AutoConfig.for_model(architecture.model_type, **{**architecture.values, **(overrides or {})}))


def same_shape(model_type: str | None, values: Callable[[str], Any]) -> str | None:
    """The first named architecture of this model type whose sizes (SIZE_KEYS) are `values(key)`, if any."""
    for name, architecture in ARCHITECTURES.items():
        if architecture.model_type == model_type and all(architecture.values[k] == values(k) for k in SIZE_KEYS):
            return name
    return None


def local_config(path: str, overrides: dict[str, Any]):
    """The transformers config of a local config.json (decoder.config), with overrides applied (each checked): a
    causal LM's own, or the text model of a multimodal one."""
    file = Path(path).expanduser()
    file = file / "config.json" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(
            f"decoder.config={path}: there is no file {file}. Point it at a transformers config.json of a causal LM "
            f"(or the folder holding one)."
        )
    try:
        hf_config = AutoConfig.from_pretrained(str(file), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"decoder.config={path} is not a config.json transformers can read ({_first_sentence(exc)}). Point it "
            f"at the config.json of a causal LM whose model_type transformers knows, e.g. qwen2, qwen3, llama."
        ) from None
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        text = hf_config.get_text_config()  # a VLM's config.json: its language model
        if type(text) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ConfigError(
                f"decoder.config={path} describes a {hf_config.model_type} model, which transformers cannot build "
                f"as a causal LM (AutoModelForCausalLM). Point it at the config.json of a decoder-only language "
                f"model, e.g. one with model_type qwen2, qwen3 or llama."
            )
        hf_config = text
    check_overrides(hf_config.model_type, overrides)
    for key, value in overrides.items():
        setattr(hf_config, key, value)
    return _checked_sizes(hf_config)


def _first_sentence(exc: Exception) -> str:
    return str(exc).strip().split("\n")[0].split(". ")[0].rstrip(".")


def check_overrides(model_type: str, overrides: dict[str, Any], known: set[str] = frozenset()) -> None:
    """Every override names an attribute of the model type's transformers config, with a value of its type."""
    defaults = AutoConfig.for_model(model_type).to_dict()
    allowed = (set(defaults) | set(known) | FOLDED_KEYS) - {"model_type"}
    for key, value in overrides.items():
        if key == "model_type":
            raise ConfigError(
                f"decoder.overrides.model_type cannot change the model family; pick another decoder.arch "
                f"({', '.join(ARCHITECTURES)})."
            )
        if key not in allowed:
            raise ConfigError(
                f"Unknown config key 'decoder.overrides.{key}' for a {model_type} model.{did_you_mean(key, allowed)} "
                f"Its keys are those of transformers' {model_type} config, e.g. num_hidden_layers, hidden_size."
            )
        if key in SIZES and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"decoder.overrides.{key} must be a positive integer, not {value!r}.")
        if key == "vocab_size" and value < 2:
            raise ConfigError("decoder.overrides.vocab_size must be at least 2 (the image placeholder and text).")
        if key == "hidden_act" and value not in ACT2FN:
            raise ConfigError(
                f"decoder.overrides.hidden_act={value!r} is no activation transformers knows. "
                f"Choose one of: {', '.join(sorted(ACT2FN))}."
            )
        default = defaults.get(key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"decoder.overrides.{key} must be true or false, not {value!r}.")
        if isinstance(default, float) and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ConfigError(f"decoder.overrides.{key} must be a finite number, not {value!r}.")


def _checked_sizes(hf_config):
    heads, kv_heads = hf_config.num_attention_heads, getattr(hf_config, "num_key_value_heads", None)
    if getattr(hf_config, "head_dim", None) is None and hf_config.hidden_size % heads:
        raise ConfigError(
            f"decoder hidden_size {hf_config.hidden_size} is not divisible by num_attention_heads {heads}: change "
            f"decoder.overrides.hidden_size or decoder.overrides.num_attention_heads."
        )
    if kv_heads and heads % kv_heads:
        raise ConfigError(
            f"decoder num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}: change "
            f"decoder.overrides.num_key_value_heads."
        )
    return hf_config


# Model types whose base model feeds inputs_embeds unchanged through its layers, then a final norm, with RoPE and one
# causal mask for every layer: `prefill_pruned` runs their layers itself (tested on each).
PRUNABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class HFCausalLM(Decoder):
    """A transformers causal LM prefilled from inputs_embeds: a named architecture (decoder.arch) or a config.json.

    In-LLM pruning (`prefill_pruned`, for FastV-style reducers) on Llama and Qwen2 models: this decoder runs the
    transformers model's own layers one by one on its own instance, drops visual tokens between two layers, and
    reads the one attention row it needs through an attention function registered with transformers'
    AttentionInterface that wraps the configured kernel (SDPA by default) for that layer only. The default prefill
    (`forward`) does not change.
    """

    name = "hf-causal-lm"
    Config = HFCausalLMConfig
    decodes = True  # `step` goes on from the prefill's transformers cache (a DynamicCache, or a StaticCache)

    @classmethod
    def resolve_config(cls, config: HFCausalLMConfig) -> HFCausalLMConfig:
        """`config: PATH`: the file checked now, and decoder.arch naming the architecture of its shape (or custom).
        `arch: auto`: the architecture values of a whole text config as overrides, and the architecture they match.
        """
        if config.config:
            hf_config = local_config(config.config, dict(config.overrides))
            return replace(config, arch=same_shape(hf_config.model_type, lambda k: getattr(hf_config, k)) or CUSTOM)
        if config.arch != AUTO:
            return config
        overrides = {key: value for key, value in config.overrides.items() if key not in NOT_ARCHITECTURE}
        model_type = overrides.pop("model_type", None)
        family = {name: a for name, a in ARCHITECTURES.items() if a.model_type == model_type}
        if not family:
            known = sorted({a.model_type for a in ARCHITECTURES.values()})
            raise ConfigError(
                f"decoder.arch=auto needs decoder.overrides.model_type of a supported language model, not "
                f"{model_type!r}; supported: {', '.join(known)}. For another causal LM, give its config.json as "
                f"decoder.config=PATH."
            )
        # The architecture only fills values the overrides omit; a same-sized one makes the record read its name.
        arch = same_shape(model_type, overrides.get) or min(family, key=lambda name: family[name].values["hidden_size"])
        return replace(config, arch=arch, overrides=overrides)

    def __init__(self, config: HFCausalLMConfig):
        super().__init__(config)
        if config.config:
            hf_config = local_config(config.config, dict(config.overrides))
        elif config.weights:  # a local transformers model directory: its own architecture (weights load after build)
            hf_config = _directory_config(config.weights)
            check_overrides(hf_config.model_type, dict(config.overrides))
            for key, value in config.overrides.items():
                setattr(hf_config, key, value)
            _checked_sizes(hf_config)
        else:
            hf_config = architecture_config(config.arch, dict(config.overrides))
        self.lm = AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=config.attn_implementation, dtype=torch.get_default_dtype()
        )
        text = self.lm.config
        self.hidden_size = text.hidden_size
        self.vocab_size = text.vocab_size
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self._cache_kwarg = _cache_key(self.lm)

    @classmethod
    def named_values(cls) -> dict[str, dict[str, str]]:
        return {"arch": {name: architecture.describe() for name, architecture in ARCHITECTURES.items()}}

    @property
    def prunes_in_prefill(self) -> bool:  # type: ignore[override]
        layer_types = getattr(self.lm.config, "layer_types", None) or ["full_attention"]
        return self.lm.config.model_type in PRUNABLE_MODEL_TYPES and set(layer_types) == {"full_attention"}

    def load_weights(self, path: str) -> None:
        """A transformers model directory (or weights file) with `model.*` and `lm_head.*` keys, loaded strictly (a
        tied LM head may be stored once, under the embeddings' key)."""
        load_state_dict_strict(self.lm, read_tensors(path), f"decoder '{self.name}' (decoder.weights={path})")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def forward(
        self, inputs_embeds, *, attention_mask=None, labels=None, all_logits=False, cache=None
    ) -> DecoderOutput:
        if labels is not None or all_logits:  # training or scoring: every position, no cache
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
            return DecoderOutput(logits=out.logits, loss=out.loss)
        given = {}
        if cache is not None:  # a static cache: rewound in place (its tensors keep their addresses for the graphs)
            for layer in cache.layers:
                layer.cumulative_length.zero_()
            given = {self._cache_kwarg: cache}
        # use_cache: a real first token writes the KV cache that generation goes on with, so TTFT includes it.
        # logits_to_keep=1: only the last position's logits, as generate() computes them.
        out = self.lm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **given
        )
        return DecoderOutput(logits=out.logits[:, -1], cache=_output_cache(out))

    def static_cache(self, batch, length, dtype, device):
        """transformers' StaticCache (every layer's keys and values allocated at `length` tokens, the fill level a
        tensor on the device), as its docs pair with torch.compile. transformers 4.x's needs cache positions that
        `step` does not pass: None there, and the decode runs eagerly."""
        cache = StaticCache(config=self.lm.config, max_cache_len=length)
        if not all(hasattr(layer, "cumulative_length") for layer in cache.layers):
            return None
        cache.early_initialization(batch, self.num_kv_heads, self.head_dim, dtype, device)
        return cache

    def step(self, input_ids, cache, position) -> DecoderOutput:
        """See `Decoder.step`: transformers' own forward on the cache, as a hand-written generation loop calls it.
        A cache pruned in the prefill (its layers hold different lengths) steps through the layers here instead:
        transformers builds one mask for every layer, from the first layer's length."""
        positions = (
            position
            if isinstance(position, torch.Tensor)
            else torch.full((input_ids.shape[0], 1), position, dtype=torch.long, device=input_ids.device)
        )
        if len(set(_layer_lengths(cache))) > 1:
            hidden = self._run_layers(self.lm.model.layers, self.embed(input_ids), positions, cache, mask=False)
            return DecoderOutput(logits=self.lm.lm_head(self.lm.model.norm(hidden))[:, -1], cache=cache)
        out = self.lm(
            input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache}
        )
        return DecoderOutput(logits=out.logits[:, -1], cache=_output_cache(out))

    def cache_bytes(self, cache) -> int:
        return sum(t.numel() * t.element_size() for layer in _cache_layers(cache) for t in layer)

    def prefill_pruned(self, inputs_embeds, visual_positions, pruning: DecoderPruning, *, attention_mask=None):
        """See `Decoder.prefill_pruned`. The KV cache of layers >= pruning.layer holds only the kept tokens."""
        if not self.prunes_in_prefill:
            raise ConfigError(
                f"decoder '{self.name}' prunes inside its prefill only for {', '.join(PRUNABLE_MODEL_TYPES)} models "
                f"with full attention in every layer, not this {self.lm.config.model_type} model."
            )
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ConfigError(
                "In-LLM pruning takes unpadded prompts: drop the padding (attention_mask) or the reducer."
            )
        model, batch, length = self.lm.model, inputs_embeds.shape[0], inputs_embeds.shape[1]
        layers = model.layers
        hidden, cache = inputs_embeds, DynamicCache()
        positions = torch.arange(length, device=hidden.device).expand(batch, -1)

        def run(chosen_layers, hidden, positions):
            return self._run_layers(chosen_layers, hidden, positions, cache)

        hidden = run(layers[: pruning.layer - 1], hidden, positions)
        if pruning.select_states is not None:  # DART-style: the layer's states, read from its output and its cache
            hidden = run(layers[pruning.layer - 1 : pruning.layer], hidden, positions)
            keys = cache.layers[pruning.layer - 1].keys  # (B, kv_heads, T, head_dim), after RoPE
            states = LayerStates(model.norm(hidden), keys.transpose(1, 2).flatten(2), visual_positions)
            chosen = pruning.select_states(states)
        else:
            with _last_row_attention(layers[pruning.layer - 1].self_attn) as rows:
                hidden = run(layers[pruning.layer - 1 : pruning.layer], hidden, positions)
            row = rows["attention"]
            chosen = pruning.select(row.gather(2, visual_positions[:, None].expand(-1, row.shape[1], -1)))
        hidden, positions = self._keep(hidden, positions, visual_positions, chosen)
        hidden = run(layers[pruning.layer :], hidden, positions)
        logits = self.lm.lm_head(model.norm(hidden[:, -1:]))
        return DecoderOutput(logits=logits[:, -1], cache=cache)

    def _run_layers(self, layers, hidden, positions, cache, mask: bool = True):
        """`hidden` through `layers` as the transformers model hands them over: RoPE of `positions`, the cache, and
        causal attention (`mask=False`: none, for one new token that sees every cached one)."""
        model = self.lm.model
        shared = dict(
            attention_mask=self._causal_mask(hidden) if mask else None,
            position_ids=positions,
            position_embeddings=model.rotary_emb(hidden, positions),
            use_cache=True,
            **{_cache_key(model.layers[0]): cache},
        )
        for layer in layers:
            out = layer(hidden, **shared)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _causal_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.config.attn_implementation == "sdpa":
            return None  # SDPA's own causal mask (is_causal), as transformers uses it for unpadded prompts
        length = hidden.shape[1]
        blocked = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
        return torch.zeros(length, length, dtype=hidden.dtype, device=hidden.device).masked_fill(
            blocked, torch.finfo(hidden.dtype).min
        )[None, None]

    @staticmethod
    def _keep(hidden, positions, visual_positions, chosen):
        """Keep the text and the chosen visual tokens (by index into the visual ones), in their original order."""
        batch, length = positions.shape
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        keep.scatter_(1, visual_positions, False).scatter_(1, visual_positions.gather(1, chosen), True)
        count = length - visual_positions.shape[1] + chosen.shape[1]
        kept = positions.gather(1, positions_of(keep, count))  # each row's kept positions, ascending
        return take_tokens(hidden, kept), kept


# ------------------------------------------------------------------------------ the last position's attention

_PROBE = "ablate_last_row"  # registered once with transformers' AttentionInterface (a new name, nothing replaced)
_PROBES: dict[nn.Module, Callable] = {}  # attention module -> its probe, while one runs


def _dispatch_probe(module, *args, **kwargs):
    return _PROBES[module](module, *args, **kwargs)


class _last_row_attention:
    """While active, `attention` (one transformers attention module) runs its usual kernel and also records the
    softmax attention of the last query over all keys, per head: rows["attention"] (B, heads, T) float32.

    It swaps the module's own config for a copy naming the probe as the attention implementation (the module
    reads `config._attn_implementation` at every call); the probe calls the kernel the model was built with.
    """

    def __init__(self, attention: nn.Module):
        self.attention = attention
        self.rows: dict[str, torch.Tensor] = {}

    def __enter__(self) -> dict[str, torch.Tensor]:
        if _PROBE not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(_PROBE, _dispatch_probe)
        config = self.attention.config
        implementation = config._attn_implementation
        if implementation == "eager":  # eager is each model file's own function, not in the registry
            kernel = sys.modules[type(self.attention).__module__].eager_attention_forward
        else:
            kernel = ALL_ATTENTION_FUNCTIONS[implementation]
        rows = self.rows

        def probe(module, query, key, value, attention_mask, **kwargs):
            out = kernel(module, query, key, value, attention_mask, **kwargs)
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query heads, as repeat_kv
            logits = (query[:, :, -1:].float() @ keys.float().transpose(-1, -2)) * scaling
            if attention_mask is not None:
                mask = attention_mask[..., -1:, : keys.shape[2]]
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            rows["attention"] = torch.softmax(logits, dim=-1)[:, :, 0]
            return out

        self.original = config
        probed = copy.copy(config)
        probed._attn_implementation = _PROBE
        self.attention.config = probed
        _PROBES[self.attention] = probe
        return rows

    def __exit__(self, *exc) -> None:
        self.attention.config = self.original
        _PROBES.pop(self.attention, None)


def _output_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _cache_key(module: nn.Module) -> str:
    """What the module's forward calls the cache: `cache` in transformers 5, `past_key_values` in 4.x."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) of a transformers cache (`layers` in transformers 5, `key_cache` lists in 4.x)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers if getattr(layer, "keys", None) is not None]
    return list(zip(cache.key_cache, cache.value_cache))


def _layer_lengths(cache) -> list[int]:
    return [keys.shape[-2] for keys, _ in _cache_layers(cache)]


def _directory_config(path: str):
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"decoder.weights={path} is not a transformers model directory with a readable config.json ({exc}). "
            f"Point it at a local directory saved with save_pretrained()."
        ) from None


@hookimpl
def register_decoders(register):
    register(HFCausalLM)
