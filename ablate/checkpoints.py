"""Real FastVLM weights, offline: read a checkpoint directory, build what its config describes, load strictly.

Two whole-VLM layouts are understood (spec: fastvlm.md sections 3.4-4):
  * transformers FastVLM (`model_type: fast_vlm`, FastVlmForConditionalGeneration, safetensors);
  * the original ml-fastvlm LLaVA layout (`model_type: llava_qwen2`; fused vision keys under
    `model.vision_tower.vision_tower.model.`, `model.mm_projector.{0,2}`, Qwen2 keys).
Encoder-only timm/MobileCLIP weights go through the encoder's own `encoder.weights=PATH` option instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ablate.errors import CheckpointError
from ablate.weights import load_state_dict_strict, read_tensors

# timm architecture (transformers' TimmWrapper) -> the ablate encoder that builds it
TIMM_ENCODERS = {"fastvit_mci3": "fastvithd", "fastvit_mci2": "fastvit-mci2", "fastvit_mci4": "fastvit-mci4"}
# LLaVA tower name prefix -> ablate encoder ("mobileclip_l_1024": FastViTHD at 1024 px)
LLAVA_TOWERS = {"mobileclip_l": "fastvithd"}
TINY_DECODER = {"qwen2": "qwen2-tiny", "llama": "llama-tiny"}  # base presets; the checkpoint's values override all
# transformers bookkeeping that is not architecture
NOT_ARCHITECTURE = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache",
                    "auto_map", "id2label", "label2id"}
LLAVA_ONLY_KEYS = re.compile(r"^(mm_|image_|tokenizer_|tune_|freeze_|unfreeze_|use_mm_|vision_tower|s2)")


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not directory.is_dir() or not path.is_file():
        raise CheckpointError(
            f"{directory} is not a checkpoint directory (no config.json). ablate.from_checkpoint reads a "
            f"transformers FastVLM or an ml-fastvlm LLaVA directory; for encoder-only weights use "
            f"encoder.weights=PATH."
        )
    return json.loads(path.read_text())


def checkpoint_format(config: dict[str, Any], directory: Path) -> str:
    model_type = config.get("model_type")
    if model_type == "fast_vlm":
        return "transformers"
    if model_type == "llava_qwen2" or "mm_vision_tower" in config:
        return "llava"
    raise CheckpointError(
        f"Unknown checkpoint format in {directory}: model_type '{model_type}'. Supported: transformers FastVLM "
        f"(fast_vlm) and ml-fastvlm LLaVA (llava_qwen2); for encoder-only weights use encoder.weights=PATH."
    )


def _decoder_node(text_config: dict[str, Any]) -> dict[str, Any]:
    model_type = text_config.get("model_type", "qwen2")
    if model_type not in TINY_DECODER:
        raise CheckpointError(f"Unsupported language model type '{model_type}'; supported: {list(TINY_DECODER)}.")
    overrides = {k: v for k, v in text_config.items() if k not in NOT_ARCHITECTURE and k != "model_type"}
    return {"name": "hf-causal-lm", "arch": TINY_DECODER[model_type], "overrides": overrides}


def _image_size(directory: Path, default: int) -> int:
    path = directory / "preprocessor_config.json"
    if path.is_file():
        processor = json.loads(path.read_text())
        for key in ("crop_size", "size"):
            value = processor.get(key)
            if isinstance(value, dict):
                value = value.get("height") or value.get("shortest_edge")
            if isinstance(value, int):
                return value
    return default


def ablate_config(directory: Path) -> dict[str, Any]:
    """The ablate config (a plain dict) of the architecture a checkpoint directory describes."""
    config = read_config(directory)
    if checkpoint_format(config, directory) == "transformers":
        vision = config.get("vision_config") or {}
        architecture = vision.get("architecture", "fastvit_mci3")
        if architecture not in TIMM_ENCODERS:
            raise CheckpointError(f"Unsupported vision tower '{architecture}'; supported: {list(TIMM_ENCODERS)}.")
        encoder = {"name": TIMM_ENCODERS[architecture], "image_size": _image_size(directory, 1024)}
        encoder.update(vision.get("model_args") or {})  # e.g. inference_mode, layers, embed_dims
        image_token_id = config.get("image_token_id", config.get("image_token_index"))
        text = config.get("text_config") or {}
        if config.get("projector_hidden_act", "gelu") != "gelu" or not config.get("multimodal_projector_bias", True):
            raise CheckpointError("Only FastVLM's mlp2x_gelu projector (GELU, with biases) is supported.")
    else:
        tower = config.get("mm_vision_tower", "")
        prefix, _, size = tower.rpartition("_")
        if prefix not in LLAVA_TOWERS or not size.isdigit():
            raise CheckpointError(f"Unsupported LLaVA vision tower '{tower}'; supported: mobileclip_l_<size>.")
        if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise CheckpointError(f"Unsupported projector '{config.get('mm_projector_type')}'; expected mlp2x_gelu.")
        encoder = {"name": LLAVA_TOWERS[prefix], "image_size": int(size)}
        image_token_id = None  # LLaVA splices at the sentinel -200, not a vocabulary id: use ablate's default
        text = {k: v for k, v in config.items() if not LLAVA_ONLY_KEYS.match(k)}
        text["model_type"] = "qwen2"
    return {
        "name": directory.name,
        "encoder": encoder,
        "reducer": {"name": "none"},
        "connector": {"name": "mlp2x_gelu"},
        "decoder": _decoder_node(text),
        "image_token_id": image_token_id,
        "weights": str(directory),
    }


# ------------------------------------------------------------------------------------------- key maps


def _transformers_key(key: str) -> str:
    for old, new in (
        ("model.vision_tower.timm_model.", "encoder.model."),
        ("model.multi_modal_projector.linear_1.", "connector.layers.0."),
        ("model.multi_modal_projector.linear_2.", "connector.layers.2."),
        ("model.language_model.", "decoder.lm.model."),
        ("lm_head.", "decoder.lm.lm_head."),
    ):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _llava_tensors(tensors: dict[str, torch.Tensor], vlm) -> dict[str, torch.Tensor]:
    from ablate_plugins.encoders.fastvit import convert_mci_state_dict  # the official -> timm key map

    vision_prefix = "model.vision_tower.vision_tower.model."
    vision = {k[len(vision_prefix):]: v for k, v in tensors.items() if k.startswith(vision_prefix)}
    vision = {k: v for k, v in vision.items() if not k.startswith("head.")}  # the CLIP projection, unused
    out = {f"encoder.model.{k}": v for k, v in convert_mci_state_dict(vision, vlm.encoder.config).items()}
    for key, value in tensors.items():
        if key.startswith(vision_prefix):
            continue
        if key.startswith("model.mm_projector."):
            out["connector.layers." + key[len("model.mm_projector."):]] = value
        elif key.startswith("model."):
            out["decoder.lm.model." + key[len("model."):]] = value
        elif key.startswith("lm_head."):
            out["decoder.lm." + key] = value
        else:
            out[key] = value  # unexpected: reported by the strict load
    return out


def load_vlm_weights(vlm, path: str | Path) -> None:
    """Load a whole-VLM checkpoint directory onto a built VLM, strictly (every tensor, every shape)."""
    directory = Path(path)
    fmt = checkpoint_format(read_config(directory), directory)
    tensors = read_tensors(directory)
    if fmt == "transformers":
        mapped = {_transformers_key(k): v for k, v in tensors.items()}
    else:
        mapped = _llava_tensors(tensors, vlm)
    head, embed = "decoder.lm.lm_head.weight", "decoder.lm.model.embed_tokens.weight"
    if head not in mapped and embed in mapped and vlm.decoder.lm.config.tie_word_embeddings:
        mapped[head] = mapped[embed]  # tied: saved once, under the embedding's name
    load_state_dict_strict(vlm, mapped, what=f"checkpoint {directory}")


def from_checkpoint(path: str | Path, overrides: Iterable[str] = (), **build_options):
    """Build the VLM a checkpoint directory describes and load all its weights.

    `overrides` apply on top of the checkpoint's own config, e.g. ["encoder.image_size=512"] to run the
    released weights at another resolution.
    """
    from ablate.model import build

    directory = Path(path)
    return build(ablate_config(directory), overrides, **build_options)
