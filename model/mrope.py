"""Multimodal prompts: image placeholder expansion and the three M-RoPE position streams.

A prompt carries one `<|image_pad|>` per image (inside `<|vision_start|>...<|vision_end|>`);
expansion repeats it once per vision token of that image (t * h * w / merge**2). Positions then
come in three streams (T, H, W), one column per prompt token:

* a text run of n tokens: all three streams count cur .. cur+n-1, then cur += n;
* an image with patch grid (t, h, w): its tokens in raster order (frame, row, col) of the merged
  grid get T = cur + frame, H = cur + row, W = cur + col, then cur += max(h, w) / merge
  (not the token count).

`rope_delta = (max position + 1) - prompt length` (<= 0 with images); every token after the
prompt (decode, or continued text) sits at position `index + rope_delta` on all three streams.

Legend: T prompt tokens (after expansion), N patch rows, P flattened patch, I images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.config import ModelConfig
from model.image import MAX_DECODE_PIXELS, ImageError, load_image
from model.image_processor import ImageProcessor

MAX_IMAGES_PER_PROMPT = 32


def check_placeholder_count(ids: list[int], num_images: int, image_token_id: int) -> None:
    found = sum(1 for t in ids if t == image_token_id)
    if found != num_images:
        raise ImageError(f"prompt has {found} image placeholder(s) but {num_images} image(s) were "
                         f"given; each image needs exactly one <|image_pad|>")


def expand_placeholders(ids: list[int], tokens_per_image: list[int], image_token_id: int) -> list[int]:
    """Each image placeholder token becomes `tokens_per_image[k]` copies (k = k-th placeholder)."""
    check_placeholder_count(ids, len(tokens_per_image), image_token_id)
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            out.extend([t] * tokens_per_image[k])
            k += 1
        else:
            out.append(t)
    return out


def mrope_positions(ids: list[int], grid_thw: list[tuple[int, int, int]], image_token_id: int,
                    merge: int) -> tuple[torch.Tensor, int]:
    """(positions [3, T] int64, rope_delta) for an expanded prompt."""
    streams, cur, i, k = [], 0, 0, 0
    while i < len(ids):
        if ids[i] == image_token_id:
            t, h, w = grid_thw[k]
            streams.append(image_positions(cur, t, h // merge, w // merge))
            i += t * (h // merge) * (w // merge)
            cur += max(h, w) // merge
            k += 1
            continue
        n = text_run_length(ids, i, image_token_id)
        streams.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
        i, cur = i + n, cur + n
    if k != len(grid_thw) or i != len(ids):
        raise ImageError(f"expanded prompt does not match the images' grids {grid_thw}")
    positions = np.concatenate(streams, axis=1) if streams else np.zeros((3, 0), np.int64)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return torch.from_numpy(positions.astype(np.int64)), delta


def text_run_length(ids: list[int], start: int, image_token_id: int) -> int:
    n = start
    while n < len(ids) and ids[n] != image_token_id:
        n += 1
    return n - start


def image_positions(cur: int, t: int, h: int, w: int) -> np.ndarray:
    """[3, t*h*w]: (frame, row, col) of the merged grid, raster order, offset by cur."""
    f, r, c = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([f.ravel(), r.ravel(), c.ravel()]) + cur


@dataclass
class MultimodalPrompt:
    """Everything the engine needs for one prompt with images (all on the CPU)."""
    token_ids: list[int]                    # expanded prompt ids, what actually runs
    pixel_values: torch.Tensor | None       # [N, P] float32; None without images
    grid_thw: torch.Tensor | None           # [I, 3] int64
    positions_3T: torch.Tensor              # [3, T] int64
    rope_delta: int
    image_token_id: int

    def positions(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of token indices start..end-1; indices past the prompt
        (generated tokens) are index + rope_delta on all three streams."""
        T = len(self.token_ids)
        inside = self.positions_3T[:, min(start, T):min(end, T)]
        after = torch.arange(max(start, T), max(end, T)) + self.rope_delta
        return torch.cat([inside, after.expand(3, -1)], dim=1)

    def image_mask(self, start: int, end: int) -> torch.Tensor:
        """bool [end - start]: which of token indices start..end-1 are prompt image rows (a
        generated <|image_pad|> past the prompt is an ordinary token)."""
        T = len(self.token_ids)
        inside = torch.tensor(self.token_ids[min(start, T):min(end, T)]) == self.image_token_id
        return torch.cat([inside, torch.zeros(max(end, T) - max(start, T), dtype=torch.bool)])

    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """Rows [a, b) of the request's vision-encoder output that belong to the image tokens
        among prompt indices start..end-1 (a chunk may split an image span)."""
        is_image = np.asarray(self.token_ids) == self.image_token_id
        before = np.concatenate([[0], np.cumsum(is_image)])
        T = len(self.token_ids)
        return int(before[min(start, T)]), int(before[min(end, T)])


def prepare_multimodal(prompt_ids: list[int], images: list, processor: ImageProcessor,
                       cfg: ModelConfig, filesystem=None, max_images: int = MAX_IMAGES_PER_PROMPT,
                       max_decode_pixels: int = MAX_DECODE_PIXELS) -> MultimodalPrompt:
    """Decode and preprocess `images`, expand the prompt's placeholders, compute positions.

    images: PIL images, bytes, paths, s3:// URIs (through `filesystem`) or data: URLs, in the
    order of the prompt's `<|image_pad|>` placeholders. Raises ImageError on any bad input.
    """
    if len(images) > max_images:
        raise ImageError(f"{len(images)} images in one prompt is over the limit of {max_images}")
    if images and cfg.vision is None:
        raise ImageError("this checkpoint has no vision tower (config has no vision_config)")
    check_placeholder_count(prompt_ids, len(images), cfg.image_token_id)
    if not images:
        ids = list(prompt_ids)
        pos = torch.arange(len(ids)).expand(3, -1).clone()
        return MultimodalPrompt(ids, None, None, pos, 0, cfg.image_token_id)
    merge = cfg.vision.spatial_merge_size
    if processor.cfg.merge_size != merge or processor.cfg.patch_size != cfg.vision.patch_size:
        raise ImageError(f"preprocessor_config.json (patch {processor.cfg.patch_size}, merge "
                         f"{processor.cfg.merge_size}) does not match the vision tower (patch "
                         f"{cfg.vision.patch_size}, merge {merge})")
    decoded = [load_image(im, filesystem, max_decode_pixels) for im in images]
    processed = processor(decoded)
    ids = expand_placeholders(prompt_ids, processed.tokens_per_image(merge), cfg.image_token_id)
    grids = [tuple(g) for g in processed.grid_thw.tolist()]
    pos, delta = mrope_positions(ids, grids, cfg.image_token_id, merge)
    return MultimodalPrompt(ids, processed.pixel_values, processed.grid_thw, pos, delta,
                            cfg.image_token_id)
