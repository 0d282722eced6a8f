"""transformers' LLaVA-1.5 (`llava`) and LLaVA-OneVision (`llava_onevision`) checkpoints, as checkpoint formats.

Everything is built from the checkpoint's own config.json, tower included: the CLIP or SigLIP vision config becomes
a timm ViT of those sizes (`model_kwargs`), `vision_feature_layer` / `vision_feature_select_strategy` become the
encoder's feature block and CLS handling, `image_grid_pinpoints` and `vision_aspect_ratio` the AnyRes tiling and
the `llava-anyres` connector, and `text_config` the hf-causal-lm decoder (`arch: auto`). Loading is strict. Sources:
transformers `models/llava` and `models/llava_onevision` (configs, modeling, conversion scripts).

Key layouts read: the names transformers saves, the 4.x hub checkpoints' and the in-memory module names:
    vision_tower.* / vision_tower.vision_model.* / model.vision_tower.*   HF CLIP/SigLIP vision model -> timm ViT
    multi_modal_projector.linear_{1,2}.* (also under model.)              -> connector.layers.{0,2}
    language_model.model.* / model.language_model.*                       -> decoder.lm.model.*
    language_model.lm_head.* / lm_head.*                                  -> decoder.lm.lm_head.*
    image_newline / model.image_newline (OneVision)                       -> connector.image_newline
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ablate.api import CheckpointError, CheckpointFormat, hookimpl, renamed_keys

# HF vision model type -> (ablate encoder, the LayerNorm eps of the timm model it builds)
TOWERS = {"clip_vision_model": ("clip-vit-l14-336", 1e-5), "siglip_vision_model": ("siglip-so400m", 1e-6)}
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
VISION_PREFIXES = (
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.vision_model.",
    "vision_tower.",
)
KEYS = (  # checkpoint prefix -> VLM module path; first match wins
    ("model.multi_modal_projector.linear_1.", "connector.layers.0."),
    ("model.multi_modal_projector.linear_2.", "connector.layers.2."),
    ("multi_modal_projector.linear_1.", "connector.layers.0."),
    ("multi_modal_projector.linear_2.", "connector.layers.2."),
    ("model.language_model.", "decoder.lm.model."),
    ("language_model.model.", "decoder.lm.model."),
    ("language_model.lm_head.", "decoder.lm.lm_head."),
    ("lm_head.", "decoder.lm.lm_head."),
    ("model.image_newline", "connector.image_newline"),
    ("image_newline", "connector.image_newline"),
)
# Added to a mismatch error: a checkpoint's LM head tied or not is the usual difference from the config.
TIED_HINT = (
    "If the difference is the LM head: decoder.overrides.tie_word_embeddings=true ties it to the input embeddings "
    "(a checkpoint that stores it once), decoder.overrides.tie_word_embeddings=false unties it."
)
# HF ViT names (inside one encoder layer, or the model) -> timm VisionTransformer names
LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.*)")
LAYER_PARTS = {
    "self_attn.out_proj.": "attn.proj.",
    "layer_norm1.": "norm1.",
    "layer_norm2.": "norm2.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
MODEL_PARTS = {
    "embeddings.patch_embedding.": "patch_embed.proj.",
    "pre_layrnorm.": "norm_pre.",
    "post_layernorm.": "norm.",
}


class TransformersLlava(CheckpointFormat):
    """transformers' LLaVA (model_type llava, e.g. llava-1.5-7b-hf): CLIP/SigLIP tower, 2-layer projector, LLM."""

    name = "llava-hf"
    module = "encoder.model."  # where the timm ViT sits in the VLM

    def detect(self, directory, hf_config):
        return hf_config.get("model_type") == "llava"

    def config(self, directory, hf_config):
        return {
            "encoder": _tower(hf_config, directory),
            "reducer": {"name": "none"},
            "connector": {"name": "mlp2x_gelu"},
            "decoder": _decoder(hf_config, directory),
            "image_token_id": hf_config.get("image_token_index", hf_config.get("image_token_id")),
        }

    def to_vlm_keys(self, tensors, vlm):
        vision, rest = {}, {}
        for key, value in tensors.items():
            prefix = next((p for p in VISION_PREFIXES if key.startswith(p)), None)
            if prefix is not None:
                vision[key[len(prefix) :]] = value
            else:
                rest[key] = value
        mapped = renamed_keys(rest, KEYS)
        mapped.update({self.module + key: value for key, value in timm_vit_state_dict(vision).items()})
        return mapped, TIED_HINT


class TransformersLlavaOneVision(TransformersLlava):
    """transformers' LLaVA-OneVision (model_type llava_onevision): AnyRes SigLIP tiles, unpad + newline, Qwen2."""

    name = "llava-onevision-hf"
    module = "encoder.tile.model."

    def detect(self, directory, hf_config):
        return hf_config.get("model_type") == "llava_onevision"

    def config(self, directory, hf_config):
        config = super().config(directory, hf_config)
        aspect = str(hf_config.get("vision_aspect_ratio", "anyres_max_9"))
        match = re.fullmatch(r"anyres(?:_max_(\d+))?", aspect)
        if not match:
            raise CheckpointError(
                f"{directory}: vision_aspect_ratio '{aspect}' is not supported (anyres, anyres_max_N)."
            )
        encoder = {"name": "anyres", "tile": config["encoder"]}
        pinpoints = hf_config.get("image_grid_pinpoints")
        if pinpoints:
            encoder["grid_pinpoints"] = [list(p) for p in pinpoints]
        max_tiles = int(match.group(1)) if match.group(1) else None
        return {**config, "encoder": encoder, "connector": {"name": "llava-anyres", "max_tiles": max_tiles}}


# ------------------------------------------------------------------------------------------- config


def _tower(hf_config: dict[str, Any], directory) -> dict[str, Any]:
    """The encoder node of the checkpoint's vision tower: a timm ViT of its sizes, its feature selection."""
    vision = hf_config.get("vision_config")
    if not isinstance(vision, dict):
        raise CheckpointError(f"{directory}/config.json has no vision_config object: the tower cannot be built.")
    kind = vision.get("model_type", "clip_vision_model")
    if kind not in TOWERS:
        raise CheckpointError(f"{directory}: vision tower '{kind}' is not supported; supported: {', '.join(TOWERS)}.")
    name, eps = TOWERS[kind]
    if kind == "siglip_vision_model" and vision.get("vision_use_head", True):
        raise CheckpointError(f"{directory}: a SigLIP tower with its pooling head (vision_use_head) is not supported.")
    act = vision.get("hidden_act", "quick_gelu" if kind == "clip_vision_model" else "gelu_pytorch_tanh")
    if act not in ACTIVATIONS or float(vision.get("layer_norm_eps", eps)) != eps:
        raise CheckpointError(
            f"{directory}: vision hidden_act '{act}' / layer_norm_eps {vision.get('layer_norm_eps')} have no timm "
            f"counterpart here (supported: {', '.join(ACTIVATIONS)}, eps {eps})."
        )
    try:
        hidden, depth = int(vision["hidden_size"]), int(vision["num_hidden_layers"])
        heads, mlp, patch = (
            int(vision["num_attention_heads"]),
            int(vision["intermediate_size"]),
            int(vision["patch_size"]),
        )
        size = int(vision["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}: vision_config lacks a usable size ({exc}).") from None
    layer = hf_config.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or not -depth <= layer <= depth or layer == 0:
        raise CheckpointError(
            f"{directory}: vision_feature_layer {layer!r} is not supported: one hidden-state index of a block's output "
            f"(1..{depth} or -{depth}..-1)."
        )
    kwargs = {
        "embed_dim": hidden,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": _mlp_ratio(mlp, hidden),
        "patch_size": patch,
        "act_layer": ACTIVATIONS[act],
    }
    if kind == "siglip_vision_model":
        kwargs["global_pool"] = ""
    strategy = hf_config.get("vision_feature_select_strategy", "default")
    return {
        "name": name,
        "image_size": size,
        "model_kwargs": kwargs,
        # hidden_states[k] is block k-1's output (hidden_states[0] is the embeddings'); -1 is the last block's.
        "feature_block": depth + layer if layer < 0 else layer - 1,
        "keep_prefix_tokens": strategy == "full",  # 'default' drops CLIP's CLS token
    }


def _mlp_ratio(intermediate: int, hidden: int) -> float:
    """A ratio that timm's int(hidden * ratio) turns back into exactly `intermediate`."""
    ratio = intermediate / hidden
    while int(hidden * ratio) < intermediate:
        ratio = float(torch.nextafter(torch.tensor(ratio, dtype=torch.float64), torch.tensor(2.0 * ratio)).item())
    return ratio


def _decoder(hf_config: dict[str, Any], directory) -> dict[str, Any]:
    if hf_config.get("projector_hidden_act", "gelu") != "gelu" or not hf_config.get("multimodal_projector_bias", True):
        raise CheckpointError(f"{directory}: only LLaVA's projector (Linear, GELU, Linear, biases) is supported.")
    text = hf_config.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{directory}/config.json has no text_config object: the LLM cannot be built from it.")
    text = dict(text)
    text["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    return {"name": "hf-causal-lm", "arch": "auto", "overrides": text}  # the preset of its family and size


# ------------------------------------------------------------------------------------------- keys


def timm_vit_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF CLIP/SigLIP vision model's tensors (keys relative to it) in timm VisionTransformer names.

    q, k and v projections are stacked into timm's fused qkv; unknown keys pass through for the strict load to name.
    """
    out, qkv = {}, {}
    for key, value in tensors.items():
        match = LAYER.fullmatch(key)
        if match:
            index, rest = match.groups()
            parts = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if parts:
                qkv.setdefault((index, parts.group(2)), {})[parts.group(1)] = value
                continue
            for old, new in LAYER_PARTS.items():
                if rest.startswith(old):
                    key = f"blocks.{index}.{new}{rest[len(old) :]}"
                    break
        elif key == "embeddings.class_embedding":
            key, value = "cls_token", value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            key, value = "pos_embed", value.unsqueeze(0)
        else:
            for old, new in MODEL_PARTS.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        out[key] = value
    for (index, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # an incomplete triple: keep the originals so the mismatch is reported by name
            out.update({f"encoder.layers.{index}.self_attn.{p}_proj.{kind}": t for p, t in parts.items()})
    return out


@hookimpl
def register_checkpoint_formats(register):
    register(TransformersLlava)
    register(TransformersLlavaOneVision)
