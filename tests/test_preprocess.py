"""Preprocessing: FastVLM's pad-to-square, resize, [0, 1], mean/std; real image files through the CLI."""

from __future__ import annotations

import numpy as np
import torch
from conftest import run_json
from PIL import Image

from ablate.api.components import Preprocessing
from ablate.api.preprocessing import preprocess


def test_pad_to_black_square_then_resize():
    white_wide = Image.new("RGB", (200, 100), (255, 255, 255))
    pixels = preprocess(white_wide, Preprocessing(image_size=64))  # mean 0, std 1: plain [0, 1]
    assert pixels.shape == (3, 64, 64)
    assert torch.allclose(pixels[:, 0], torch.zeros(3, 64))  # black bar above
    assert torch.allclose(pixels[:, 32], torch.ones(3, 64))  # image in the middle
    assert torch.allclose(pixels[:, -1], torch.zeros(3, 64))  # black bar below


def test_mean_std_and_squash():
    grey = Image.new("RGB", (30, 10), (128, 128, 128))
    spec = Preprocessing(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="squash")
    pixels = preprocess(grey, spec)
    assert torch.allclose(pixels, torch.full((3, 16, 16), (128 / 255 - 0.5) / 0.25), atol=1e-6)


def test_center_crop_keeps_the_middle():
    array = np.zeros((10, 30, 3), dtype=np.uint8)
    array[:, 10:20] = 255  # a white middle third
    pixels = preprocess(
        Image.fromarray(array), Preprocessing(image_size=10, resize="center_crop", interpolation="nearest")
    )
    assert torch.allclose(pixels, torch.ones(3, 10, 10))


def test_run_with_a_real_image_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (10, 200, 30)).save(path)
    record = run_json("tiny", "--image", str(path), "--repeats", "1", "--warmup", "0")
    assert record["error"] is None and record["visual_tokens"] == 4


def test_unreadable_image_is_a_clear_error(tmp_path):
    from conftest import run_cli

    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    result = run_cli("run", "tiny", "--image", str(bad))
    assert result.returncode == 2 and "Cannot read image" in result.stderr and "Traceback" not in result.stderr
