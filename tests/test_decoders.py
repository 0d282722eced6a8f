"""hf-causal-lm's named architectures against transformers and the published numbers, and `decoder.config=PATH`.

Every named architecture is counted three ways: by ablate (a VLM built on the meta device, as a record's
params.decoder is), by transformers' own model class built on the meta device from the same config, and against
the parameter count its authors publish. The last check is what catches a wrong table entry: a wrong width, depth,
head count, vocabulary or embedding tying moves the count by more than the tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import ablate
from ablate.api.weights import meta_device
from ablate_plugins.decoders.hf_causal_lm import ARCHITECTURES

# Parameter counts as each model's card (Hugging Face hub) or its paper publishes them: (total, non-embedding);
# None where none is published. The Qwen cards give both; Llama 3.2's card gives 1.23B and 3.21B; SmolLM2's names.
PUBLISHED = {
    "qwen2.5-0.5b": (0.49e9, 0.36e9),
    "qwen2.5-1.5b": (1.54e9, 1.31e9),
    "qwen2.5-3b": (3.09e9, 2.77e9),
    "qwen2.5-7b": (7.61e9, 6.53e9),
    "qwen3-0.6b": (0.6e9, 0.44e9),
    "qwen3-1.7b": (1.7e9, 1.4e9),
    "qwen3-4b": (4.0e9, 3.6e9),
    "qwen3-8b": (8.2e9, 6.95e9),
    "llama-3.2-1b": (1.23e9, None),
    "llama-3.2-3b": (3.21e9, None),
    "smollm2-135m": (135e6, None),
    "smollm2-360m": (360e6, None),
    "smollm2-1.7b": (1.7e9, None),
    "vicuna-7b": (6.74e9, None),  # Llama-2-7B's shape
}
TOLERANCE = 0.02  # the published figures are rounded to two or three digits; 2% holds every one of them
MODEL_CLASS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def transformers_model(name: str) -> torch.nn.Module:
    """transformers' own model class for the architecture's config, on the meta device."""
    architecture = ARCHITECTURES[name]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(architecture.model_type, **architecture.values))


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied LM head is the embedding, counted once


def test_the_issue_names_every_model_it_asks_for():
    wanted = [f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b")] + [
        f"qwen3-{s}" for s in ("0.6b", "1.7b", "4b", "8b")
    ]
    wanted += ["llama-3.2-1b", "llama-3.2-3b", "smollm2-135m", "smollm2-360m", "smollm2-1.7b"]
    assert set(wanted) <= set(ARCHITECTURES) and set(wanted) <= set(PUBLISHED)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_ablate_counts_what_transformers_builds(name):
    vlm = ablate.build("tiny", [f"decoder.arch={name}"], meta=True)
    reference = transformers_model(name)
    assert type(vlm.decoder.lm).__name__ == type(reference).__name__ == MODEL_CLASS[ARCHITECTURES[name].model_type]
    assert vlm.params()["decoder"] == count(reference)
    assert vlm.decoder.hidden_size == ARCHITECTURES[name].values["hidden_size"]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_counts_match_the_published_ones(name):
    model = transformers_model(name)
    total, non_embedding = PUBLISHED[name]
    measured = count(model)
    assert abs(measured / total - 1) < TOLERANCE, f"{name}: {measured:,} params, published {total:,.0f}"
    if non_embedding is not None:
        embeddings = model.get_input_embeddings().weight.numel()
        if not model.config.tie_word_embeddings:
            embeddings += model.get_output_embeddings().weight.numel()
        assert abs((measured - embeddings) / non_embedding - 1) < TOLERANCE, f"{name}: non-embedding"


# The architecture fields of published config.json files, one per family, as the hub has them.
PUBLISHED_CONFIGS = {
    "qwen2.5-3b": {
        "model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu",
        "architectures": ["Qwen2ForCausalLM"], "torch_dtype": "bfloat16", "bos_token_id": 151643,
    },
    "qwen3-0.6b": {
        "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000, "attention_bias": False,
        "tie_word_embeddings": True, "hidden_act": "silu", "architectures": ["Qwen3ForCausalLM"],
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "architectures": ["LlamaForCausalLM"],
    },
    "smollm2-1.7b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05, "rope_theta": 130000, "tie_word_embeddings": True, "hidden_act": "silu",
        "architectures": ["LlamaForCausalLM"],
    },
}  # fmt: skip
# What the two configs must agree on: every value that shapes the model or its positions.
COMPARED = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "hidden_act",
    "attention_bias", "mlp_bias",
)  # fmt: skip


@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_a_published_config_json_is_its_named_architecture(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIGS[name]))
    from_file = ablate.build("tiny", [f"decoder.config={tmp_path}"], meta=True)
    named = ablate.build("tiny", [f"decoder.arch={name}"], meta=True)
    assert from_file.config.decoder.arch == name  # the record names the architecture of that shape
    for key in COMPARED:
        assert getattr(from_file.decoder.lm.config, key, None) == getattr(named.decoder.lm.config, key, None), key
    assert from_file.params()["decoder"] == named.params()["decoder"]


def test_a_fastvlm_preset_runs_with_a_new_name():
    record = ablate.measure("fastvlm-0.5b", ["decoder.arch=qwen3-0.6b", "encoder.image_size=256"], count_only=True)
    assert record.error is None and record.config["decoder"]["arch"] == "qwen3-0.6b"
    assert record.params.decoder == count(transformers_model("qwen3-0.6b"))
    assert record.tokens.connector == 16 and record.flops.prefill > 0


TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1024, "n_positions": 256}


def test_any_causal_lm_from_a_local_config_json(tmp_path):
    """A family no named architecture has (GPT-2: learned positions, fused QKV), run and timed end to end."""
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps(TINY_GPT2))
    record = ablate.measure("tiny", [f"decoder.config={path}"], warmup=0, repeats=1)
    assert record.error is None and record.config["decoder"]["arch"] == "custom"
    assert record.config["decoder"]["config"] == str(path)
    with meta_device():
        reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_GPT2))
    assert type(reference).__name__ == "GPT2LMHeadModel" and record.params.decoder == count(reference)
    assert record.latency_ms.ttft > 0


def test_overrides_apply_to_a_local_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIGS["qwen3-0.6b"]))
    vlm = ablate.build("tiny", [f"decoder.config={tmp_path}", "decoder.overrides.num_hidden_layers=2"], meta=True)
    assert vlm.decoder.num_layers == 2 and vlm.config.decoder.arch == "custom"  # no longer Qwen3-0.6B's shape


def test_ablate_list_decoders_names_every_architecture(capsys):
    from ablate.cli import main

    assert main(["list", "decoders"]) == 0
    out = capsys.readouterr().out
    assert "decoder.arch of hf-causal-lm" in out
    for name, architecture in ARCHITECTURES.items():
        assert name in out and architecture.source in out, name
