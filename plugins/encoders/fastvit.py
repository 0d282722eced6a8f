"""The FastViT family (FastViT/MCi2, FastViTHD = MCi3, MCi4) as one configurable encoder on timm's `FastVit`.

Everything the FastVLM paper ablates is a config key: blocks and widths per stage, token mixer and positional
encoding per stage, which stages downsample (total stride 32 or 64), MLP ratios, the final expansion conv, and
the multi-scale fusion of paper figure 2 (pool earlier stages to the final grid, concatenate along channels),
which the released code never shipped. `inference_mode` picks the reparameterized (fused) form or the
multi-branch train form; `reparameterize()` turns the second into the first.

timm builds every block; this module only configures it, runs its stem/stages/final conv, and adds the fusion
poolings. Sources: the FastVLM paper (Vasu et al., CVPR 2025, arXiv 2412.13303) and its figure 2; apple/ml-fastvlm
`llava/model/multimodal_encoder/mobileclip/mci.py` (the official layout and key names); timm `fastvit.py`
(`fastvit_mci3` is FastViTHD) and its `checkpoint_filter_fn`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

import torch
from timm.layers import LayerNorm2d
from timm.models.fastvit import FastVit, RepConditionalPosEnc
from timm.utils.model import reparameterize_model
from torch import nn

from ablate.api import (
    ATTENTION,
    Attention,
    CheckpointError,
    ConfigError,
    EncoderConfig,
    Preprocessing,
    StageContext,
    TokenLayout,
    VisionEncoder,
    check_multiple,
    hookimpl,
    load_state_dict_strict,
    read_tensors,
)

# Config strings -> timm layer factories (as timm's fastvit_mci* factories pass them).
POSITIONAL_ENCODINGS = {"rcpe7": partial(RepConditionalPosEnc, spatial_shape=(7, 7))}
NORMS = {"layernorm2d": partial(LayerNorm2d, eps=1e-5), "batchnorm": nn.BatchNorm2d}
TOKEN_MIXERS = ("repmixer", "attention")
ATTENTION_HEAD_DIM = 32  # timm's FastViT Attention: heads = width // 32
STEM_STRIDE = 4  # the stem's two stride-2 MobileOne blocks
DOWNSAMPLE_STRIDE = 2  # each PatchEmbed


# ---------------------------------------------------------------------------------------------- config


@dataclass
class FastViTConfig(EncoderConfig):
    """FastViT family options. Defaults: FastViTHD's layout at toy widths (stride 64), cheap enough for any test."""

    image_size: int = 128
    layers: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 1])  # blocks per stage
    embed_dims: list[int] = field(default_factory=lambda: [16, 16, 32, 32, 64])  # attention stages: multiples of 32
    mlp_ratios: list[float] = field(default_factory=lambda: [4.0] * 5)
    token_mixers: list[str] = field(default_factory=lambda: ["repmixer"] * 3 + ["attention"] * 2)
    pos_embs: list[str | None] = field(default_factory=lambda: [None, None, None, "rcpe7", "rcpe7"])
    # timm semantics: a PatchEmbed (stride 2) *before* the stage. The stem adds stride 4.
    downsamples: list[bool] = field(default_factory=lambda: [False] + [True] * 4)
    se_downsamples: list[bool] = field(default_factory=lambda: [False] * 5)
    norm: Literal["layernorm2d", "batchnorm"] = "layernorm2d"  # the norm before attention
    lkc_use_act: bool = True  # GELU after the large-kernel downsampling conv (all MCi models)
    stem_use_scale_branch: bool = False  # train form: 1x1 scale branch in the stem's 3x3 blocks
    final_conv: bool = True  # the expansion conv ("conv_exp"); off: tokens are the last stage's output
    cls_ratio: float = 2.0  # final conv width = cls_ratio * last stage width
    inference_mode: bool = True  # True: reparameterized (fused) form; False: multi-branch train form
    # Multi-scale fusion (paper fig. 2): these earlier stages, pooled to the final grid, concatenated after it.
    fusion_stages: list[int] = field(default_factory=list)
    fusion: Literal["dwconv", "avgpool"] = "dwconv"
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # FastVLM feeds [0, 1] pixels as they are
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


def _one_of(key: str, value, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not an option: use one of {list(options)}.")


def validate(config: FastViTConfig) -> None:
    """Raise ConfigError, naming the key, for settings timm would reject late or get silently wrong."""
    stages = len(config.layers)
    if stages == 0:
        raise ConfigError("encoder.layers is empty: give the number of blocks of each stage, e.g. [2, 12, 24, 4, 2].")
    for key in ("embed_dims", "mlp_ratios", "token_mixers", "pos_embs", "downsamples", "se_downsamples"):
        if len(getattr(config, key)) != stages:
            raise ConfigError(
                f"encoder.{key} has {len(getattr(config, key))} entries but encoder.layers has {stages} stages: "
                f"give one entry per stage."
            )
    for i, (mixer, pos, width) in enumerate(zip(config.token_mixers, config.pos_embs, config.embed_dims)):
        _one_of(f"encoder.token_mixers[{i}]", mixer, TOKEN_MIXERS)
        _one_of(f"encoder.pos_embs[{i}]", pos, [None, *POSITIONAL_ENCODINGS])
        if mixer == "attention" and width % ATTENTION_HEAD_DIM:
            raise ConfigError(
                f"encoder.embed_dims[{i}]={width} is an attention stage, whose width must be a multiple of "
                f"{ATTENTION_HEAD_DIM} (timm's head_dim): use {max(32, round(width / 32) * 32)}."
            )
        # The downsampling conv is grouped by input channel: each input channel makes width / previous outputs.
        if i > 0 and config.downsamples[i] and width % config.embed_dims[i - 1]:
            raise ConfigError(
                f"encoder.embed_dims[{i}]={width} must be a multiple of encoder.embed_dims[{i - 1}]="
                f"{config.embed_dims[i - 1]}: the downsampling conv before stage {i} is grouped by input channel."
            )
        # timm downsamples any stage that changes width, whatever the flag says; the stride would silently differ.
        if i > 0 and not config.downsamples[i] and width != config.embed_dims[i - 1]:
            raise ConfigError(
                f"encoder.downsamples[{i}] is false but stage {i} changes width ({config.embed_dims[i - 1]} -> "
                f"{width}); only a downsampling stage can change width: set it true or keep the width."
            )
    if config.final_conv:
        last = config.embed_dims[-1]
        width = config.cls_ratio * last if math.isfinite(config.cls_ratio) else 0
        if width < last or width != int(width) or int(width) % last:
            raise ConfigError(
                f"encoder.cls_ratio={config.cls_ratio} must make the final conv's width a whole multiple of the last "
                f"stage's width {last} (the conv is grouped by channel): use 1.0, 2.0, 3.0, ..."
            )
    if len(set(config.fusion_stages)) != len(config.fusion_stages):
        raise ConfigError(f"encoder.fusion_stages={config.fusion_stages} names a stage twice.")
    for stage in config.fusion_stages:
        if not 0 <= stage < stages - 1:
            raise ConfigError(
                f"encoder.fusion_stages holds {stage}: fuse earlier stages only, 0..{stages - 2} (the last stage "
                f"is always used)."
            )
    for key in ("mean", "std"):
        if len(getattr(config, key)) != 3:
            raise ConfigError(f"encoder.{key} needs 3 values (R, G, B), not {getattr(config, key)}.")
    if not all(math.isfinite(v) for v in (*config.mean, *config.std)):
        raise ConfigError(f"encoder.mean={config.mean} and encoder.std={config.std} must be finite numbers.")
    if not all(s > 0 for s in config.std):
        raise ConfigError(f"encoder.std={config.std} must be positive (pixels are divided by it), e.g. [1, 1, 1].")
    for key in ("layers", "embed_dims"):
        if not all(n >= 1 for n in getattr(config, key)):
            raise ConfigError(f"encoder.{key}={getattr(config, key)} must hold positive numbers.")
    if not all(r > 0 for r in config.mlp_ratios):
        raise ConfigError(f"encoder.mlp_ratios={config.mlp_ratios} must be positive.")


def stage_strides(config: FastViTConfig) -> list[int]:
    """Total stride of each stage's output (stem x4, then x2 per downsampling stage)."""
    strides, stride = [], STEM_STRIDE
    for downsample in config.downsamples:
        stride *= DOWNSAMPLE_STRIDE if downsample else 1
        strides.append(stride)
    return strides


# --------------------------------------------------------------------------------------------- encoder


class FastViT(VisionEncoder):
    """FastViT family member built from its config (generic name; defaults to a tiny stride-64 model)."""

    name = "fastvit"
    Config = FastViTConfig

    def __init__(self, config: FastViTConfig):
        super().__init__(config)
        validate(config)
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
        self.model.head = nn.Identity()  # global pool + classifier: a VLM takes the feature map
        if not config.final_conv:
            self.model.final_conv = nn.Identity()
        strides = stage_strides(config)
        self.stride = strides[-1]
        # One pooling per fused stage, from its stride down to the final one (a depthwise conv learns the pooling).
        self.fusion = nn.ModuleDict()
        for stage in sorted(config.fusion_stages):
            factor, width = self.stride // strides[stage], config.embed_dims[stage]
            self.fusion[str(stage)] = (
                nn.Conv2d(width, width, kernel_size=factor, stride=factor, groups=width)
                if config.fusion == "dwconv"
                else nn.AvgPool2d(kernel_size=factor, stride=factor)
            )
        final_width = int(config.embed_dims[-1] * config.cls_ratio) if config.final_conv else config.embed_dims[-1]
        self.width = final_width + sum(config.embed_dims[int(stage)] for stage in self.fusion)

    @property
    def provides(self) -> frozenset[str]:  # type: ignore[override]
        """ATTENTION when the last stage is an attention stage (FastViTHD, MCi2, MCi4): its last block's queries and
        keys lie on the output grid (the final conv keeps it), so token scores line up with the tokens."""
        return frozenset({ATTENTION}) if self.config.token_mixers[-1] == "attention" else frozenset()

    def _attention_block(self) -> nn.Module:
        return self.model.stages[-1].blocks[-1].token_mixer  # timm's FastViT Attention: a fused qkv Linear

    def request(self, needs: frozenset[str]) -> None:
        super().request(needs)
        self._captured: dict[str, torch.Tensor] = {}
        if ATTENTION in needs:  # a hook on this instance's own module: the attention kernel (SDPA) stays as it is
            self._attention_block().qkv.register_forward_hook(lambda module, args, out: self._captured.update(qkv=out))

    def notes(self) -> list[str]:
        if ATTENTION not in self.requested:
            return []
        kernel = "SDPA" if getattr(self._attention_block(), "fused_attn", True) else "timm's non-fused path"
        return [
            f"encoder '{self.name}' hands the last attention block's queries and keys (stage {len(self.config.layers) - 1}) "
            f"to the reducer through a forward hook on its qkv Linear; its attention kernel is unchanged ({kernel})."
        ]

    @property
    def form(self) -> str:
        """'inference' (reparameterized, fused) or 'train' (multi-branch)."""
        return "inference" if self.config.inference_mode else "train"

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            image_size=self.config.image_size,
            mean=tuple(self.config.mean),
            std=tuple(self.config.std),
            resize="pad",
            interpolation="bicubic",
        )

    def num_tokens(self, image_size: int | None = None) -> int:
        size = self.config.image_size if image_size is None else image_size
        check_multiple(self.name, size, self.stride)
        return (size // self.stride) ** 2

    def forward(self, ctx: StageContext) -> StageContext:
        # timm's forward_features (stem, stages, final conv), run stage by stage to catch the fused stages' maps.
        x = self.model.stem(ctx.pixel_values)
        fused = []
        for index, stage in enumerate(self.model.stages):
            x = stage(x)
            if str(index) in self.fusion:
                fused.append(self.fusion[str(index)](x))
        x = self.model.final_conv(x)
        if fused:  # a one-tensor cat would copy the whole map for nothing
            x = torch.cat([x, *fused], dim=1)
        layout = TokenLayout.grid_of(x.shape[2], x.shape[3], ctx.layout.image_size)
        attention = None
        if ATTENTION in self.requested:
            qkv = self._captured.pop("qkv")  # (B, N, 3 * heads * head_dim), as timm's Attention computes it
            heads = self._attention_block().num_heads
            q, k, _ = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            attention = Attention(queries=q, keys=k, num_prefix_tokens=0)
        return replace(ctx, tokens=x.flatten(2).transpose(1, 2), layout=layout, attention=attention)

    def reparameterize(self) -> None:
        """Fuse the multi-branch train form into the inference form, in place (same outputs, fewer ops)."""
        reparameterize_model(self.model, inplace=True)
        self.config.inference_mode = True

    def convert_weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This encoder's own state dict as it is; timm FastViT names or the official ml-fastvlm / MobileCLIP names
        (as a FastVLM checkpoint stores its tower; any `head.*` dropped) under this encoder's keys."""
        if any(key.startswith("model.") for key in tensors):
            return tensors
        return {f"model.{key}": value for key, value in convert_mci_state_dict(tensors).items()}

    def load_weights(self, path: str) -> None:
        """Encoder weights from a local file: this encoder's own state_dict, timm FastViT keys, or the official
        ml-fastvlm / MobileCLIP names (any `head.*` is dropped). Loaded strictly."""
        tensors = read_tensors(path)
        what = f"encoder '{self.name}' (encoder.weights={path})"
        if any(key.startswith("model.") for key in tensors):  # saved from this class: fusion weights included
            load_state_dict_strict(self, tensors, what)
            return
        tensors = convert_mci_state_dict(tensors)
        checkpoint_form = _form_of(tensors)
        if checkpoint_form and checkpoint_form != self.form:
            layout, setting = _FORMS[checkpoint_form]
            raise CheckpointError(
                f"{path} holds {checkpoint_form}-form ({layout}) FastViT weights but {what} is built in {self.form} "
                f"form: set encoder.inference_mode={setting}."
            )
        load_state_dict_strict(self.model, tensors, what)  # fusion poolings, if any, keep their initialization


# form -> (what its weights look like, the inference_mode setting that loads them)
_FORMS = {"train": ("multi-branch", "false (then reparameterize() fuses them)"), "inference": ("fused", "true")}


def _form_of(tensors: dict[str, torch.Tensor]) -> str | None:
    """'train' or 'inference' from the stem's key names (timm names); None when there is no stem."""
    stem = [key for key in tensors if key.startswith("stem.0.")]
    if any(".conv_kxk." in key for key in stem):
        return "train"
    if any(".reparam_conv." in key for key in stem):
        return "inference"
    return None


# ---------------------------------------------------------------------------------------- checkpoint keys

# Official (ml-fastvlm mci.py / MobileCLIP) -> timm names inside a module, as timm's checkpoint_filter_fn maps them,
# plus `lkb_reparam`, the fused large-kernel conv that timm's filter misses.
_RENAMES = (
    ("patch_embed.", "stem."),
    ("conv_exp.", "final_conv."),
    ("convffn.", "mlp."),
    ("se.reduce.", "se.fc1."),
    ("se.expand.", "se.fc2."),
    ("rbr_conv.", "conv_kxk."),
    ("rbr_scale.", "conv_scale."),
    ("rbr_skip.", "identity."),
    ("lkb_origin.", "large_conv."),
    ("lkb_reparam.", "reparam_conv."),
)
_LAYER_SCALE = re.compile(r"(layer_scale(?:_\d)?)$")  # official: a bare parameter; timm: LayerScale2d's .gamma
_NETWORK = re.compile(r"network\.(\d+)\.(.*)")


def convert_mci_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder keys in official ml-fastvlm / MobileCLIP names -> timm `FastVit` names; `head.*` dropped.

    Keys must be relative to the encoder (strip `model.vision_tower.vision_tower.model.` or similar first). Keys
    already in timm names pass through (minus `head.*`). Both forms map: train (multi-branch) and fused, including
    the 12 fused keys timm's own filter leaves behind in FastVLM checkpoints (`lkb_reparam`, and RepCPE's
    `network.{6,9}.reparam_conv` -> `stages.{3,4}.pos_emb.reparam_conv`).
    """
    official = any(key.startswith(("network.", "patch_embed.")) for key in state_dict)
    places = _network_places(state_dict) if official else {}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("head."):  # CLIP projection or classifier: not part of the encoder
            continue
        if official:
            for old, new in _RENAMES:
                key = key.replace(old, new)
            key = _LAYER_SCALE.sub(r"\1.gamma", key)
            match = _NETWORK.fullmatch(key)
            if match:
                place, rest = places[int(match.group(1))], match.group(2)
                key = f"{place}.{'pos_enc.' + rest[3:] if rest.startswith('pe.') else rest}"
        out[key] = value
    return out


def _network_places(state_dict: dict[str, torch.Tensor]) -> dict[int, str]:
    """Where each entry of the official flat `network` list goes in timm's `stages`.

    The list holds, per stage: its downsampling PatchEmbed (`.proj`), its RepCPE (`.pe` or fused `.reparam_conv`),
    then its blocks (`.0`, `.1`, ...). Reading the kinds from the keys works for every layout (MCi2's 4 stages,
    FastViTHD's 5) without being told the architecture; each run of blocks closes a stage.
    """
    kinds: dict[int, str] = {}
    for key in state_dict:
        match = _NETWORK.fullmatch(key)
        if not match:
            continue
        rest = match.group(2)
        if rest.startswith("proj."):
            kinds[int(match.group(1))] = "downsample"
        elif rest.startswith(("pe.", "reparam_conv.")):
            kinds[int(match.group(1))] = "pos_emb"
        elif rest.split(".")[0].isdigit():
            kinds[int(match.group(1))] = "blocks"
        else:
            raise CheckpointError(f"Checkpoint key {key} is not a FastViT downsample, RepCPE or block key.")
    places, stage = {}, 0
    for index in sorted(kinds):
        places[index] = f"stages.{stage}.{kinds[index]}"
        stage += kinds[index] == "blocks"
    return places


# ------------------------------------------------------------------------------------ registered presets


@dataclass
class FastViTHDConfig(FastViTConfig):
    image_size: int = 1024
    layers: list[int] = field(default_factory=lambda: [2, 12, 24, 4, 2])
    embed_dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768, 1536])


class FastViTHD(FastViT):
    """FastViTHD, FastVLM's encoder (timm fastvit_mci3): stride 64, 3072-wide tokens, 122.7M params."""

    name = "fastvithd"
    Config = FastViTHDConfig


@dataclass
class FastViTMCi4Config(FastViTConfig):
    image_size: int = 1024
    layers: list[int] = field(default_factory=lambda: [2, 12, 24, 4, 4])
    embed_dims: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])


class FastViTMCi4(FastViT):
    """FastViT MCi4 (MobileCLIP2-S4 image tower, timm fastvit_mci4): stride 64, 4096-wide tokens, 318M params."""

    name = "fastvit-mci4"
    Config = FastViTMCi4Config


@dataclass
class FastViTMCi2Config(FastViTConfig):
    image_size: int = 768  # 576 tokens, the paper's FastViT operating point
    layers: list[int] = field(default_factory=lambda: [4, 12, 24, 4])
    embed_dims: list[int] = field(default_factory=lambda: [80, 160, 320, 640])
    mlp_ratios: list[float] = field(default_factory=lambda: [3.0] * 4)
    token_mixers: list[str] = field(default_factory=lambda: ["repmixer"] * 3 + ["attention"])
    pos_embs: list[str | None] = field(default_factory=lambda: [None, None, None, "rcpe7"])
    downsamples: list[bool] = field(default_factory=lambda: [False, True, True, True])
    se_downsamples: list[bool] = field(default_factory=lambda: [False, False, True, True])
    norm: Literal["layernorm2d", "batchnorm"] = "batchnorm"
    stem_use_scale_branch: bool = True


class FastViTMCi2(FastViT):
    """FastViT MCi2 (FastVLM's 'FastViT' baseline, timm fastvit_mci2): stride 32, 1280-wide tokens."""

    name = "fastvit-mci2"
    Config = FastViTMCi2Config


class FastViTTiny(FastViT):
    """Tiny FastViTHD-shaped encoder (stride 64, 128-wide tokens) for tests and demos; milliseconds on a CPU."""

    name = "fastvit-tiny"
    Config = FastViTConfig  # the family defaults are this tiny model


@hookimpl
def register_encoders(register):
    for encoder in (FastViT, FastViTHD, FastViTMCi2, FastViTMCi4, FastViTTiny):
        register(encoder)
