"""The FastViT family (FastViT/MCi2, FastViTHD = MCi3, MCi4) as one configurable encoder, on timm's FastVit.

Everything the FastVLM paper ablates is a config key: blocks and widths per stage, token mixer and positional
encoding per stage, which stages downsample (total stride 32 or 64), MLP ratios, the final expansion conv, and
the multi-scale fusion of paper figure 2 (pool earlier stages to the final grid, concatenate along channels),
which the released code never shipped. `inference_mode` picks the reparameterized (fused) form or the
multi-branch train form; `reparameterize()` turns the second into the first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, make_dataclass
from functools import partial
from typing import Literal, get_type_hints

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.fastvit import FastVit, RepConditionalPosEnc
from timm.utils.model import reparameterize_model
from torch import nn

from ablate.components import EncoderConfig, EncoderOutput, Preprocessing, VisionEncoder, check_multiple
from ablate.errors import ConfigError
from ablate.hookspecs import hookimpl
from ablate.weights import load_state_dict_strict, read_tensors

POSITIONAL_ENCODINGS = {"rcpe7": partial(RepConditionalPosEnc, spatial_shape=(7, 7))}
NORMS = {"batchnorm": nn.BatchNorm2d, "layernorm2d": partial(LayerNorm2d, eps=1e-5)}
STEM_STRIDE = 4
DOWNSAMPLE_STRIDE = 2


@dataclass
class FastViTConfig(EncoderConfig):
    """Defaults: a tiny FastViTHD-shaped model (5 stages, stride 64), cheap enough for any test."""

    image_size: int = 128
    layers: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 1])  # blocks per stage
    embed_dims: list[int] = field(default_factory=lambda: [16, 16, 32, 32, 64])  # attention widths: multiples of 32
    mlp_ratios: list[float] = field(default_factory=lambda: [3.0] * 5)
    token_mixers: list[str] = field(default_factory=lambda: ["repmixer"] * 3 + ["attention"] * 2)
    pos_embs: list[str | None] = field(default_factory=lambda: [None, None, None, "rcpe7", "rcpe7"])
    downsamples: list[bool] = field(default_factory=lambda: [False] + [True] * 4)  # before each stage
    se_downsamples: list[bool] = field(default_factory=lambda: [False] * 5)
    norm: Literal["layernorm2d", "batchnorm"] = "layernorm2d"  # norm before attention
    lkc_use_act: bool = True  # GELU after the large-kernel downsampling conv (MCi models use it)
    stem_use_scale_branch: bool = False
    final_conv: bool = True  # the expansion conv ("conv_exp"); off: tokens are the last stage's output
    cls_ratio: float = 2.0  # final conv width = cls_ratio * last stage width
    inference_mode: bool = True  # True: reparameterized (fused) form; False: multi-branch train form
    fusion_stages: list[int] = field(default_factory=list)  # earlier stages pooled to the final grid and concatenated
    fusion: Literal["dwconv", "avgpool"] = "dwconv"
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # FastVLM feeds [0, 1] pixels unnormalized
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


def _check(config: FastViTConfig) -> None:
    stages = len(config.layers)
    for key in ("embed_dims", "mlp_ratios", "token_mixers", "pos_embs", "downsamples", "se_downsamples"):
        if len(getattr(config, key)) != stages:
            raise ConfigError(
                f"encoder.{key} has {len(getattr(config, key))} entries but encoder.layers has {stages} stages; "
                f"give one entry per stage."
            )
    for i, (mixer, width) in enumerate(zip(config.token_mixers, config.embed_dims)):
        if mixer not in ("repmixer", "attention"):
            raise ConfigError(f"encoder.token_mixers[{i}]='{mixer}': use 'repmixer' or 'attention'.")
        if mixer == "attention" and width % 32:
            raise ConfigError(
                f"encoder.embed_dims[{i}]={width} is an attention stage: its width must be a multiple of 32 "
                f"(head_dim 32)."
            )
    for i, pos in enumerate(config.pos_embs):
        if pos is not None and pos not in POSITIONAL_ENCODINGS:
            raise ConfigError(f"encoder.pos_embs[{i}]='{pos}': use null or one of {list(POSITIONAL_ENCODINGS)}.")
    for stage in config.fusion_stages:
        if not 0 <= stage < stages - 1:
            raise ConfigError(
                f"encoder.fusion_stages holds {stage}: fuse earlier stages only, 0..{stages - 2} (the last stage "
                f"is always used)."
            )


def stage_strides(config: FastViTConfig) -> list[int]:
    """Total stride of each stage's output."""
    strides, stride = [], STEM_STRIDE
    for downsample in config.downsamples:
        stride *= DOWNSAMPLE_STRIDE if downsample else 1
        strides.append(stride)
    return strides


class FastViT(VisionEncoder):
    """FastViT family member configured from its config (generic; defaults to a tiny stride-64 model)."""

    name = "fastvit"
    Config = FastViTConfig

    def __init__(self, config: FastViTConfig):
        super().__init__(config)
        _check(config)
        self.model = FastVit(
            layers=tuple(config.layers),
            token_mixers=tuple(config.token_mixers),
            embed_dims=tuple(config.embed_dims),
            mlp_ratios=tuple(config.mlp_ratios),
            downsamples=tuple(config.downsamples),
            se_downsamples=tuple(config.se_downsamples),
            pos_embs=tuple(POSITIONAL_ENCODINGS[p] if p else None for p in config.pos_embs),
            norm_layer=NORMS[config.norm],
            lkc_use_act=config.lkc_use_act,
            stem_use_scale_branch=config.stem_use_scale_branch,
            cls_ratio=config.cls_ratio,
            num_classes=0,
            inference_mode=config.inference_mode,
        )
        self.model.head = nn.Identity()  # the classifier/CLIP head is never used by a VLM
        if not config.final_conv:
            self.model.final_conv = nn.Identity()
        strides = stage_strides(config)
        self.stride = strides[-1]
        final_width = int(config.embed_dims[-1] * config.cls_ratio) if config.final_conv else config.embed_dims[-1]
        # Multi-scale fusion: one pooling per fused stage, from its stride down to the final one.
        self.fusion = nn.ModuleDict()
        for stage in sorted(set(config.fusion_stages)):
            factor, width = self.stride // strides[stage], config.embed_dims[stage]
            self.fusion[str(stage)] = (
                nn.Conv2d(width, width, kernel_size=factor, stride=factor, groups=width)
                if config.fusion == "dwconv"
                else nn.AvgPool2d(kernel_size=factor, stride=factor)
            )
        self.width = final_width + sum(config.embed_dims[int(s)] for s in self.fusion)
        if config.weights:
            self.load_weights(config.weights)

    @property
    def form(self) -> str:
        return "inference" if self.config.inference_mode else "train"

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            image_size=self.config.image_size, mean=tuple(self.config.mean), std=tuple(self.config.std),
            resize="pad", interpolation="bicubic",
        )

    def num_tokens(self, image_size: int | None = None) -> int:
        size = image_size or self.config.image_size
        check_multiple(self.name, size, self.stride)
        return (size // self.stride) ** 2

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        x = self.model.stem(pixel_values)
        pooled = []
        for index, stage in enumerate(self.model.stages):
            x = stage(x)
            if str(index) in self.fusion:
                pooled.append(self.fusion[str(index)](x))
        x = self.model.final_conv(x)
        if pooled:
            x = torch.cat([x, *pooled], dim=1)
        return EncoderOutput(tokens=x.flatten(2).transpose(1, 2), grid=(x.shape[2], x.shape[3]))

    def reparameterize(self) -> None:
        """Fuse the multi-branch train form into the inference form, in place (same outputs, fewer ops)."""
        reparameterize_model(self.model, inplace=True)
        self.config.inference_mode = True

    def load_weights(self, path: str) -> None:
        """Encoder-only weights: timm FastViT/MobileCLIP keys, or the official ml-fastvlm/MobileCLIP names."""
        if any(p.is_meta for p in self.parameters()):
            return  # counting on the meta device: shapes only
        tensors = read_tensors(path)
        if any(key.startswith(("network.", "patch_embed.")) for key in tensors):
            tensors = convert_mci_state_dict(tensors, self.config)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
        target = {f"model.{k}": v for k, v in tensors.items()} if not any(k.startswith("model.") for k in tensors) else tensors
        load_state_dict_strict(self, target, what=f"encoder '{self.name}' (encoder.weights={path})")


def convert_mci_state_dict(tensors: dict[str, torch.Tensor], config: FastViTConfig) -> dict[str, torch.Tensor]:
    """Official ml-fastvlm / MobileCLIP FastViT key names -> timm's (spec: fastvlm.md section 3.6).

    Unlike timm's own filter this also maps the fused keys of inference-form checkpoints (`lkb_reparam`, fused
    RepCPE `network.N.reparam_conv`), and it places stages from the config, not by guessing from key names.
    """
    # The official flat `network` list holds, per stage: its downsample, its positional encoding, its blocks.
    places: dict[int, str] = {}
    index = 0
    for stage, (downsample, pos) in enumerate(zip(config.downsamples, config.pos_embs)):
        if stage > 0 and downsample:
            places[index], index = f"stages.{stage}.downsample", index + 1
        if pos:
            places[index], index = f"stages.{stage}.pos_emb", index + 1
        places[index], index = f"stages.{stage}.blocks", index + 1

    renames = [
        ("patch_embed", "stem"), ("conv_exp", "final_conv"), ("convffn", "mlp"), ("se.reduce", "se.fc1"),
        ("se.expand", "se.fc2"), ("rbr_conv", "conv_kxk"), ("rbr_scale", "conv_scale"), ("rbr_skip", "identity"),
        ("lkb_origin", "large_conv"), ("lkb_reparam", "reparam_conv"),
    ]
    out = {}
    for key, value in tensors.items():
        for old, new in renames:
            key = key.replace(old, new)
        key = re.sub(r"layer_scale(_[12])?(?=\.|$)", lambda m: m.group(0) + ".gamma", key)
        match = re.match(r"network\.(\d+)\.(.*)", key)
        if match:
            place, rest = places.get(int(match.group(1))), match.group(2)
            if place is None:
                raise ConfigError(f"Checkpoint key {key} has no place in this architecture (encoder.layers etc.).")
            if place.endswith(".downsample"):
                key = f"{place}.{rest}"
            elif place.endswith(".pos_emb"):
                key = f"{place}.{'pos_enc' + rest[2:] if rest.startswith('pe.') else rest}"
            else:
                key = f"{place}.{rest}"
        out[key] = value
    return out


def _preset(name: str, doc: str, **defaults) -> type[FastViT]:
    """A registered family member: the same class, other config defaults (so `encoder=NAME` picks them)."""
    class_name = name.title().replace("-", "")
    fields = [
        (key, get_type_hints(FastViTConfig)[key],
         field(default_factory=lambda v=value: list(v)) if isinstance(value, list) else field(default=value))
        for key, value in defaults.items()
    ]
    config = make_dataclass(f"{class_name}Config", fields, bases=(FastViTConfig,))
    return type(class_name, (FastViT,), {"__doc__": doc, "name": name, "Config": config})


_MCI_LARGE = dict(
    mlp_ratios=[4.0] * 5, token_mixers=["repmixer"] * 3 + ["attention"] * 2, pos_embs=[None, None, None, "rcpe7", "rcpe7"],
    downsamples=[False] + [True] * 4, se_downsamples=[False] * 5, norm="layernorm2d", lkc_use_act=True,
    stem_use_scale_branch=False, image_size=1024,
)
FastViTHD = _preset(
    "fastvithd", "FastViTHD (FastVLM's encoder, timm fastvit_mci3): stride 64, 3072-wide tokens.",
    layers=[2, 12, 24, 4, 2], embed_dims=[96, 192, 384, 768, 1536], **_MCI_LARGE,
)
FastViTMCi4 = _preset(
    "fastvit-mci4", "FastViT MCi4 (MobileCLIP2-S4 tower, timm fastvit_mci4): stride 64, 4096-wide tokens.",
    layers=[2, 12, 24, 4, 4], embed_dims=[128, 256, 512, 1024, 2048], **_MCI_LARGE,
)
FastViTMCi2 = _preset(
    "fastvit-mci2", "FastViT MCi2 (FastVLM's 'FastViT' baseline, timm fastvit_mci2): stride 32, 1280-wide tokens.",
    layers=[4, 12, 24, 4], embed_dims=[80, 160, 320, 640], mlp_ratios=[3.0] * 4,
    token_mixers=["repmixer"] * 3 + ["attention"], pos_embs=[None, None, None, "rcpe7"],
    downsamples=[False, True, True, True], se_downsamples=[False, False, True, True], norm="batchnorm",
    lkc_use_act=True, stem_use_scale_branch=True, image_size=768,
)
FastViTTiny = _preset(
    "fastvit-tiny", "Tiny FastViTHD-shaped encoder (stride 64) for tests and demos; milliseconds on a CPU.",
)


@hookimpl
def register_encoders(register):
    for encoder in (FastViT, FastViTHD, FastViTMCi2, FastViTMCi4, FastViTTiny):
        register(encoder)
