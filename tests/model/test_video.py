"""Video input: preprocessing (model/video.py) against transformers' Qwen3VLVideoProcessor where
torchvision is installed (it is not in this project's environment; then the rules are checked
against the spec and the image processor's per-frame rows), placeholder/timestamp expansion and
M-RoPE positions against the reference's own functions, and logits against
Qwen3_5MoeForConditionalGeneration on the tiny random VL checkpoint of test_vision.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.batch import ForwardBatch
from model.checkpoint import load_model
from model.config import ModelConfig, VisionConfig
from model.image_processor import ImageProcessor, ImageProcessorConfig
from model.mrope import prepare_multimodal
from model.video import (Video, VideoError, VideoProcessor, VideoProcessorConfig, patch_times,
                         sample_indices)
from tests.model.test_vision import END, IMAGE, PROCESSOR, START, VIDEO, hf_vl_model, rel_err, text

TOL = 1e-4


class CharTokenizer:
    """Stands in for the real tokenizer in the tiny vocabulary: one id per character (< 240, so
    never a special id). Only the ids' agreement between both models matters here."""
    def encode(self, s: str) -> list[int]:
        return [ord(c) % 240 for c in s]


def frames(n: int, w: int, h: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


# ---- preprocessing -------------------------------------------------------------------------

REFERENCE_CASES = {
    "4 frames 64x64, defaults (upscaled)": (4, 64, 64, {}),
    "odd frame count": (5, 70, 50, {}),
    "over max_pixels (downscaled)": (6, 500, 300, {}),
    "small size limits": (3, 96, 64, dict(size={"shortest_edge": 32 * 32,
                                                "longest_edge": 4 * 64 * 64})),
    "cap_pixels_per_frame": (8, 640, 480, dict(cap_pixels_per_frame=True)),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_preprocessing_equals_transformers_video_processor(case):
    pytest.importorskip("torchvision", reason="the reference video processor needs torchvision, which "
                        "has no build that imports beside the pinned CPU torch 2.13")
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    n, w, h, kw = REFERENCE_CASES[case]
    clip = frames(n, w, h, seed=n)
    ref = Qwen3VLVideoProcessor(**{"cap_pixels_per_frame": False, **kw})(
        videos=[clip], do_sample_frames=False, return_tensors="pt")
    ours = VideoProcessor(VideoProcessorConfig.from_dict(kw))([Video(clip, fps=2)])
    assert ours.grid_thw.tolist() == ref["video_grid_thw"].tolist()
    assert torch.equal(ours.pixel_values, ref["pixel_values_videos"])


@pytest.mark.parametrize("n, w, h, grid", [
    (4, 64, 64, (2, 12, 12)),      # 4*64*64 < min: beta = sqrt(8); ceil(64*2.83/32)*32 = 192
    (5, 70, 50, (3, 10, 12)),      # t̄ = round(2.5)*2 = 4 counted, 5 frames padded to 6
    (6, 500, 300, (3, 16, 28)),    # 6*288*512 > max: floor(300/1.07/32)=8, floor(500/1.07/32)=14
    (4, 192, 192, (2, 12, 12)),    # 4*192*192 within limits: kept
])
def test_grid_follows_the_spec_resize_rule(n, w, h, grid):
    out = VideoProcessor()([Video(frames(n, w, h, seed=1), fps=2)])
    assert tuple(out.grid_thw[0].tolist()) == grid
    t, gh, gw = grid
    assert out.pixel_values.shape == (t * gh * gw, 3 * 2 * 16 * 16)


def test_defaults_are_the_reference_class_defaults():
    c = VideoProcessorConfig()
    assert (c.min_pixels, c.max_pixels) == (128 * 32 * 32, 32 * 32 * 768)
    assert c.image_mean == c.image_std == [0.5, 0.5, 0.5]
    assert (c.patch_size, c.temporal_patch_size, c.merge_size) == (16, 2, 2)
    assert (c.fps, c.min_frames, c.max_frames) == (2.0, 4, 768)


@pytest.mark.parametrize("n", [4, 3])
def test_rows_are_consecutive_frame_pairs_of_the_image_processor_rows(n):
    """At a size needing no resize, temporal patch k holds frames 2k and 2k+1 (the last frame
    repeated for an odd count) exactly where the image processor puts its (duplicated) frame."""
    clip = frames(n, 192, 192, seed=n)
    video_NCTL = VideoProcessor()([Video(clip, fps=2)]).pixel_values.reshape(-1, 3, 2, 256)
    images = ImageProcessor(ImageProcessorConfig(min_pixels=32 * 32, max_pixels=1 << 24))
    per_frame = [images([f]).pixel_values.reshape(-1, 3, 2, 256)[:, :, 0] for f in clip]
    per_frame += per_frame[-1:] * (n % 2)
    rows = 12 * 12
    for k, frame_NCL in enumerate(per_frame):
        got = video_NCTL[(k // 2) * rows:(k // 2 + 1) * rows, :, k % 2]
        # the reference folds 1/255 into mean/std; the image path rescales first: <= 1 ulp apart
        torch.testing.assert_close(got, frame_NCL, rtol=0, atol=1e-6)


def test_frames_of_different_sizes_and_bad_counts_are_rejected():
    with pytest.raises(VideoError, match="differ in size"):
        VideoProcessor()([Video(frames(2, 64, 64, 0) + frames(2, 64, 96, 1), fps=2)])
    with pytest.raises(VideoError, match="at least 2 frames"):
        VideoProcessor()([Video(frames(1, 64, 64, 0), fps=2)])
    with pytest.raises(VideoError, match="timestamps"):
        VideoProcessor()([Video(frames(4, 64, 64, 0), timestamps=[0.0, 0.5])])


def test_timestamps_equal_the_reference_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    reference = Qwen3VLProcessor._calculate_timestamps      # uses nothing of self
    for indices, fps in [([0, 1, 2, 3], 2.0), ([0, 12, 24, 36, 48], 24.0), ([3, 9, 15], 6.0)]:
        times = Video(list(indices), timestamps=[i / fps for i in indices]).times()
        assert patch_times(times, 2) == pytest.approx(reference(None, list(indices), fps, 2))
    assert Video([0] * 4, fps=2).times() == [0.0, 0.5, 1.0, 1.5]


def test_sample_indices_follow_the_reference_sampler():
    c = VideoProcessorConfig()
    assert sample_indices(300, 30.0, c).tolist() == np.linspace(0, 299, 20).round().astype(int).tolist()
    assert len(sample_indices(10, 30.0, c)) == 4              # at least min_frames
    assert len(sample_indices(3, 30.0, c)) == 3               # never more than the clip has


# ---- prompt expansion and positions ---------------------------------------------------------

def test_placeholder_expansion_renders_timestamped_patches():
    cfg = ModelConfig(vision=VisionConfig(out_hidden_size=ModelConfig().hidden_size))
    enc = CharTokenizer().encode
    clip = Video(frames(5, 64, 64, 0), timestamps=[0.0, 0.4, 1.0, 1.6, 2.0])
    S, V, E = cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id
    mm = prepare_multimodal([7, S, V, E, 8], [], ImageProcessor(), cfg, videos=[clip],
                            tokenizer=CharTokenizer())
    per_patch = [S] + [V] * 36 + [E]
    expected = [7, S] + enc("<0.2 seconds>") + per_patch + enc("<1.3 seconds>") + per_patch \
        + enc("<2.0 seconds>") + per_patch + [E, 8]
    assert mm.token_ids == expected
    assert mm.video_grid_thw.tolist() == [[3, 12, 12]]
    assert mm.video_rows(0, len(expected)) == (0, 108)
    text_only = prepare_multimodal([7, 8], [], ImageProcessor(), cfg)
    assert not text_only.video_mask(0, 3).any() and text_only.video_rows(0, 2) == (0, 0)
    with pytest.raises(VideoError, match="1 video placeholder"):
        prepare_multimodal([S, V, E], [], ImageProcessor(), cfg, videos=[clip, clip],
                           tokenizer=CharTokenizer())
    with pytest.raises(VideoError, match="tokenizer"):
        prepare_multimodal([S, V, E], [], ImageProcessor(), cfg, videos=[clip])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = hf_vl_model()
    out = tmp_path_factory.mktemp("hf-vl-video")
    ref.save_pretrained(out)
    return ref, load_model(out, dtype=torch.float32)


def vl_prompt(parts, ours, video_cfg: VideoProcessorConfig | None = None):
    """parts: ints (that many random text tokens), PIL images and Videos, in prompt order."""
    ids, images, videos = [], [], []
    for i, part in enumerate(parts):
        if isinstance(part, int):
            ids += text(part, seed=i)
        elif isinstance(part, Video):
            ids += [START, VIDEO, END]
            videos.append(part)
        else:
            ids += [START, IMAGE, END]
            images.append(part)
    return prepare_multimodal(ids, images, ImageProcessor(PROCESSOR), ours.config, videos=videos,
                              video_processor=VideoProcessor(video_cfg), tokenizer=CharTokenizer())


def type_ids(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMAGE).int() + 2 * (ids == VIDEO).int()


def hf_logits(ref, mm) -> torch.Tensor:
    ids = torch.tensor([mm.token_ids])
    ref.model.rope_deltas = None
    with torch.no_grad():
        return ref(input_ids=ids, pixel_values=mm.pixel_values, image_grid_thw=mm.grid_thw,
                   pixel_values_videos=mm.pixel_values_videos, video_grid_thw=mm.video_grid_thw,
                   mm_token_type_ids=type_ids(ids), use_cache=False).logits[0]


def run_chunks(model, mm, splits: list[int], block_size: int = 16) -> torch.Tensor:
    """Our model over the prompt in chunks ending at `splits` (vision encoded once): [T, V]."""
    T = len(mm.token_ids)
    n_blocks = T // block_size + 1
    cache = model.new_cache(num_blocks=n_blocks + 1, block_size=block_size, num_slots=2)
    table = list(range(1, n_blocks + 1))
    with torch.no_grad():
        image_MH = None if mm.pixel_values is None else model.encode_images(mm.pixel_values, mm.grid_thw)
        video_MH = model.encode_videos(mm.pixel_values_videos, mm.video_grid_thw)
        out, start = [], 0
        for end in splits + [T]:
            ids = torch.tensor(mm.token_ids[start:end])
            images = None if image_MH is None else image_MH[slice(*mm.image_rows(start, end))]
            x_TH = model.embed(ids, image_embeds_MH=images,
                               video_embeds_MH=video_MH[slice(*mm.video_rows(start, end))],
                               video_mask_T=mm.video_mask(start, end))
            batch = ForwardBatch.build([end - start], [start], [table], [1], block_size,
                                       positions=mm.positions(start, end), logits="all")
            out.append(model(ids, batch, cache, inputs_embeds_TH=x_TH))
            start = end
    return torch.cat(out)


SMALL = VideoProcessorConfig(min_pixels=32 * 32, max_pixels=8 * 96 * 96)
CASES = {
    "4-frame video, text around": ([5, Video(frames(4, 64, 64, 1), fps=2.0), 7], None),
    "video then image, odd frames, small sizes": (
        [3, Video(frames(5, 96, 64, 2), timestamps=[0, 0.7, 1.3, 2.2, 3.1]), 4,
         Image.fromarray(np.full((64, 96, 3), 90, np.uint8)), 6], SMALL),
}


@pytest.mark.parametrize("case", list(CASES))
def test_positions_equal_reference_get_rope_index(pair, case):
    ref, ours = pair
    mm = vl_prompt(*CASES[case][:1], ours, CASES[case][1])
    ids = torch.tensor([mm.token_ids])
    pos, delta = ref.model.get_rope_index(ids, type_ids(ids), mm.grid_thw, mm.video_grid_thw)
    assert torch.equal(mm.positions_3T, pos[:, 0])
    assert mm.rope_delta == int(delta) < 0


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
    ref, ours = pair
    mm = vl_prompt(*CASES[case][:1], ours, CASES[case][1])
    assert rel_err(run_chunks(ours, mm, []), hf_logits(ref, mm)) < TOL


def test_chunks_splitting_a_video_span_match(pair):
    ref, ours = pair
    mm = vl_prompt(CASES["4-frame video, text around"][0], ours)
    at = [i for i, t in enumerate(mm.token_ids) if t == VIDEO]
    splits = [at[5], at[40], at[-1] + 2]            # inside patch 0, inside patch 1, then text
    assert rel_err(run_chunks(ours, mm, splits), hf_logits(ref, mm)) < TOL


def test_greedy_decode_after_a_video_matches_transformers_generate(pair):
    ref, ours = pair
    mm = vl_prompt([4, Video(frames(4, 64, 64, 3), fps=1.0), 5], ours, SMALL)
    ids = torch.tensor([mm.token_ids])
    ref.model.rope_deltas = None
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, pixel_values_videos=mm.pixel_values_videos,
                                video_grid_thw=mm.video_grid_thw, mm_token_type_ids=type_ids(ids),
                                max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    T, P = len(mm.token_ids), 16
    cache = ours.new_cache(num_blocks=8, block_size=P, num_slots=2)
    table = list(range(1, 8))
    with torch.no_grad():
        x_TH = ours.embed(torch.tensor(mm.token_ids), pixel_values_videos_NP=mm.pixel_values_videos,
                          video_grid_thw_V3=mm.video_grid_thw)
        batch = ForwardBatch.build([T], [0], [table], [1], P, positions=mm.positions(0, T))
        got = [int(ours(torch.tensor(mm.token_ids), batch, cache, inputs_embeds_TH=x_TH).argmax())]
        for t in range(T, T + len(expected) - 1):
            batch = ForwardBatch.build([1], [t], [table], [1], P, positions=mm.positions(t, t + 1))
            got.append(int(ours(torch.tensor(got[-1:]), batch, cache).argmax()))
    assert got == expected
