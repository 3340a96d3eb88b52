"""Multimodal prompts: image placeholder expansion and the three M-RoPE position streams.

A prompt carries one `<|image_pad|>` per image (inside `<|vision_start|>...<|vision_end|>`);
expansion repeats it once per vision token of that image (t * h * w / merge**2). Positions then
come in three streams (T, H, W), one column per prompt token:

* a text run of n tokens: all three streams count cur .. cur+n-1, then cur += n;
* an image with patch grid (t, h, w): its tokens in raster order (frame, row, col) of the merged
  grid get T = cur + frame, H = cur + row, W = cur + col, then cur += max(h, w) / merge
  (not the token count).
* a video is pre-split into its temporal patches, each a grid (1, h, w) of `<|video_pad|>` tokens
  positioned like an image (the timestamp text and vision_start/end between them are text).

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
from model.video import (ProcessedVideos, Video, VideoError, VideoProcessor,
                         video_placeholder_ids)

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
                    merge: int, video_token_id: int | None = None,
                    video_grids: list[tuple[int, int, int]] = ()) -> tuple[torch.Tensor, int]:
    """(positions [3, T] int64, rope_delta) for an expanded prompt. video_grids: one (1, h, w)
    per temporal patch of every video, in order (see `split_video_grids`)."""
    grids = {image_token_id: list(grid_thw), video_token_id: list(video_grids)}
    used = {image_token_id: 0, video_token_id: 0}
    streams, cur, i = [], 0, 0
    while i < len(ids):
        if ids[i] in grids and used[ids[i]] < len(grids[ids[i]]):
            t, h, w = grids[ids[i]][used[ids[i]]]
            streams.append(image_positions(cur, t, h // merge, w // merge))
            i += t * (h // merge) * (w // merge)
            cur += max(h, w) // merge
            used[ids[i - 1]] += 1
            continue
        if ids[i] in grids:
            raise ImageError(f"expanded prompt has more vision tokens than the grids "
                             f"{grid_thw} (videos {list(video_grids)}) describe")
        n = text_run_length(ids, i, image_token_id, video_token_id)
        streams.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
        i, cur = i + n, cur + n
    if used[image_token_id] != len(grid_thw) or used[video_token_id] != len(video_grids) \
            or i != len(ids):
        raise ImageError(f"expanded prompt does not match the images' grids {grid_thw} "
                         f"(videos {list(video_grids)})")
    positions = np.concatenate(streams, axis=1) if streams else np.zeros((3, 0), np.int64)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return torch.from_numpy(positions.astype(np.int64)), delta


def text_run_length(ids: list[int], start: int, image_token_id: int,
                    video_token_id: int | None = None) -> int:
    n = start
    while n < len(ids) and ids[n] != image_token_id and ids[n] != video_token_id:
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
    pixel_values_videos: torch.Tensor | None = None     # [Nv, P] float32; None without videos
    video_grid_thw: torch.Tensor | None = None          # [V, 3] int64: (t, h, w) per video
    video_token_id: int | None = None

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
        return self.token_mask(self.image_token_id, start, end)

    def video_mask(self, start: int, end: int) -> torch.Tensor:
        """bool [end - start]: which of token indices start..end-1 are prompt video rows."""
        return self.token_mask(self.video_token_id, start, end)

    def token_mask(self, token_id: int | None, start: int, end: int) -> torch.Tensor:
        """token_id None (no videos): nothing matches."""
        T = len(self.token_ids)
        ids = torch.tensor(self.token_ids[min(start, T):min(end, T)], dtype=torch.long)
        inside = ids == (-1 if token_id is None else token_id)
        return torch.cat([inside, torch.zeros(max(end, T) - max(start, T), dtype=torch.bool)])

    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """Rows [a, b) of the request's vision-encoder output that belong to the image tokens
        among prompt indices start..end-1 (a chunk may split an image span)."""
        return self.token_rows(self.image_token_id, start, end)

    def video_rows(self, start: int, end: int) -> tuple[int, int]:
        """Rows [a, b) of the request's `encode_videos` output for prompt indices start..end-1."""
        return self.token_rows(self.video_token_id, start, end)

    def token_rows(self, token_id: int | None, start: int, end: int) -> tuple[int, int]:
        is_token = np.asarray(self.token_ids, dtype=np.int64) == (-1 if token_id is None else token_id)
        before = np.concatenate([[0], np.cumsum(is_token)])
        T = len(self.token_ids)
        return int(before[min(start, T)]), int(before[min(end, T)])


def prepare_multimodal(prompt_ids: list[int], images: list, processor: ImageProcessor,
                       cfg: ModelConfig, filesystem=None, max_images: int = MAX_IMAGES_PER_PROMPT,
                       max_decode_pixels: int = MAX_DECODE_PIXELS, *, videos: list[Video] = (),
                       video_processor: VideoProcessor | None = None,
                       tokenizer=None) -> MultimodalPrompt:
    """Decode and preprocess `images`, expand the prompt's placeholders, compute positions.

    images: PIL images, bytes, paths, s3:// URIs (through `filesystem`) or data: URLs, in the
    order of the prompt's `<|image_pad|>` placeholders. videos: `model.video.Video`s in the order
    of the prompt's `<|video_pad|>` placeholders, with `video_processor` (default: the reference
    defaults) and `tokenizer` (`.encode(text) -> ids`, for the timestamps). Raises ImageError
    (VideoError for videos) on any bad input.
    """
    if videos:
        return with_videos(prompt_ids, images, videos, processor, video_processor or VideoProcessor(),
                           cfg, tokenizer, filesystem, max_images, max_decode_pixels)
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


def split_video_grids(video_grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    """[V, 3] (t, h, w) -> one (1, h, w) per temporal patch: the timestamp text between a video's
    patches makes each its own vision run for M-RoPE."""
    return [(1, h, w) for t, h, w in video_grid_thw.tolist() for _ in range(t)]


def expand_videos(prompt_ids: list[int], videos: list[Video], processor: VideoProcessor,
                  cfg: ModelConfig, tokenizer, filesystem=None) -> tuple[list[int], ProcessedVideos]:
    """Preprocess `videos` and replace the k-th `<|video_pad|>` of the prompt by video k's
    timestamped placeholder ids (model/video.py)."""
    if tokenizer is None:
        raise VideoError("videos need a tokenizer (for their timestamp text)")
    merge = cfg.vision.spatial_merge_size
    vc = processor.cfg
    if (vc.merge_size, vc.patch_size, vc.temporal_patch_size) != (
            merge, cfg.vision.patch_size, cfg.vision.temporal_patch_size):
        raise VideoError(f"video processor config (patch {vc.patch_size}, temporal "
                         f"{vc.temporal_patch_size}, merge {vc.merge_size}) does not match the "
                         f"vision tower")
    found = sum(1 for t in prompt_ids if t == cfg.video_token_id)
    if found != len(videos):
        raise VideoError(f"prompt has {found} video placeholder(s) but {len(videos)} video(s) were "
                         f"given; each video needs exactly one <|video_pad|>")
    processed = processor(videos, filesystem)
    per_patch = iter(processed.tokens_per_patch(merge))
    times = iter(processed.times)
    ids = []
    for t in prompt_ids:
        if t != cfg.video_token_id:
            ids.append(t)
            continue
        ids += video_placeholder_ids(next(times), next(per_patch), tokenizer.encode,
                                     cfg.vision_start_token_id, cfg.video_token_id,
                                     cfg.vision_end_token_id)
    return ids, processed


def with_videos(prompt_ids: list[int], images: list, videos: list[Video],
                processor: ImageProcessor, video_processor: VideoProcessor, cfg: ModelConfig,
                tokenizer, filesystem, max_images: int, max_decode_pixels: int) -> MultimodalPrompt:
    """prepare_multimodal for a prompt with videos: expand the videos, then the images, then
    position every vision run."""
    if cfg.vision is None:
        raise VideoError("this checkpoint has no vision tower (config has no vision_config)")
    ids, vids = expand_videos(prompt_ids, videos, video_processor, cfg, tokenizer, filesystem)
    mm = prepare_multimodal(ids, images, processor, cfg, filesystem, max_images, max_decode_pixels)
    image_grids = [] if mm.grid_thw is None else [tuple(g) for g in mm.grid_thw.tolist()]
    pos, delta = mrope_positions(mm.token_ids, image_grids, cfg.image_token_id,
                                 cfg.vision.spatial_merge_size, cfg.video_token_id,
                                 split_video_grids(vids.grid_thw))
    mm.positions_3T, mm.rope_delta = pos, delta
    mm.pixel_values_videos, mm.video_grid_thw = vids.pixel_values, vids.grid_thw
    mm.video_token_id = cfg.video_token_id
    return mm
