"""FastVLM's two whole-VLM checkpoint layouts (spec: fastvlm.md sections 3.4-4), as checkpoint formats.

* transformers FastVLM (`fast-vlm-hf`): config.json with `model_type: fast_vlm` (FastVlmForConditionalGeneration),
  safetensors (sharded or not). Keys `model.vision_tower.timm_model.*` (timm FastVit),
  `model.multi_modal_projector.linear_{1,2}.*`, `model.language_model.*`, `lm_head.*`. Input size, mean and std
  come from the saved image processor.
* the original ml-fastvlm LLaVA layout (`ml-fastvlm-llava`): `model_type: llava_qwen2`, Qwen2 fields at the top
  level of config.json, the input size in the tower name (`mm_vision_tower: mobileclip_l_1024`). Keys: the fused
  FastViTHD in its official names under `model.vision_tower.vision_tower.model.` (`head.proj`, the CLIP projection,
  is dropped), `model.mm_projector.{0,2}.*`, and Qwen2's `model.*` and `lm_head.*`.

Both build the same parts: a FastViT-family encoder, the mlp2x_gelu connector and the hf-causal-lm decoder; the key
maps name those plugins' modules (`encoder.model` is the timm FastVit, `connector.layers` the mlp2x_gelu
Sequential, `decoder.lm` the transformers causal LM). Encoder-only weights load through `encoder.weights=PATH`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from ablate.components import CheckpointFormat
from ablate.errors import CheckpointError
from ablate.hookspecs import hookimpl
from ablate_plugins.decoders.hf_causal_lm import ARCHITECTURES
from ablate_plugins.encoders.fastvit import FastViTConfig, convert_mci_state_dict

# timm architecture of transformers' TimmWrapper vision tower -> the ablate encoder that builds it.
VISION_TOWERS = {"fastvit_mci3": "fastvithd", "fastvit_mci2": "fastvit-mci2", "fastvit_mci4": "fastvit-mci4"}
# LLaVA tower name without its size suffix -> ablate encoder ("mobileclip_l_1024" is FastViTHD at 1024 px).
LLAVA_TOWERS = {"mobileclip_l": "fastvithd"}
# timm create_model arguments that only matter for training (dropout, initialization): nothing to build.
TRAINING_ONLY_ARGS = {"drop_rate", "proj_drop_rate", "drop_path_rate", "layer_scale_init_value"}
# transformers config entries that are bookkeeping or generation settings, not architecture.
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
# LLaVA's own config entries beside the Qwen2 ones (training switches, tower and projector choice, tokenizer).
LLAVA_ONLY_KEYS = re.compile(r"^(mm_|image_|tokenizer_|tune_|freeze_|unfreeze_|use_mm_|vision_tower|s2)")
# Decoder config values that pick a same-sized preset for the record (`decoder.arch: qwen2-0.5b`). Not the vocabulary:
# converted checkpoints pad it (an added image token).
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")

LLAVA_VISION_PREFIX = "model.vision_tower.vision_tower.model."
# Checkpoint key prefix -> module path in the VLM; first match wins.
TRANSFORMERS_KEYS = (
    ("model.vision_tower.timm_model.", "encoder.model."),
    ("model.multi_modal_projector.linear_1.", "connector.layers.0."),
    ("model.multi_modal_projector.linear_2.", "connector.layers.2."),
    ("model.language_model.", "decoder.lm.model."),
    ("lm_head.", "decoder.lm.lm_head."),
)
LLAVA_KEYS = (
    ("model.mm_projector.", "connector.layers."),  # indices 0 and 2 on both sides (1 is the GELU)
    ("model.", "decoder.lm.model."),
    ("lm_head.", "decoder.lm.lm_head."),
)
LM_HEAD, EMBEDDINGS = "decoder.lm.lm_head.weight", "decoder.lm.model.embed_tokens.weight"


class TransformersFastVLM(CheckpointFormat):
    """transformers' FastVLM (model_type fast_vlm): TimmWrapper FastViT, linear_1/linear_2 projector, Qwen2."""

    name = "fast-vlm-hf"

    def detect(self, directory, hf_config):
        return hf_config.get("model_type") == "fast_vlm"

    def config(self, directory, hf_config):
        vision = hf_config.get("vision_config") or {}
        if not isinstance(vision, dict) or not isinstance(vision.get("model_args") or {}, dict):
            raise CheckpointError(f"{directory}/config.json: vision_config (and its model_args) must be objects.")
        architecture = vision.get("architecture", "fastvit_mci3")  # FastVlmConfig's default tower
        if architecture not in VISION_TOWERS:
            raise CheckpointError(
                f"{directory}: vision tower '{architecture}' is not supported; supported: {', '.join(VISION_TOWERS)}."
            )
        name = VISION_TOWERS[architecture]
        # timm builds the multi-branch train form unless model_args say inference_mode (FastVLM's always do).
        encoder = {"name": name, "inference_mode": False, **_image_processor(directory)}
        encoder.update(_encoder_options(name, vision.get("model_args") or {}, directory))
        if hf_config.get("projector_hidden_act", "gelu") != "gelu" or not hf_config.get(
            "multimodal_projector_bias", True
        ):
            raise CheckpointError(f"{directory}: only FastVLM's projector (Linear, GELU, Linear, biases) is supported.")
        if not isinstance(hf_config.get("text_config"), dict):
            raise CheckpointError(f"{directory}/config.json has no text_config: the LLM cannot be built from it.")
        text = dict(hf_config["text_config"])
        # FastVlmConfig ties the LM head when either level says so (its __post_init__); mirror that.
        text["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        image_token_id = hf_config.get("image_token_id", hf_config.get("image_token_index", 151646))
        return _vlm_config(encoder, text, image_token_id)

    def to_vlm_keys(self, tensors, vlm):
        mapped = {_renamed(key, TRANSFORMERS_KEYS): value for key, value in tensors.items()}
        return mapped, _complete_tied_head(vlm, mapped)


class MlFastVLMLlava(CheckpointFormat):
    """ml-fastvlm's LLaVA release (model_type llava_qwen2): official FastViTHD names, mm_projector, Qwen2."""

    name = "ml-fastvlm-llava"

    def detect(self, directory, hf_config):
        return hf_config.get("model_type") == "llava_qwen2"

    def config(self, directory, hf_config):
        tower = str(hf_config.get("mm_vision_tower", ""))
        # The official tower wrapper reads the input size from the name's suffix ("mobileclip_l_1024"); so do we.
        prefix, _, size = tower.rpartition("_")
        if prefix not in LLAVA_TOWERS or not size.isdigit():
            raise CheckpointError(
                f"{directory}: LLaVA vision tower '{tower}' is not supported; supported: "
                f"{', '.join(f'{p}_<size>' for p in LLAVA_TOWERS)} (FastViTHD). Change the encoder with an override, "
                f"e.g. encoder=fastvit-tiny, for towers of other sizes."
            )
        projector = hf_config.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise CheckpointError(f"{directory}: projector '{projector}' is not supported; FastVLM's is mlp2x_gelu.")
        encoder = {"name": LLAVA_TOWERS[prefix], **_image_processor(directory), "image_size": int(size)}
        text = {key: value for key, value in hf_config.items() if not LLAVA_ONLY_KEYS.match(key)}
        text["model_type"] = "qwen2"  # LlavaQwen2 is Qwen2 plus the LLaVA entries dropped above
        # LLaVA splices the image at the sentinel id -200, which is no vocabulary row. None = ablate's default, the
        # last id: a padding row of Qwen2's vocabulary that the tokenizer never produces (its embedding is cut out).
        return _vlm_config(encoder, text, None)

    def to_vlm_keys(self, tensors, vlm):
        tensors = dict(tensors)
        vision = {
            key[len(LLAVA_VISION_PREFIX) :]: tensors.pop(key)
            for key in [k for k in tensors if k.startswith(LLAVA_VISION_PREFIX)]
        }
        mapped = {f"encoder.model.{key}": value for key, value in convert_mci_state_dict(vision).items()}  # no head
        mapped.update({_renamed(key, LLAVA_KEYS): value for key, value in tensors.items()})
        return mapped, _complete_tied_head(vlm, mapped)


# ------------------------------------------------------------------------------- config -> ablate config


def _vlm_config(encoder: dict, text: dict, image_token_id: int | None) -> dict[str, Any]:
    return {
        "encoder": encoder,
        "reducer": {"name": "none"},
        "connector": {"name": "mlp2x_gelu"},
        "decoder": _decoder_node(text),
        "image_token_id": image_token_id,
    }


def _image_processor(directory: Path) -> dict[str, Any]:
    """Encoder input size, mean and std from the saved image processor (transformers v4 or v5 file), if any."""
    for file in ("preprocessor_config.json", "processor_config.json"):
        path = directory / file
        if not path.is_file():
            continue
        try:
            processor = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); restore or delete it.") from None
        if not isinstance(processor, dict):
            raise CheckpointError(f"{path} holds a JSON {type(processor).__name__}, not an object; restore it.")
        processor = processor.get("image_processor", processor)  # v5 nests it in processor_config.json
        options = {
            key: processor[source]
            for key, source in (("mean", "image_mean"), ("std", "image_std"))
            if isinstance(processor.get(source), list)
        }
        for key in ("crop_size", "size"):  # CLIPImageProcessor: resize, then center-crop to crop_size
            value = processor.get(key)
            if isinstance(value, dict):
                value = value.get("height", value.get("shortest_edge"))
            if isinstance(value, int):
                options["image_size"] = value
                break
        return options
    return {}  # the encoder's defaults (FastViTHD: 1024 px, mean 0, std 1, as FastVLM)


def _encoder_options(name: str, model_args: dict[str, Any], directory: Path) -> dict[str, Any]:
    """timm's create_model arguments (transformers' vision_config.model_args) as the encoder's config options."""
    options = {f.name for f in dataclasses.fields(FastViTConfig)}  # every FastViT-family preset shares these
    args = {key: value for key, value in model_args.items() if key not in TRAINING_ONLY_ARGS}
    unknown = sorted(set(args) - options)
    if unknown:
        raise CheckpointError(
            f"{directory}: vision_config.model_args {unknown} have no counterpart in encoder '{name}' "
            f"(its options: {', '.join(sorted(options - {'name', 'weights'}))})."
        )
    return args


def _decoder_node(text: dict[str, Any]) -> dict[str, Any]:
    """hf-causal-lm with every architecture value of the checkpoint's text config as an override."""
    model_type = text.get("model_type")
    family = {name: values for name, values in ARCHITECTURES.items() if values["model_type"] == model_type}
    if not family:
        known = sorted({values["model_type"] for values in ARCHITECTURES.values()})
        raise CheckpointError(f"Language model type '{model_type}' is not supported; supported: {', '.join(known)}.")
    overrides = {key: value for key, value in text.items() if key not in NOT_ARCHITECTURE and key != "model_type"}
    # The preset only fills values the checkpoint omits; a same-sized one makes the record read e.g. qwen2-0.5b.
    same_size = [name for name, values in family.items() if all(values[k] == overrides.get(k) for k in SIZE_KEYS)]
    arch = same_size[0] if same_size else min(family, key=lambda name: family[name]["hidden_size"])
    return {"name": "hf-causal-lm", "arch": arch, "overrides": overrides}


# ------------------------------------------------------------------------------------------ key maps


def _renamed(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old) :]
    return key  # not part of a FastVLM: the strict load reports it as unexpected


def _complete_tied_head(vlm, tensors: dict[str, torch.Tensor]) -> str:
    """Give a tied LM head its tensor; return a hint for the error message when tying looks like the problem."""
    lm = getattr(vlm.decoder, "lm", None)
    if lm is None:
        raise CheckpointError(
            f"This checkpoint holds a FastVLM (transformers LLM), but the config builds decoder '{vlm.decoder.name}'. "
            f"Keep decoder=hf-causal-lm to load these weights."
        )
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    head, embeddings = tensors.get(LM_HEAD), tensors.get(EMBEDDINGS)
    if embeddings is None:
        return ""
    if tied and head is None:
        tensors[LM_HEAD] = embeddings  # a tied checkpoint stores the matrix once, under the embeddings' name
    elif tied and head.shape == embeddings.shape and not torch.equal(head, embeddings):
        raise CheckpointError(
            "The checkpoint's lm_head.weight differs from its embed_tokens.weight, but the config ties them (one "
            "would silently overwrite the other). Set decoder.overrides.tie_word_embeddings=false."
        )
    elif not tied and head is None:
        return (
            "The checkpoint stores no lm_head.weight: if its LM head is tied to the embeddings, set "
            "decoder.overrides.tie_word_embeddings=true."
        )
    return ""


@hookimpl
def register_checkpoint_formats(register):
    register(TransformersFastVLM)
    register(MlFastVLMLlava)
