"""transformers causal LMs as decoders, built from architecture presets (no downloads).

The presets hold the published config values of each LLM; `decoder.overrides` changes any of them
(e.g. `decoder.overrides.num_hidden_layers=4`), and `decoder.weights` loads a local HF model directory.
`decoder.arch=auto` takes a whole transformers text config as `decoder.overrides` (what a checkpoint's config.json
holds, `model_type` included) and names the preset of that family and size for the record.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ablate.api import (
    CheckpointError,
    ConfigError,
    Decoder,
    DecoderConfig,
    DecoderOutput,
    DecoderPruning,
    did_you_mean,
    hookimpl,
    load_state_dict_strict,
    positions_of,
    read_tensors,
    take_tokens,
)

_QWEN2 = dict(
    model_type="qwen2",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
)
_LLAMA = dict(
    model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10_000.0, max_position_embeddings=4096
)

# Sizes: Qwen2 configs (FastVLM uses 0.5B/1.5B/7B), Vicuna-7B v1.5 = Llama-2-7B shape (LLaVA-1.5).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(
        _QWEN2,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2-1.5b": dict(
        _QWEN2,
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2-7b": dict(
        _QWEN2,
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "vicuna-7b": dict(
        _LLAMA,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    # MobileLLaMA-1.4B (MobileVLM / MobileVLM-V2 1.7B): the MobileVLM paper's 1.4B shape, a LLaMA with 24 layers of
    # width 2048 and 16 heads; intermediate 5632 and a 2k context as its config.json lists them [unverified here].
    "mobilellama-1.4b": dict(
        _LLAMA,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5632,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # Tiny variants for tests and demos: same code paths, milliseconds per prefill.
    "qwen2-tiny": dict(
        _QWEN2,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
    "llama-tiny": dict(
        _LLAMA,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=1024,
        tie_word_embeddings=False,
    ),
}


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


@dataclass
class HFCausalLMConfig(DecoderConfig):
    arch: str = "qwen2-tiny"  # one of ARCHITECTURES, or auto (see the module docstring); ignored with `weights`
    overrides: dict[str, Any] = field(default_factory=dict)  # transformers config attributes, checked by name
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


def architecture_config(arch: str, overrides: dict[str, Any] | None = None):
    """The transformers config of a preset architecture, with overrides applied (each checked)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"Unknown decoder architecture '{arch}' (decoder.arch).{did_you_mean(arch, ARCHITECTURES)} "
            f"Available: {', '.join(ARCHITECTURES)}. Use decoder.overrides.KEY=VALUE to change sizes."
        )
    values = dict(ARCHITECTURES[arch])
    model_type = values.pop("model_type")
    check_overrides(model_type, overrides or {}, known=set(values))
    values.update(overrides or {})
    return _checked_sizes(AutoConfig.for_model(model_type, **values))


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
# causal mask for every layer: `prefill_pruned` runs their layers itself (tested on both).
PRUNABLE_MODEL_TYPES = ("llama", "qwen2")


class HFCausalLM(Decoder):
    """A transformers causal LM prefilled from inputs_embeds; arch: qwen2-*, vicuna-7b, mobilellama-1.4b, *-tiny.

    In-LLM pruning (`prefill_pruned`, for FastV-style reducers) on Llama and Qwen2 models: this decoder runs the
    transformers model's own layers one by one on its own instance, drops visual tokens between two layers, and
    reads the one attention row it needs through an attention function registered with transformers'
    AttentionInterface that wraps the configured kernel (SDPA by default) for that layer only. The default prefill
    (`forward`) does not change.
    """

    name = "hf-causal-lm"
    Config = HFCausalLMConfig

    @classmethod
    def resolve_config(cls, config: HFCausalLMConfig) -> HFCausalLMConfig:
        """`arch: auto`: the architecture values of a whole text config as overrides, and the preset they match."""
        if config.arch != AUTO:
            return config
        overrides = {key: value for key, value in config.overrides.items() if key not in NOT_ARCHITECTURE}
        model_type = overrides.pop("model_type", None)
        family = {name: values for name, values in ARCHITECTURES.items() if values["model_type"] == model_type}
        if not family:
            known = sorted({values["model_type"] for values in ARCHITECTURES.values()})
            raise ConfigError(
                f"decoder.arch=auto needs decoder.overrides.model_type of a supported language model, not "
                f"{model_type!r}; supported: {', '.join(known)}."
            )
        # The preset only fills values the overrides omit; a same-sized one makes the record read e.g. qwen2-0.5b.
        same_size = [name for name, values in family.items() if all(values[k] == overrides.get(k) for k in SIZE_KEYS)]
        arch = same_size[0] if same_size else min(family, key=lambda name: family[name]["hidden_size"])
        return replace(config, arch=arch, overrides=overrides)

    def __init__(self, config: HFCausalLMConfig):
        super().__init__(config)
        if config.weights:  # a local transformers model directory: its own architecture (weights load after build)
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
        self.hidden_size = self.lm.config.hidden_size
        self.vocab_size = self.lm.config.vocab_size
        self.num_layers = self.lm.config.num_hidden_layers

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

    def forward(self, inputs_embeds, *, attention_mask=None, labels=None, all_logits=False) -> DecoderOutput:
        if labels is not None or all_logits:  # training or scoring: every position, no cache
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
            return DecoderOutput(logits=out.logits, loss=out.loss)
        # use_cache: a real first token writes the KV cache that generation goes on with, so TTFT includes it.
        # logits_to_keep=1: only the last position's logits, as generate() computes them.
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        return DecoderOutput(logits=out.logits[:, -1])

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
        cache_key = "cache" if "cache" in inspect.signature(layers[0].forward).parameters else "past_key_values"
        hidden, cache = inputs_embeds, DynamicCache()
        positions = torch.arange(length, device=hidden.device).expand(batch, -1)

        def run(chosen_layers, hidden, positions):
            shared = dict(  # what the transformers model hands every layer: RoPE of the positions, causal attention
                attention_mask=self._causal_mask(hidden),
                position_ids=positions,
                position_embeddings=model.rotary_emb(hidden, positions),
                use_cache=True,
                **{cache_key: cache},
            )
            for layer in chosen_layers:
                out = layer(hidden, **shared)
                hidden = out[0] if isinstance(out, tuple) else out
            return hidden

        hidden = run(layers[: pruning.layer - 1], hidden, positions)
        with _last_row_attention(layers[pruning.layer - 1].self_attn) as rows:
            hidden = run(layers[pruning.layer - 1 : pruning.layer], hidden, positions)
        attention = rows["attention"].gather(2, visual_positions[:, None].expand(-1, rows["attention"].shape[1], -1))
        hidden, positions = self._keep(hidden, positions, visual_positions, pruning.select(attention))
        hidden = run(layers[pruning.layer :], hidden, positions)
        logits = self.lm.lm_head(model.norm(hidden[:, -1:]))
        return DecoderOutput(logits=logits[:, -1])

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
