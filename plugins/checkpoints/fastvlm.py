"""FastVLM's two whole-VLM checkpoint layouts, as checkpoint formats.

* transformers FastVLM (`fast-vlm-hf`): config.json with `model_type: fast_vlm` (FastVlmForConditionalGeneration),
  safetensors (sharded or not). Keys `model.vision_tower.timm_model.*` (timm FastVit),
  `model.multi_modal_projector.linear_{1,2}.*`, `model.language_model.*`, `lm_head.*`. Input size, mean and std
  come from the saved image processor.
* the original ml-fastvlm LLaVA layout (`ml-fastvlm-llava`): `model_type: llava_qwen2`, Qwen2 fields at the top
  level of config.json, the input size in the tower name (`mm_vision_tower: mobileclip_l_1024`). Keys: the fused
  FastViTHD in its official names under `model.vision_tower.vision_tower.model.` (`head.proj`, the CLIP projection,
  is dropped), `model.mm_projector.{0,2}.*`, and Qwen2's `model.*` and `lm_head.*`.

Both build the same parts: a FastViT-family encoder, the mlp2x_gelu connector and the hf-causal-lm decoder; the key
maps name those components' modules (`encoder.model` is the timm FastVit, `connector.layers` the mlp2x_gelu
Sequential, `decoder.lm` the transformers causal LM), and the encoder converts the official tower names itself
(`convert_weights`). Encoder-only weights load through `encoder.weights=PATH`. Sources: transformers
`models/fast_vlm` (FastVlmConfig, the conversion script), apple/ml-fastvlm `llava/model/language_model/llava_qwen.py`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from ablate.api import CheckpointError, CheckpointFormat, component_class, hookimpl, renamed_keys

# timm architecture of transformers' TimmWrapper vision tower -> the ablate encoder that builds it.
VISION_TOWERS = {"fastvit_mci3": "fastvithd", "fastvit_mci2": "fastvit-mci2", "fastvit_mci4": "fastvit-mci4"}
# LLaVA tower name without its size suffix -> ablate encoder ("mobileclip_l_1024" is FastViTHD at 1024 px).
LLAVA_TOWERS = {"mobileclip_l": "fastvithd"}
# timm create_model arguments that only matter for training (dropout, initialization): nothing to build.
TRAINING_ONLY_ARGS = {"drop_rate", "proj_drop_rate", "drop_path_rate", "layer_scale_init_value"}
# LLaVA's own config entries beside the Qwen2 ones (training switches, tower and projector choice, tokenizer).
LLAVA_ONLY_KEYS = re.compile(r"^(mm_|image_|tokenizer_|tune_|freeze_|unfreeze_|use_mm_|vision_tower|s2)")
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
# Added to a mismatch error: a checkpoint's LM head tied or not is the usual difference from the config.
TIED_HINT = (
    "If the difference is the LM head: decoder.overrides.tie_word_embeddings=true ties it to the input embeddings "
    "(a checkpoint that stores it once), decoder.overrides.tie_word_embeddings=false unties it."
)


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
        return renamed_keys(tensors, TRANSFORMERS_KEYS), TIED_HINT


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
        # The official FastViTHD names: the encoder maps them onto its own keys (dropping the CLIP head).
        mapped = {f"encoder.{key}": value for key, value in vlm.encoder.convert_weights(vision).items()}
        mapped.update(renamed_keys(tensors, LLAVA_KEYS))
        return mapped, TIED_HINT


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
    options = {f.name for f in dataclasses.fields(component_class("encoder", name).Config)}
    args = {key: value for key, value in model_args.items() if key not in TRAINING_ONLY_ARGS}
    unknown = sorted(set(args) - options)
    if unknown:
        raise CheckpointError(
            f"{directory}: vision_config.model_args {unknown} have no counterpart in encoder '{name}' "
            f"(its options: {', '.join(sorted(options - {'name', 'weights'}))})."
        )
    return args


def _decoder_node(text: dict[str, Any]) -> dict[str, Any]:
    """hf-causal-lm built from the checkpoint's text config as it is (`arch: auto` picks the matching preset)."""
    return {"name": "hf-causal-lm", "arch": "auto", "overrides": text}


@hookimpl
def register_checkpoint_formats(register):
    register(TransformersFastVLM)
    register(MlFastVLMLlava)
