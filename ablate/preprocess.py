"""Image preprocessing: decode, pad/resize, scale to [0, 1], normalize (timed apart from TTFT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ablate.components import Preprocessing
from ablate.errors import ConfigError

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read image {path}: {exc}. Give a PNG/JPEG file path with --image.") from None


def synthetic_image(size: int, seed: int = 0) -> Image.Image:
    """A deterministic noise image of the encoder's input size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


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
