"""Video input: frames the caller already sampled, with their times -> vision patch rows, and the
prompt tokens that stand for them. No video decoding here: a video is a list of frames (anything
`model.image.load_image` reads) plus each frame's time in seconds (or the rate they were taken at).

Preprocessing follows transformers' `Qwen3VLVideoProcessor` (its class defaults, overridden by the
checkpoint's video_preprocessor_config.json):

* one target size for the whole clip: `smart_resize` on (frames, height, width) whose pixel
  limits count all frames (`t̄·h̄·w̄` within [min_pixels, max_pixels], `t̄` = frames rounded to
  an even count), both sides multiples of patch*merge;
* resize with torch's antialiased bicubic on uint8 (the op the reference's torchvision backend
  calls on the CPU; Pillow's bicubic differs by one level on a few pixels);
* rescale+normalise fused as the reference does: `(x - mean/scale) / (std/scale)` in float32;
* an odd frame count repeats the last frame; consecutive frame pairs form one temporal patch, so
  `video_grid_thw = (frames/2, H_p, W_p)`; each patch row is flattened as (C, 2, p, p) in the
  same merge-block-major order as images.

In the prompt each video is one `<|video_pad|>` (the chat template wraps it in
`<|vision_start|>...<|vision_end|>`), replaced per temporal patch by
`<{sec:.1f} seconds><|vision_start|><|video_pad|> x (H_p*W_p/merge**2)<|vision_end|>`, where
sec is the mean time of the patch's two frames.

Legend: F frames, C channels, N patch rows, P flattened patch (C*2*p*p), V videos.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.image import ImageError, load_image
from model.image_processor import config_kwargs

MAX_DECODE_PIXELS_PER_FRAME = 1 << 25


class VideoError(ImageError):
    """A video input that cannot be used; the message names what is wrong."""


@dataclass
class Video:
    """Sampled frames in time order, and when each was taken: `timestamps` (seconds, one per
    frame) or `fps` (frame i at i / fps). With neither, the reference's fallback of 24 fps."""
    frames: list
    timestamps: list[float] | None = None
    fps: float | None = None

    def times(self) -> list[float]:
        if self.timestamps is not None:
            if len(self.timestamps) != len(self.frames):
                raise VideoError(f"video has {len(self.frames)} frames but "
                                 f"{len(self.timestamps)} timestamps")
            return [float(t) for t in self.timestamps]
        fps = 24.0 if self.fps is None else float(self.fps)
        if fps <= 0:
            raise VideoError(f"video fps must be positive, got {fps}")
        return [i / fps for i in range(len(self.frames))]


@dataclass
class VideoProcessorConfig:
    """Fields of video_preprocessor_config.json; defaults are Qwen3VLVideoProcessor's."""
    min_pixels: int = 128 * 32 * 32            # size.shortest_edge, all frames together
    max_pixels: int = 32 * 32 * 768            # size.longest_edge, all frames together
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    fps: float = 2.0                           # for sample_indices
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False         # the reference's default until it flips it
    max_video_tokens: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @staticmethod
    def from_dict(raw: dict) -> "VideoProcessorConfig":
        return VideoProcessorConfig(**config_kwargs(VideoProcessorConfig, raw))

    @staticmethod
    def from_pretrained(path: str | Path) -> "VideoProcessorConfig":
        """video_preprocessor_config.json, else preprocessor_config.json (the reference's own
        fallback order), else the defaults."""
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            file = Path(path) / name
            if file.exists():
                return VideoProcessorConfig.from_dict(json.loads(file.read_text()))
        return VideoProcessorConfig()


def smart_resize_video(frames: int, height: int, width: int, cfg: VideoProcessorConfig,
                       max_pixels: int) -> tuple[int, int]:
    """Target (height, width) for all frames of a clip; pixel limits count t̄ frames."""
    factor, temporal = cfg.factor, cfg.temporal_patch_size
    if frames < temporal:
        raise VideoError(f"a video needs at least {temporal} frames, got {frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"video frames {width}x{height}: aspect ratio over the limit of 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def clip_max_pixels(frames: int, cfg: VideoProcessorConfig) -> int:
    """The pixel budget for a clip; with cap_pixels_per_frame each frame gets its share."""
    if not cfg.cap_pixels_per_frame:
        return cfg.max_pixels
    frame_cap = cfg.max_video_tokens * cfg.factor ** 2
    per_frame = max(min(frame_cap, cfg.max_pixels // frames), int(cfg.min_pixels * 1.05))
    return per_frame * frames


def sample_indices(total_frames: int, video_fps: float, cfg: VideoProcessorConfig) -> np.ndarray:
    """Which of a decoded clip's frames the reference would keep: cfg.fps per second, clamped
    to [min_frames, max_frames] and the clip length, spread evenly. Frame i's time is
    i / video_fps."""
    n = int(total_frames / video_fps * cfg.fps)
    n = min(max(n, cfg.min_frames), cfg.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(int)


def patch_times(times: list[float], temporal: int) -> list[float]:
    """Mean of the first and last frame time of each temporal patch (last time repeated to fill)."""
    times = list(times) + [times[-1]] * (-len(times) % temporal)
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


def timestamp_text(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


@dataclass
class ProcessedVideos:
    pixel_values: torch.Tensor         # [N, P] float32, videos in order
    grid_thw: torch.Tensor             # [V, 3] int64: (temporal patches, patch rows, patch cols)
    times: list[list[float]]           # per video, per temporal patch: seconds

    def tokens_per_patch(self, merge_size: int) -> list[int]:
        return [h * w // merge_size ** 2 for _, h, w in self.grid_thw.tolist()]


class VideoProcessor:
    def __init__(self, cfg: VideoProcessorConfig | None = None):
        self.cfg = cfg or VideoProcessorConfig()
        scale = self.cfg.rescale_factor if self.cfg.do_rescale else 1.0
        # the reference folds the rescale into mean/std (float32 tensor * python float)
        self.mean_C11 = (torch.tensor(self.cfg.image_mean) * (1.0 / scale)).view(-1, 1, 1)
        self.std_C11 = (torch.tensor(self.cfg.image_std) * (1.0 / scale)).view(-1, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VideoProcessor":
        return cls(VideoProcessorConfig.from_pretrained(path))

    def __call__(self, videos: list[Video], filesystem=None,
                 max_decode_pixels: int = MAX_DECODE_PIXELS_PER_FRAME) -> ProcessedVideos:
        rows, grids, times = [], [], []
        for video in videos:
            frames_FCHW = self.decode(video, filesystem, max_decode_pixels)
            patches_NP, grid = self.patchify(self.normalize(self.resize(frames_FCHW)))
            rows.append(patches_NP)
            grids.append(grid)
            times.append(patch_times(video.times(), self.cfg.temporal_patch_size))
        return ProcessedVideos(torch.cat(rows), torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
                               times)

    def decode(self, video: Video, filesystem, max_decode_pixels: int) -> torch.Tensor:
        """[F, C, H, W] uint8; every frame must have the same size."""
        if not isinstance(video, Video):
            raise VideoError(f"expected a model.video.Video, got {type(video).__name__}")
        if not 0 < len(video.frames) <= self.cfg.max_frames:
            raise VideoError(f"video has {len(video.frames)} frames; 1..{self.cfg.max_frames} "
                             "are accepted")
        video.times()                                   # validates timestamps early
        frames = [np.asarray(load_image(f, filesystem, max_decode_pixels)) for f in video.frames]
        sizes = {f.shape for f in frames}
        if len(sizes) != 1:
            raise VideoError(f"video frames differ in size: {sorted(sizes)}")
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()

    def resize(self, frames_FCHW: torch.Tensor) -> torch.Tensor:
        Fn, _, H, W = frames_FCHW.shape
        c = self.cfg
        if not c.do_resize:
            if H % c.factor or W % c.factor:
                raise VideoError(f"video frames {W}x{H}: with do_resize false both sides must be "
                                 f"multiples of {c.factor}")
            return frames_FCHW
        h, w = smart_resize_video(Fn, H, W, c, clip_max_pixels(Fn, c))
        if (h, w) == (H, W):
            return frames_FCHW
        return F.interpolate(frames_FCHW, size=[h, w], mode="bicubic", align_corners=False,
                             antialias=True)

    def normalize(self, frames_FCHW: torch.Tensor) -> torch.Tensor:
        x = frames_FCHW.to(torch.float32)
        if self.cfg.do_normalize:
            return (x - self.mean_C11) / self.std_C11
        return x * self.cfg.rescale_factor if self.cfg.do_rescale else x

    def patchify(self, x_FCHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        p, m, T = self.cfg.patch_size, self.cfg.merge_size, self.cfg.temporal_patch_size
        if pad := -x_FCHW.shape[0] % T:                 # odd count: repeat the last frame
            x_FCHW = torch.cat([x_FCHW, x_FCHW[-1:].expand(pad, -1, -1, -1)])
        Fn, C, H, W = x_FCHW.shape
        gt, gh, gw = Fn // T, H // p, W // p
        x = x_FCHW.reshape(gt, T, C, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)       # (t, h/m, w/m, m, m, C, T, p, p)
        return x.reshape(gt * gh * gw, C * T * p * p), (gt, gh, gw)


def video_placeholder_ids(times: list[float], tokens_per_patch: int, encode, start_id: int,
                          video_id: int, end_id: int) -> list[int]:
    """The ids one video's `<|video_pad|>` becomes: per temporal patch, its timestamp text
    (tokenised alone: it sits between special tokens, so in-context BPE gives the same ids),
    then the patch's vision tokens inside vision_start/vision_end."""
    out = []
    for seconds in times:
        out += list(encode(timestamp_text(seconds)))
        out += [start_id] + [video_id] * tokens_per_patch + [end_id]
    return out
