"""Any timm model as a vision encoder, with feature selection.

`encoder=timm encoder.model_name=vit_large_patch14_clip_336.openai encoder.feature_block=22` is LLaVA-1.5's
tower: the output of block 22 (the penultimate of 24), before the final norm, CLS dropped. A pretrained tag
in the name (".openai") picks that tag's preprocessing (mean/std) without downloading anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import timm
import torch

from ablate.components import ATTENTION, CLS, EncoderConfig, EncoderOutput, Preprocessing, VisionEncoder, check_multiple
from ablate.errors import ConfigError, ImageSizeError
from ablate.hookspecs import hookimpl


@dataclass
class TimmEncoderConfig(EncoderConfig):
    model_name: str = "vit_tiny_patch16_224"
    image_size: int | None = None  # None: the model's own input size (336 for vit_large_patch14_clip_336)
    feature_block: int | None = None  # None: final features (forward_features); k: output of block/stage k
    keep_prefix_tokens: bool = False  # keep CLS/register tokens in the visual tokens
    # Block whose attention queries/keys a reducer may ask for; None: the block after the selected features
    # (LLaVA-PruMerge reads block 23's q/k on block 22's output).
    attention_block: int | None = None
    resize: Literal["pad", "squash", "center_crop"] = "pad"
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments


class TimmEncoder(VisionEncoder):
    """Any timm model by name (ViT, SigLIP, ConvNeXt, FastViT...), final or intermediate features."""

    name = "timm"
    Config = TimmEncoderConfig

    def __init__(self, config: TimmEncoderConfig):
        super().__init__(config)
        if config.image_size is None:  # resolved here, so the recorded config says which size ran
            config.image_size = _native_size(config.model_name)
        self.model = _create(config)
        self.stride = _stride(self.model)
        self.num_prefix = getattr(self.model, "num_prefix_tokens", 0)
        self._has_cls = bool(getattr(self.model, "cls_token", None) is not None)
        blocks = getattr(self.model, "blocks", None)
        self._attention_ok = self._has_cls and blocks is not None and hasattr(blocks[0], "attn")
        self.width = self.model.num_features
        if config.feature_block is not None and _feature_info(self.model):
            # An intermediate stage of a conv net is narrower than the last one (ViT blocks all have one width).
            chosen = _feature_info(self.model)[config.feature_block]
            self.width, self.stride = int(chosen["num_chs"]), int(chosen["reduction"])
        self._captured: dict[str, torch.Tensor] = {}
        self._token_counts: dict[int, int] = {}
        if config.feature_block is not None and blocks is not None and not -len(blocks) <= config.feature_block < len(blocks):
            raise ConfigError(
                f"encoder.feature_block={config.feature_block} is out of range: {config.model_name} has "
                f"{len(blocks)} blocks (0..{len(blocks) - 1}, or negative from the end)."
            )

    @property
    def provides(self) -> frozenset[str]:  # type: ignore[override]
        caps = set()
        if self._has_cls:
            caps.add(CLS)
        if self._attention_ok:
            caps.add(ATTENTION)
        return frozenset(caps)

    @property
    def preprocessing(self) -> Preprocessing:
        cfg = self.model.pretrained_cfg
        interpolation = cfg.get("interpolation", "bicubic")
        return Preprocessing(
            image_size=self.config.image_size,
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            resize=self.config.resize,
            interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
        )

    def num_tokens(self, image_size: int | None = None) -> int:
        size = image_size or self.config.image_size
        check_multiple(self.name + f" ({self.config.model_name})", size, self.stride)
        if size != self.config.image_size and _fixed_size(self.model):
            raise ImageSizeError(
                f"{self.config.model_name} was built for {self.config.image_size} px; set encoder.image_size={size} "
                f"to rebuild it at {size} px."
            )
        if size not in self._token_counts:  # exact for any timm model: one forward of a meta-device copy
            with torch.device("meta"):
                probe = TimmEncoder(dataclasses.replace(self.config, image_size=size))
            with torch.no_grad():
                x = torch.empty(1, 3, size, size, device="meta")
                self._token_counts[size] = probe._features(x, capture=False).tokens.shape[1]
        return self._token_counts[size]

    def request(self, needs: frozenset[str]) -> None:
        super().request(needs)
        if ATTENTION in needs:
            self._attention_module().register_forward_hook(self._capture_qkv)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        return self._features(pixel_values, capture=True)

    # ------------------------------------------------------------------------------------- internals

    def _features(self, x: torch.Tensor, capture: bool) -> EncoderOutput:
        config = self.config
        if config.feature_block is None:
            out = self.model.forward_features(x)
            prefix = None
            if out.ndim == 3 and self.num_prefix:
                prefix, out = out[:, : self.num_prefix], out[:, self.num_prefix :]
        else:
            # Run every block when attention of a later block is wanted; otherwise stop at the chosen one.
            result = self.model.forward_intermediates(
                x,
                indices=[config.feature_block],
                norm=False,
                stop_early=ATTENTION not in self.requested,
                output_fmt="NLC" if hasattr(self.model, "blocks") else "NCHW",
                intermediates_only=True,
                **({"return_prefix_tokens": True} if self.num_prefix else {}),  # conv nets take no such argument
            )[0]
            out, prefix = result if isinstance(result, tuple) else (result, None)
        if out.ndim == 4:  # NCHW map -> row-major tokens
            grid = (out.shape[2], out.shape[3])
            tokens = out.flatten(2).transpose(1, 2)
        else:
            tokens = out
            h, w = x.shape[2] // self.stride, x.shape[3] // self.stride
            grid = (h, w) if h * w == tokens.shape[1] else None
        features = EncoderOutput(tokens=tokens, grid=grid)
        if prefix is not None:
            if CLS in self.requested and self._has_cls:
                features.cls = prefix[:, 0]
            if config.keep_prefix_tokens:
                features.tokens = torch.cat([prefix, tokens], dim=1)
                features.grid = None
        if capture and ATTENTION in self.requested:
            qkv = self._captured.pop("qkv")
            dim = qkv.shape[-1] // 3
            features.queries, features.keys = qkv[..., :dim], qkv[..., dim : 2 * dim]
            features.num_prefix_tokens = self.num_prefix
        return features

    def _attention_module(self) -> torch.nn.Module:
        blocks = self.model.blocks
        index, count = self.config.attention_block, len(blocks)
        if index is None:  # the block after the selected features, or the last one
            feature = self.config.feature_block
            index = count - 1 if feature is None else min(feature % count + 1, count - 1)
        return blocks[index].attn.qkv

    def _capture_qkv(self, module, inputs, output) -> None:
        self._captured["qkv"] = output


def _create(config: TimmEncoderConfig, image_size: int | None = None) -> torch.nn.Module:
    kwargs = dict(pretrained=False, num_classes=0, **config.model_kwargs)
    size = image_size or config.image_size
    try:
        return timm.create_model(config.model_name, img_size=size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(config.model_name, **kwargs)  # convolutional: takes any size
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            candidates = timm.list_models(f"*{config.model_name.split('.')[0].split('_')[0]}*")[:10]
            raise ConfigError(
                f"timm has no model '{config.model_name}' (encoder.model_name). Similar names: "
                f"{', '.join(candidates) or 'none'}. `python -c \"import timm; print(timm.list_models('*vit*'))\"` lists them."
            ) from None
        raise


def _native_size(model_name: str) -> int:
    pretrained_cfg = timm.get_pretrained_cfg(model_name)
    return int(pretrained_cfg.input_size[-1]) if pretrained_cfg else 224


def _feature_info(model: torch.nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None) or []
    return info if isinstance(info, list) else info.info


def _stride(model: torch.nn.Module) -> int:
    info = _feature_info(model)
    if info:
        return int(info[-1]["reduction"])
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1,))
    return int(patch[0])


def _fixed_size(model: torch.nn.Module) -> bool:
    """ViTs built without dynamic_img_size have position embeddings for one size only."""
    patch_embed = getattr(model, "patch_embed", None)
    return patch_embed is not None and getattr(patch_embed, "strict_img_size", False)


@hookimpl
def register_encoders(register):
    register(TimmEncoder)
