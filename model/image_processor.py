"""Image preprocessing exactly as the checkpoint's `preprocessor_config.json` says.

RGB image -> smart resize (bicubic, both sides multiples of patch*merge, pixel count within
[min_pixels, max_pixels]) -> rescale (1/255) -> normalise (mean, std) -> patchify: the image is
repeated `temporal_patch_size` times and cut into patch rows in merge-block-major order
(grid_h/m, grid_w/m, m, m), each row flattened as (C, T, p, p).

Rescale + normalise are one 256-entry lookup table per channel, computed with the reference's
own arithmetic (uint8 * scale in float64 -> float32, then (x - mean) / std in float32), so the
output equals the reference bit for bit; the patch reordering moves uint8 bytes, not floats.

Legend: N patch rows, P flattened patch (C*T*p*p), I images, C channels.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.image import ImageError


def config_kwargs(cls, raw: dict) -> dict:
    """The fields of dataclass `cls` found in a processor config file; `size.shortest_edge` /
    `size.longest_edge` are the min / max pixels when those are not given directly."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in raw.items() if k in names and v is not None}
    size = raw.get("size") or {}
    if "shortest_edge" in size and "min_pixels" not in raw:
        kw["min_pixels"] = size["shortest_edge"]
    if "longest_edge" in size and "max_pixels" not in raw:
        kw["max_pixels"] = size["longest_edge"]
    return kw


@dataclass
class ImageProcessorConfig:
    """Fields of preprocessor_config.json; the defaults are the released Qwen3.5 values."""
    min_pixels: int = 65536
    max_pixels: int = 16777216
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    resample: int = 3                      # PIL.Image.Resampling.BICUBIC

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @staticmethod
    def from_dict(raw: dict) -> "ImageProcessorConfig":
        return ImageProcessorConfig(**config_kwargs(ImageProcessorConfig, raw))

    @staticmethod
    def from_pretrained(path: str | Path) -> "ImageProcessorConfig":
        path = Path(path)
        file = path / "preprocessor_config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no preprocessor_config.json in {path}")
        return ImageProcessorConfig.from_dict(json.loads(file.read_text()))

    def to_hf_dict(self) -> dict:
        """preprocessor_config.json content, as the Qwen3.5 releases write it."""
        out = asdict(self)
        out["size"] = {"shortest_edge": out.pop("min_pixels"), "longest_edge": out.pop("max_pixels")}
        out.update(do_convert_rgb=True, image_processor_type="Qwen2VLImageProcessorFast",
                   processor_class="Qwen3VLProcessor")
        return out


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, aspect kept, pixels within the limits."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"image {width}x{height}: aspect ratio "
                         f"{max(height, width) / min(height, width):.1f} is over the limit of 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def value_table(cfg: ImageProcessorConfig) -> np.ndarray:
    """[C, 256] float32: the rescaled, normalised value of each uint8 level per channel."""
    levels = np.arange(256, dtype=np.float64)
    x = (levels * cfg.rescale_factor if cfg.do_rescale else levels).astype(np.float32)
    x = np.broadcast_to(x, (3, 256))
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class ProcessedImages:
    pixel_values: torch.Tensor         # [N, P] float32, images in order
    grid_thw: torch.Tensor             # [I, 3] int64: (temporal, patch rows, patch cols)

    def tokens_per_image(self, merge_size: int) -> list[int]:
        return [t * h * w // merge_size ** 2 for t, h, w in self.grid_thw.tolist()]


class ImageProcessor:
    def __init__(self, cfg: ImageProcessorConfig | None = None):
        self.cfg = cfg or ImageProcessorConfig()
        self.table_CL = value_table(self.cfg)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImageProcessor":
        return cls(ImageProcessorConfig.from_pretrained(path))

    def __call__(self, images: list[Image.Image]) -> ProcessedImages:
        rows, grids = [], []
        for image in images:
            patches_NP, grid = self.patchify(self.resize(image))
            rows.append(patches_NP)
            grids.append(grid)
        return ProcessedImages(torch.from_numpy(np.concatenate(rows)),
                               torch.tensor(grids, dtype=torch.long).reshape(-1, 3))

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) after resizing."""
        c = self.cfg
        if not c.do_resize:
            if height % c.factor or width % c.factor:
                raise ImageError(f"image {width}x{height}: with do_resize false both sides must be "
                                 f"multiples of {c.factor}")
            return height, width
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    def resize(self, image: Image.Image) -> np.ndarray:
        """[h, w, 3] uint8 at the target size."""
        if image.mode != "RGB":
            raise ImageError(f"image mode {image.mode}: convert to RGB first (model.image.load_image)")
        h, w = self.target_size(*image.size)
        if (w, h) != image.size:
            image = image.resize((w, h), resample=self.cfg.resample)
        return np.asarray(image)

    def patchify(self, pixels_hw3: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        p, m, T = self.cfg.patch_size, self.cfg.merge_size, self.cfg.temporal_patch_size
        h, w, C = pixels_hw3.shape
        gh, gw = h // p, w // p
        blocks = pixels_hw3.reshape(gh // m, m, p, gw // m, m, p, C)
        u8_NCL = blocks.transpose(0, 3, 1, 4, 6, 2, 5).reshape(gh * gw, C, p * p)
        channel_offset = (np.arange(C, dtype=np.intp) * 256)[None, :, None]
        values_NCL = self.table_CL.reshape(-1)[u8_NCL + channel_offset]
        patches = np.broadcast_to(values_NCL[:, :, None, :], (gh * gw, C, T, p * p))
        return patches.reshape(gh * gw, C * T * p * p), (1, gh, gw)
