"""M-RoPE positions and placeholder expansion, against `transformers`' get_rope_index."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.config import ModelConfig
from model.image import ImageError
from model.image_processor import ImageProcessor, ImageProcessorConfig
from model.mrope import MultimodalPrompt, expand_placeholders, mrope_positions, prepare_multimodal

IMG = 248056


def hf_rope_index(ids: list[int], grids: list[tuple[int, int, int]], merge: int = 2):
    """transformers' Qwen3_5MoeModel.get_rope_index (it needs only the merge size from self)."""
    from transformers import Qwen3_5MoeModel
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(
        spatial_merge_size=merge)))
    fake.get_vision_position_ids = lambda *a, **k: Qwen3_5MoeModel.get_vision_position_ids(fake, *a, **k)
    t = torch.tensor([ids])
    pos, delta = Qwen3_5MoeModel.get_rope_index(fake, t, (t == IMG).int(),
                                                image_grid_thw=torch.tensor(grids))
    return pos[:, 0], int(delta)


def build(parts):
    """parts: ints (text tokens) and (t, h, w) grids; returns expanded ids and grids."""
    ids, grids = [], []
    for p in parts:
        if isinstance(p, int):
            ids += list(range(100, 100 + p))
        else:
            ids += [248053] + [IMG] * (p[0] * p[1] * p[2] // 4) + [248054]
            grids.append(p)
    return ids, grids


def test_documented_example():
    ids, grids = build([2, (1, 4, 6), 3])      # vision_start is the 3rd text token
    pos, delta = mrope_positions(ids, grids, IMG, 2)
    assert pos[0, :10].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6]
    assert pos[1, :10].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6]
    assert pos[2, :10].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6]
    assert delta == 6 + 4 - len(ids)


@pytest.mark.parametrize("parts", [
    [5, (1, 4, 6), 7],
    [(1, 2, 2)],                                     # only an image: 1 token
    [0, (1, 8, 4), 1, (1, 2, 10), 0],                # images back to back (via start/end tokens)
    [3, (1, 16, 16), 2, (1, 6, 4), 9, (1, 2, 2), 1],
    [12],                                            # text only
])
def test_positions_match_transformers(parts):
    ids, grids = build(parts)
    if not grids:
        pos, delta = mrope_positions(ids, grids, IMG, 2)
        assert delta == 0 and torch.equal(pos, torch.arange(len(ids)).expand(3, -1))
        return
    expected, expected_delta = hf_rope_index(ids, grids)
    pos, delta = mrope_positions(ids, grids, IMG, 2)
    assert torch.equal(pos, expected) and delta == expected_delta


def test_expand_placeholders_and_count_errors():
    assert expand_placeholders([1, IMG, 2, IMG], [2, 3], IMG) == [1, IMG, IMG, 2, IMG, IMG, IMG]
    with pytest.raises(ImageError, match="2 image placeholder.*1 image"):
        expand_placeholders([IMG, IMG], [4], IMG)


def test_prompt_positions_after_the_prompt_and_image_rows():
    ids, grids = build([2, (1, 4, 6), 3])
    pos, delta = mrope_positions(ids, grids, IMG, 2)
    mm = MultimodalPrompt(ids, None, torch.tensor(grids), pos, delta, IMG)
    T = len(ids)
    assert torch.equal(mm.positions(0, T), pos)
    assert mm.positions(T, T + 2).tolist() == [[T + delta, T + delta + 1]] * 3
    assert torch.equal(mm.positions(T - 1, T + 1)[:, 0], pos[:, -1])
    assert mm.image_rows(0, 3) == (0, 0) and mm.image_rows(0, T) == (0, 6)
    assert mm.image_rows(5, 7) == (2, 4) and mm.image_rows(T - 2, T + 5) == (6, 6)


def test_prepare_multimodal_end_to_end_and_errors():
    cfg = ModelConfig.preset("tiny")
    processor = ImageProcessor(ImageProcessorConfig())
    from PIL import Image
    img = Image.new("RGB", (300, 200), (1, 2, 3))
    mm = prepare_multimodal([7, 248053, IMG, 248054, 8], [img], processor, cfg)
    (t, h, w), = mm.grid_thw.tolist()
    assert (t, h, w) == (1, 14, 20)      # 300x200 -> 320x224 (up to min_pixels 65536)
    assert mm.token_ids.count(IMG) == h * w // 4 and len(mm.token_ids) == 4 + h * w // 4
    assert mm.pixel_values.shape == (h * w, 3 * 2 * 16 * 16)
    expected, delta = hf_rope_index(mm.token_ids, [(t, h, w)])
    assert torch.equal(mm.positions_3T, expected) and mm.rope_delta == delta
    with pytest.raises(ImageError, match="0 image placeholder.*1 image"):
        prepare_multimodal([7, 8], [img], processor, cfg)
    with pytest.raises(ImageError, match="1 image placeholder.*0 image"):
        prepare_multimodal([7, IMG], [], processor, cfg)
    with pytest.raises(ImageError, match="over the limit of 1"):
        prepare_multimodal([IMG, IMG], [img, img], processor, cfg, max_images=1)
    with pytest.raises(ImageError, match="not a recognised image"):
        prepare_multimodal([IMG], [b"garbage"], processor, cfg)
    text_cfg = ModelConfig.preset("tiny").with_overrides(vision=None)
    with pytest.raises(ImageError, match="no vision tower"):
        prepare_multimodal([IMG], [img], processor, text_cfg)
