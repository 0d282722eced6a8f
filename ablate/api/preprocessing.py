"""Image preprocessing: decode, pad/resize, scale to [0, 1], normalize (timed apart from TTFT)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ablate.api.errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become `pixel_values` for an encoder (timm's pretrained-config idea)."""

    image_size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # "pad": pad to a square with `pad_color`, then resize (LLaVA 'pad', FastVLM);
    # "squash": resize to a square ignoring aspect; "center_crop": resize shortest side, crop the centre.
    resize: Literal["pad", "squash", "center_crop"] = "pad"
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    pad_color: tuple[int, int, int] = (0, 0, 0)


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file; images above PIL's decompression-bomb limit (about 179 megapixels) are refused."""
    try:
        with warnings.catch_warnings():  # large but decodable images are fine; the error case is handled below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ConfigError(
            f"Image {path} is too large to decode safely ({exc}). Downscale it first (VLM encoders take at most a "
            f"few thousand pixels a side), e.g. with PIL's Image.thumbnail."
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError for some corrupt headers
        raise ConfigError(f"Cannot read image {path}: {exc}. Give a PNG/JPEG file path with --image.") from None


def synthetic_image(size: int | tuple[int, int], seed: int = 0) -> Image.Image:
    """A deterministic noise image: `size` pixels square, or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def preprocess(image: Image.Image, spec: Preprocessing) -> torch.Tensor:
    """PIL image -> (3, S, S) float tensor as the encoder expects it."""
    size = spec.image_size
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize == "pad":  # LLaVA/FastVLM: pad to a square (black for mean 0) so nothing is cut or stretched
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), spec.pad_color)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas.resize((size, size), resample)
    elif spec.resize == "squash":
        image = image.resize((size, size), resample)
    else:  # center_crop
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), resample)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (pixels - mean) / std
