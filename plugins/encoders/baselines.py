"""The vision towers of FastVLM's baselines, on timm models, with each system's own feature selection.

Each is the `timm` encoder with that system's defaults (so every timm option still works as an override):

* `clip-vit-l14-336`: CLIP ViT-L/14 at 336 px as LLaVA-1.5 (and MobileVLM-V2) use it: the output of block 22 of 24,
  before the final norm, CLS dropped: 576 tokens x 1024 (LLaVA `mm_vision_select_layer -2`, patch features).
* `siglip-so400m`: SigLIP-SO400M/14 at 384 px as LLaVA-OneVision uses it: the last of its 27 blocks and the
  attention-pooling head dropped, the output of block 26 taken before the final norm: 729 tokens x 1152 per crop.
* `convnext-l-clip`: LAION CLIP ConvNeXt-L, stride 32, 1536-wide (FastVLM table 4; ConvLLaVA's trunk).
* `convllava`: ConvLLaVA's tower: that trunk plus a fifth ConvNeXt stage (2x2 stride-2 downsampling to 3072 wide,
  6 blocks), stride 64: 144 / 256 / 576 tokens at 768 / 1024 / 1536 px; features are the last stage's map.

Facts and sources: shared/spec/baselines-and-reducers.md sections 4.2 and 4.4 (LLaVA-1.5 clip_encoder.py, LLaVA-NeXT
siglip_encoder.py, conv-llava convnext_encoder.py and scripts/stage_1.sh).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from timm.layers import LayerNorm, LayerNorm2d
from timm.models.convnext import ConvNeXtStage
from torch import nn

from ablate.components import Preprocessing
from ablate.errors import ConfigError
from ablate.hookspecs import hookimpl
from ablate_plugins.encoders.timm_encoder import TimmEncoder, TimmEncoderConfig


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
    for encoder in (ClipViTL14, SigLIP, ConvNeXtL, ConvLLaVA):
        register(encoder)
