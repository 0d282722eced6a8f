"""Any timm model as a vision encoder, with feature selection; and the vision towers of FastVLM's baselines on it.

`encoder=timm encoder.model_name=vit_large_patch14_clip_336.openai encoder.feature_block=22` is LLaVA-1.5's
tower: the output of block 22 (the penultimate of 24), before the final norm, CLS dropped. A pretrained tag
in the name (".openai") picks that tag's preprocessing (mean/std) without downloading anything.

The baselines' towers are the `timm` encoder with each system's defaults (so every timm option still works as an
override):

* `clip-vit-l14-336`: CLIP ViT-L/14 at 336 px as LLaVA-1.5 (and MobileVLM-V2) use it: the output of block 22 of 24,
  before the final norm, CLS dropped: 576 tokens x 1024 (LLaVA `mm_vision_select_layer -2`, patch features).
* `siglip-so400m`: SigLIP-SO400M/14 at 384 px as LLaVA-OneVision uses it: the last of its 27 blocks and the
  attention-pooling head dropped, the output of block 26 taken before the final norm: 729 tokens x 1152 per crop.
* `convnext-l-clip`: LAION CLIP ConvNeXt-L, stride 32, 1536-wide (FastVLM table 4; ConvLLaVA's trunk).
* `convllava`: ConvLLaVA's tower: that trunk plus a fifth ConvNeXt stage (2x2 stride-2 downsampling to 3072 wide,
  6 blocks), stride 64: 144 / 256 / 576 tokens at 768 / 1024 / 1536 px; features are the last stage's map.

Sources: LLaVA-1.5 `llava/model/multimodal_encoder/clip_encoder.py`, LLaVA-NeXT `siglip_encoder.py`, ConvLLaVA
`convnext_encoder.py` and `scripts/stage_1.sh`; the FastVLM paper (Vasu et al., CVPR 2025), table 4.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from typing import Literal

import timm
import torch
from timm.layers import LayerNorm, LayerNorm2d
from timm.models.convnext import ConvNeXtStage
from timm.utils.model import reparameterize_model
from torch import nn

from ablate.api import (
    ATTENTION,
    CLS,
    Attention,
    ConfigError,
    EncoderConfig,
    ImageSizeError,
    Preprocessing,
    StageContext,
    TokenLayout,
    VisionEncoder,
    check_multiple,
    hookimpl,
    load_state_dict_strict,
    meta_device,
    read_tensors,
)


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
    # Fuse multi-branch blocks (FastViT, MobileOne, RepVGG...) into their inference form, as deployed, after any
    # weights load; false keeps (and times) the train form. No effect on models without such blocks.
    reparameterize: bool = True


# (encoder class, its config at a size) -> tokens: a pure function of the config, so a grid counts each one once
_TOKEN_COUNTS: dict[tuple[type, str], int] = {}


class TimmEncoder(VisionEncoder):
    """Any timm model by name (ViT, SigLIP, ConvNeXt, FastViT...), final or intermediate features."""

    name = "timm"
    Config = TimmEncoderConfig

    @classmethod
    def resolve_config(cls, config: TimmEncoderConfig) -> TimmEncoderConfig:
        if config.image_size is None:  # the recorded config says which size ran
            config = replace(config, image_size=_native_size(config.model_name))
        return config

    def __init__(self, config: TimmEncoderConfig):
        super().__init__(self.resolve_config(config))
        config = self.config
        self.model = _create(config)
        self._fused = False
        if not config.weights or _on_meta(self.model):  # with weights: after load_weights (checkpoints: train form)
            self._fuse()
        self.stride = _stride(self.model)
        self.num_prefix = getattr(self.model, "num_prefix_tokens", 0)
        self._has_cls = bool(getattr(self.model, "cls_token", None) is not None)
        blocks = getattr(self.model, "blocks", None)
        # Per-head q/k from a block's fused qkv Linear (ViT, SigLIP, ... without CLS too: scores then use substitutes).
        # Attention scores index the visual tokens after the prefix ones: not when a prefix is among them.
        self._attention_ok = (
            blocks is not None
            and hasattr(getattr(blocks[0], "attn", None), "qkv")
            and not (config.keep_prefix_tokens and self.num_prefix)
        )
        self.width = self.model.num_features
        if config.feature_block is not None:
            info = _feature_info(self.model)
            count = len(blocks) if blocks is not None else len(info)
            if not -count <= config.feature_block < count:
                unit = "blocks" if blocks is not None else "feature stages"
                raise ConfigError(
                    f"encoder.feature_block={config.feature_block} is out of range: {config.model_name} has {count} "
                    f"{unit} (0..{count - 1}, or negative from the end)."
                )
            if info and blocks is None:
                # An intermediate stage of a conv net is narrower than the last one (ViT blocks all have one width).
                chosen = info[config.feature_block]
                self.width, self.stride = int(chosen["num_chs"]), int(chosen["reduction"])
        if config.attention_block is not None and (
            blocks is None or not -len(blocks) <= config.attention_block < len(blocks)
        ):
            raise ConfigError(
                f"encoder.attention_block={config.attention_block} is out of range for {config.model_name} "
                f"({0 if blocks is None else len(blocks)} attention blocks)."
            )
        self._captured: dict[str, torch.Tensor] = {}

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
        if size != _native_size(self.config.model_name):  # a published size may not tile (SigLIP: 384 px, patch 14)
            check_multiple(self.name + f" ({self.config.model_name})", size, self.stride)
        if size != self.config.image_size and _fixed_size(self.model):
            raise ImageSizeError(
                f"{self.config.model_name} was built for {self.config.image_size} px; set encoder.image_size={size} "
                f"to rebuild it at {size} px."
            )
        probe_config = dataclasses.replace(self.config, image_size=size)
        key = (type(self), json.dumps(dataclasses.asdict(probe_config), sort_keys=True, default=str))
        if key not in _TOKEN_COUNTS:  # exact for any timm model: one forward of a meta-device copy
            with meta_device():
                probe = type(self)(probe_config)  # subclasses add layers
            with torch.no_grad():
                x = torch.empty(1, 3, size, size, device="meta")
                tokens, prefix = probe._features(x, capture=False)
                kept_prefix = prefix.shape[1] if prefix is not None and self.config.keep_prefix_tokens else 0
                _TOKEN_COUNTS[key] = tokens.shape[1] + kept_prefix
        return _TOKEN_COUNTS[key]

    def output_layout(self) -> TokenLayout:
        if self.config.keep_prefix_tokens and self.num_prefix:
            return TokenLayout.unstructured(self.num_tokens())
        return super().output_layout()

    def request(self, needs: frozenset[str]) -> None:
        super().request(needs)
        if ATTENTION in needs:
            self._attention_module().register_forward_hook(self._capture_qkv)

    def notes(self) -> list[str]:
        if ATTENTION not in self.requested:
            return []
        index = self._attention_index()
        kernel = "SDPA" if getattr(self._attention_module_parent(), "fused_attn", True) else "timm's non-fused path"
        notes = [
            f"encoder '{self.name}' hands block {index}'s queries and keys to the reducer through a forward hook on "
            f"its qkv Linear; the block's attention kernel is unchanged ({kernel})."
        ]
        feature = self.config.feature_block
        if feature is not None and index > feature % len(self.model.blocks):
            first = feature % len(self.model.blocks) + 1
            run = f"block {index}" if first == index else f"blocks {first}..{index}"
            notes.append(
                f"encoder '{self.name}' runs {run} past the selected features (block {feature % len(self.model.blocks)}) "
                f"to read block {index}'s attention; that time counts as the encoder's."
            )
        return notes

    def forward(self, ctx: StageContext) -> StageContext:
        x = ctx.pixel_values
        tokens, prefix = self._features(x, capture=True)
        h, w = x.shape[2] // self.stride, x.shape[3] // self.stride
        cls_token, attention = None, None
        if prefix is not None and CLS in self.requested:
            cls_token = prefix[:, 0]
        if prefix is not None and self.config.keep_prefix_tokens:
            tokens = torch.cat([prefix, tokens], dim=1)
        if ATTENTION in self.requested:
            attention = self._take_attention()
        on_grid = h * w == tokens.shape[1]
        layout = (
            TokenLayout.grid_of(h, w, ctx.layout.image_size)
            if on_grid
            else TokenLayout.unstructured(tokens.shape[1], ctx.layout.image_size)
        )
        return replace(ctx, tokens=tokens, layout=layout, cls=cls_token, attention=attention)

    def load_weights(self, path: str) -> None:
        """This encoder's own state_dict (keys `model.*`), or a timm checkpoint of the model (keys as timm names them)."""
        tensors = read_tensors(path)
        what = f"encoder 'timm' {self.config.model_name} (encoder.weights={path})"
        if any(key.startswith("model.") for key in tensors):
            load_state_dict_strict(self, tensors, what)
        else:
            tensors = {key: value for key, value in tensors.items() if not key.startswith("head.")}  # a classifier
            load_state_dict_strict(self.model, tensors, what)
        self._fuse()

    @property
    def form(self) -> str | None:
        """'inference' (fused) or 'train' (multi-branch) for reparameterizable models; None for the others."""
        if not _reparameterizable(self.model):
            return None
        return "inference" if self._fused else "train"

    def _fuse(self) -> None:
        if self.config.reparameterize and _reparameterizable(self.model) and not self._fused:
            reparameterize_model(self.model, inplace=True)
            self._fused = True

    # ------------------------------------------------------------------------------------- internals

    def _features(self, x: torch.Tensor, capture: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, C) tokens (prefix tokens split off) and the prefix tokens (None if the model has none)."""
        config = self.config
        if config.feature_block is None:
            out = self.model.forward_features(x)
            prefix = None
            if out.ndim == 3 and self.num_prefix:
                prefix, out = out[:, : self.num_prefix], out[:, self.num_prefix :]
        else:
            # Stop after the chosen block, or after the attention block when a reducer wants a later block's q/k.
            blocks = getattr(self.model, "blocks", None)
            feature = config.feature_block % len(blocks) if blocks is not None else config.feature_block
            indices = [feature]
            if capture and ATTENTION in self.requested:
                indices = sorted({feature, self._attention_index()})
            result = self.model.forward_intermediates(
                x,
                indices=indices,
                norm=False,
                stop_early=True,
                output_fmt="NLC" if blocks is not None else "NCHW",
                intermediates_only=True,
                **({"return_prefix_tokens": True} if self.num_prefix else {}),  # conv nets take no such argument
            )[indices.index(feature)]
            out, prefix = result if isinstance(result, tuple) else (result, None)
        if out.ndim == 4:  # NCHW map -> row-major tokens
            out = out.flatten(2).transpose(1, 2)
        return out, prefix

    def _take_attention(self) -> Attention:
        qkv = self._captured.pop("qkv")  # (B, T, 3 * heads * head_dim), as timm's Attention computes it
        heads = self._attention_module_parent().num_heads
        batch, length, _ = qkv.shape
        q, k, _ = qkv.reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return Attention(queries=q, keys=k, num_prefix_tokens=self.num_prefix)

    def _attention_index(self) -> int:
        index, count = self.config.attention_block, len(self.model.blocks)
        if index is None:  # the block after the selected features, or the last one
            feature = self.config.feature_block
            index = count - 1 if feature is None else min(feature % count + 1, count - 1)
        return index

    def _attention_module_parent(self) -> torch.nn.Module:
        return self.model.blocks[self._attention_index()].attn

    def _attention_module(self) -> torch.nn.Module:
        return self._attention_module_parent().qkv

    def _capture_qkv(self, module, inputs, output) -> None:
        self._captured["qkv"] = output


def _create(config: TimmEncoderConfig) -> torch.nn.Module:
    kwargs = dict(pretrained=False, num_classes=0, **config.model_kwargs)
    if not timm.is_model(config.model_name.split(".")[0]):
        stem = config.model_name.split(".")[0].split("_")[0]
        candidates = timm.list_models(f"*{stem}*")[:10]
        raise ConfigError(
            f"timm has no model '{config.model_name}' (encoder.model_name). Similar names: "
            f"{', '.join(candidates) or 'none'}. `python -c \"import timm; print(timm.list_models('*vit*'))\"` lists them."
        )
    try:
        try:
            return timm.create_model(config.model_name, img_size=config.image_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            return timm.create_model(config.model_name, **kwargs)  # convolutional: takes any size
    except (TypeError, ValueError, AssertionError) as exc:  # a create_model argument the model does not take
        raise ConfigError(
            f"timm cannot build {config.model_name} with encoder.model_kwargs={config.model_kwargs} at "
            f"{config.image_size} px: {type(exc).__name__}: {exc}. Fix or remove the offending encoder.model_kwargs key."
        ) from None


def _reparameterizable(model: torch.nn.Module) -> bool:
    return any(hasattr(module, "reparameterize") for module in model.modules())


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _native_size(model_name: str) -> int:
    pretrained_cfg = timm.get_pretrained_cfg(model_name) if timm.is_model(model_name.split(".")[0]) else None
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


# ------------------------------------------------------------------------------------ the baselines' towers


@dataclass
class ClipViTL14Config(TimmEncoderConfig):
    model_name: str = "vit_large_patch14_clip_336.openai"
    feature_block: int | None = 22  # LLaVA's hidden_states[-2]: the output of block 22 of 0..23


class ClipViTL14(TimmEncoder):
    """CLIP ViT-L/14-336 as LLaVA-1.5 uses it: block 22 of 24, no final norm, CLS dropped (576 x 1024)."""

    name = "clip-vit-l14-336"
    Config = ClipViTL14Config

    @property
    def preprocessing(self) -> Preprocessing:
        # LLaVA-1.5 pads to a square with the mean colour (expand2square), not black.
        base = super().preprocessing
        return replace(base, pad_color=tuple(int(m * 255) for m in base.mean))


@dataclass
class SigLIPConfig(TimmEncoderConfig):
    model_name: str = "vit_so400m_patch14_siglip_384.webli"
    # LLaVA-OneVision deletes the last block and the pooling head; HF SigLIP's MLP uses tanh-approximated GELU.
    model_kwargs: dict = field(default_factory=lambda: {"depth": 26, "global_pool": "", "act_layer": "gelu_tanh"})
    feature_block: int | None = -1  # the last (remaining) block, before the final norm


class SigLIP(TimmEncoder):
    """SigLIP-SO400M/14-384 as LLaVA-OneVision uses it: 26 of 27 blocks, no head, no final norm (729 x 1152)."""

    name = "siglip-so400m"
    Config = SigLIPConfig


@dataclass
class ConvNeXtLConfig(TimmEncoderConfig):
    model_name: str = "convnext_large_mlp.clip_laion2b_ft_soup_320"


class ConvNeXtL(TimmEncoder):
    """LAION CLIP ConvNeXt-L (timm convnext_large_mlp): stride 32, 1536-wide tokens (FastVLM table 4)."""

    name = "convnext-l-clip"
    Config = ConvNeXtLConfig


@dataclass
class ConvLLaVAConfig(ConvNeXtLConfig):
    image_size: int | None = 768  # 144 tokens; 1024 -> 256, 1536 -> 576
    stage5_depth: int = 6  # conv-llava `vision_add_five_stage 6`
    stage5_width: int = 3072  # conv-llava `vision_five_stage_width 3072`


class ConvLLaVA(TimmEncoder):
    """ConvLLaVA's tower: CLIP ConvNeXt-L plus a fifth ConvNeXt stage (3072 wide, 6 blocks), stride 64."""

    name = "convllava"
    Config = ConvLLaVAConfig

    def __init__(self, config: ConvLLaVAConfig):
        if config.stage5_depth < 1 or config.stage5_width < 1:
            raise ConfigError(
                f"encoder.stage5_depth={config.stage5_depth} and encoder.stage5_width={config.stage5_width} must be "
                f"positive (ConvLLaVA: 6 blocks, 3072 wide)."
            )
        if config.feature_block is not None:
            raise ConfigError(
                "encoder.feature_block is not supported by convllava: its features are the added fifth stage's "
                "output. Use encoder=convnext-l-clip for an intermediate stage of the trunk."
            )
        super().__init__(config)
        model, trunk_width = self.model, self.model.num_features
        # The same block recipe as the trunk's stages (channels-last LayerNorm in blocks, LayerNorm2d before the
        # downsampling conv), as HF's ConvNextStage(config, 1536, 3072, depth=6) builds it.
        model.stages.append(
            ConvNeXtStage(
                trunk_width,
                config.stage5_width,
                stride=2,
                depth=config.stage5_depth,
                ls_init_value=1e-6,
                norm_layer=LayerNorm2d,
                norm_layer_cl=LayerNorm,
            )
        )
        model.head = nn.Identity()  # the CLIP head MLP: ConvLLaVA's HF ConvNextModel has none, the features skip it
        self.stride *= 2
        model.feature_info.append(dict(num_chs=config.stage5_width, reduction=self.stride, module="stages.4"))
        model.num_features = self.width = config.stage5_width


@hookimpl
def register_encoders(register):
    for encoder in (TimmEncoder, ClipViTL14, SigLIP, ConvNeXtL, ConvLLaVA):
        register(encoder)
