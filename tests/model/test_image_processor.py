"""Our preprocessing equals `transformers`' Pillow image processor (Qwen2VLImageProcessorPil),
both configured from the same preprocessor_config.json, bit for bit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.image import load_image
from model.image_processor import ImageProcessor, ImageProcessorConfig, smart_resize

RELEASED = ImageProcessorConfig()


def reference(config_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil.from_pretrained(config_dir)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("processor")
    (out / "preprocessor_config.json").write_text(json.dumps(RELEASED.to_hf_dict()))
    return out


def random_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("RGBA", "CMYK"):
        return Image.frombytes(mode, (w, h), rng.integers(0, 256, w * h * 4, dtype=np.uint8).tobytes())
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "P+transparency":
        img = rgb.convert("P")
        img.info["transparency"] = 7
        return img
    return rgb if mode == "RGB" else rgb.convert(mode)


CASES = [
    (1, 1, "RGB"),            # upscaled to min_pixels
    (640, 480, "RGB"),
    (300, 77, "L"),           # grayscale
    (123, 456, "RGBA"),       # composited onto white
    (513, 1027, "LA"),
    (96, 2000, "P"),          # tall, palette
    (200, 150, "P+transparency"),
    (333, 222, "CMYK"),
    (256, 256, "RGB"),        # exactly min_pixels, no resize
    (4160, 4100, "RGB"),      # 17.1 MP: downscaled to max_pixels
]


@pytest.mark.parametrize("w,h,mode", CASES, ids=[f"{w}x{h}-{m}" for w, h, m in CASES])
def test_matches_transformers_pillow_processor(config_dir, w, h, mode):
    img = random_image(w, h, mode, seed=w + h)
    expected = reference(config_dir)(images=[img], return_tensors="np")
    ours = ImageProcessor.from_pretrained(config_dir)([load_image(img)])
    assert ours.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert ours.pixel_values.dtype == torch.float32
    assert np.array_equal(ours.pixel_values.numpy(), expected["pixel_values"])


def test_several_images_concatenate_in_order(config_dir):
    imgs = [random_image(64, 300, "RGB", 1), random_image(500, 90, "L", 2)]
    expected = reference(config_dir)(images=imgs, return_tensors="np")
    ours = ImageProcessor.from_pretrained(config_dir)([load_image(i) for i in imgs])
    assert ours.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert np.array_equal(ours.pixel_values.numpy(), expected["pixel_values"])
    assert ours.tokens_per_image(2) == [t * h * w // 4 for t, h, w in ours.grid_thw.tolist()]


def test_non_default_config_values_are_honoured(tmp_path):
    cfg = ImageProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 64, patch_size=14,
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_hf_dict()))
    img = random_image(700, 300, "RGB", 3)
    expected = reference(tmp_path)(images=[img], return_tensors="np")
    ours = ImageProcessor.from_pretrained(tmp_path)([load_image(img)])
    assert ours.grid_thw.tolist() == expected["image_grid_thw"].tolist()
    assert np.array_equal(ours.pixel_values.numpy(), expected["pixel_values"])


def test_legacy_min_max_pixels_keys_are_read():
    cfg = ImageProcessorConfig.from_dict({"min_pixels": 100, "max_pixels": 200,
                                          "size": {"shortest_edge": 1, "longest_edge": 2}})
    assert (cfg.min_pixels, cfg.max_pixels) == (100, 200)
    cfg = ImageProcessorConfig.from_dict({"size": {"shortest_edge": 3, "longest_edge": 4}})
    assert (cfg.min_pixels, cfg.max_pixels) == (3, 4)


@pytest.mark.parametrize("h,w", [(1, 1), (480, 640), (10, 1999), (9000, 9000), (31, 33)])
def test_smart_resize_matches_transformers(h, w):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref
    assert smart_resize(h, w, 32, 65536, 16777216) == ref(h, w, 32, 65536, 16777216)


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300, 32, 65536, 16777216)
