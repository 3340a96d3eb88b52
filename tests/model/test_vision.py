"""Vision-language logit parity with `transformers`' Qwen3_5MoeForConditionalGeneration on a tiny
random checkpoint (every parameter randomised, fp32, eager), read by our loader from its
`save_pretrained` directory. Our model runs with the [3, T] M-RoPE positions and the vision rows
scattered into the image placeholders, in one step, in chunks that split an image span, and in
greedy decode."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from model.batch import ForwardBatch
from model.checkpoint import load_model
from model.image_processor import ImageProcessor, ImageProcessorConfig
from model.mrope import prepare_multimodal
from model.random_checkpoint import random_value

TOL = 1e-4          # max |diff| relative to the logit scale, fp32
IMAGE, VIDEO, START, END = 250, 251, 252, 253
TEXT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                 mrope_section=[2, 1, 1], mrope_interleaved=True))
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
              num_position_embeddings=36)
# small min_pixels so images stay a few tokens each; the released values are tested elsewhere
PROCESSOR = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=256 * 256)


def hf_vl_model(seed: int = 0):
    import transformers as tf
    cfg = tf.Qwen3_5MoeConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE,
                              video_token_id=VIDEO, vision_start_token_id=START,
                              vision_end_token_id=END)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = tf.Qwen3_5MoeForConditionalGeneration(cfg).eval()
    for c in (model.config, model.config.text_config):
        c._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(2 * TEXT["num_hidden_layers"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_value(name, p, gen, scale))
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = hf_vl_model()
    out = tmp_path_factory.mktemp("hf-vl")
    ref.save_pretrained(out)
    return ref, load_model(out, dtype=torch.float32)


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def text(n: int, seed: int) -> list[int]:
    return torch.randint(0, 240, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def vl_prompt(parts, ours):
    """parts: ints (that many random text tokens) and PIL images, in prompt order."""
    ids, images = [], []
    for i, part in enumerate(parts):
        if isinstance(part, int):
            ids += text(part, seed=i)
        else:
            ids += [START, IMAGE, END]
            images.append(part)
    return prepare_multimodal(ids, images, ImageProcessor(PROCESSOR), ours.config)


def hf_logits(ref, mm) -> torch.Tensor:
    ids = torch.tensor([mm.token_ids])
    ref.model.rope_deltas = None
    with torch.no_grad():
        return ref(input_ids=ids, pixel_values=mm.pixel_values, image_grid_thw=mm.grid_thw,
                   mm_token_type_ids=(ids == IMAGE).int(), use_cache=False).logits[0]


def run_chunks(model, mm, splits: list[int], block_size: int = 16) -> torch.Tensor:
    """Our model over the prompt in chunks ending at `splits` (vision encoded once): [T, V]."""
    T = len(mm.token_ids)
    n_blocks = T // block_size + 1
    cache = model.new_cache(num_blocks=n_blocks + 1, block_size=block_size, num_slots=2)
    table = list(range(1, n_blocks + 1))
    with torch.no_grad():
        vision_MH = model.encode_images(mm.pixel_values, mm.grid_thw)
        out, start = [], 0
        for end in splits + [T]:
            ids = torch.tensor(mm.token_ids[start:end])
            a, b = mm.image_rows(start, end)
            x_TH = model.embed(ids, image_embeds_MH=vision_MH[a:b])
            batch = ForwardBatch.build([end - start], [start], [table], [1], block_size,
                                       positions=mm.positions(start, end), logits="all")
            out.append(model(ids, batch, cache, inputs_embeds_TH=x_TH))
            start = end
    return torch.cat(out)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = {
    "one image, text around": [5, image(64, 96, 1), 7],
    "image first": [image(100, 70, 2), 9],
    "two images of different sizes": [3, image(64, 64, 3), 4, image(160, 96, 4), 70],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
    ref, ours = pair
    mm = vl_prompt(CASES[case], ours)
    assert mm.rope_delta < 0
    assert rel_err(run_chunks(ours, mm, []), hf_logits(ref, mm)) < TOL


def test_chunked_prefill_splitting_an_image_span(pair):
    ref, ours = pair
    mm = vl_prompt(CASES["two images of different sizes"], ours)
    image_at = [i for i, t in enumerate(mm.token_ids) if t == IMAGE]
    splits = [image_at[2], image_at[-5], image_at[-1] + 3]     # inside both images, then text
    whole = run_chunks(ours, mm, [])
    chunked = run_chunks(ours, mm, splits)
    assert rel_err(chunked, whole) < 1e-5
    assert rel_err(chunked, hf_logits(ref, mm)) < TOL


def test_greedy_decode_matches_transformers_generate(pair):
    ref, ours = pair
    mm = vl_prompt([4, image(96, 64, 5), 6, image(64, 128, 6), 5], ours)
    ids = torch.tensor([mm.token_ids])
    ref.model.rope_deltas = None
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, pixel_values=mm.pixel_values,
                                image_grid_thw=mm.grid_thw, mm_token_type_ids=(ids == IMAGE).int(),
                                max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    T, P = len(mm.token_ids), 16
    cache = ours.new_cache(num_blocks=8, block_size=P, num_slots=2)
    table = list(range(1, 8))
    with torch.no_grad():
        x_TH = ours.embed(torch.tensor(mm.token_ids), mm.pixel_values, mm.grid_thw)
        batch = ForwardBatch.build([T], [0], [table], [1], P, positions=mm.positions(0, T))
        got = [int(ours(torch.tensor(mm.token_ids), batch, cache, inputs_embeds_TH=x_TH).argmax())]
        for t in range(T, T + len(expected) - 1):
            batch = ForwardBatch.build([1], [t], [table], [1], P, positions=mm.positions(t, t + 1))
            got.append(int(ours(torch.tensor(got[-1:]), batch, cache).argmax()))
    assert got == expected


def test_text_only_prompt_on_a_vl_checkpoint_matches(pair):
    ref, ours = pair
    mm = vl_prompt([40], ours)
    assert mm.rope_delta == 0 and mm.pixel_values is None
    ids = torch.tensor([mm.token_ids])
    ref.model.rope_deltas = None
    with torch.no_grad():
        expected = ref(input_ids=ids, use_cache=False).logits[0]
        batch = ForwardBatch.build([40], [0], [[1, 2, 3]], [1], 16, logits="all")
        got = ours(ids[0], batch, ours.new_cache(4, 16, 2))
    assert rel_err(got, expected) < TOL


def test_tiny_preset_is_a_vision_language_checkpoint(tiny_checkpoint):
    import json
    from safetensors import safe_open
    from model.config import ModelConfig
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["model_type"] == "qwen3_5_moe" and "vision_config" in raw and "text_config" in raw
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    assert (pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]) == (16, 2, 2)
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.startswith("model.visual.blocks.1.") for n in names)
    assert any(n.startswith("model.language_model.layers.") for n in names)

    model = load_model(tiny_checkpoint)
    assert model.model.visual.merger.norm.weight.std() > 0.01      # randomised, not LayerNorm init
    img = image(300, 200, 7)
    mm = prepare_multimodal([1, START, model.config.image_token_id, END, 2], [img],
                            ImageProcessor.from_pretrained(tiny_checkpoint), model.config)
    logits = run_chunks(model, mm, [len(mm.token_ids) // 2])
    assert torch.isfinite(logits).all()

    text_only = load_model(tiny_checkpoint, config=ModelConfig.from_pretrained(tiny_checkpoint)
                           .with_overrides(vision=None))            # model.visual.* is skipped
    assert not hasattr(text_only.model, "visual")


def test_packed_step_mixing_an_image_chunk_and_a_generated_image_pad_token(pair):
    """How the engine packs a step: sequence A prefills a chunk that splits an image; sequence B
    (text) decodes a sampled <|image_pad|> id, which must stay an ordinary token."""
    ref, ours = pair
    a = vl_prompt(CASES["two images of different sizes"], ours)
    b = vl_prompt([12], ours)
    split = [i for i, t in enumerate(a.token_ids) if t == IMAGE][3]
    b_ids = b.token_ids + [IMAGE]
    P = 16
    cache = ours.new_cache(num_blocks=32, block_size=P, num_slots=3)
    tables, slots = [list(range(1, 20)), [20, 21]], [2, 0]
    with torch.no_grad():
        vision_MH = ours.encode_images(a.pixel_values, a.grid_thw)
        ids = torch.tensor(a.token_ids[:split])          # A's first chunk, then B's prompt
        x = ours.embed(ids, image_embeds_MH=vision_MH[slice(*a.image_rows(0, split))])
        batch = ForwardBatch.build([split], [0], tables[:1], slots[:1], P,
                                   positions=a.positions(0, split), logits="none")
        ours(ids, batch, cache, inputs_embeds_TH=x)
        batch = ForwardBatch.build([12], [0], tables[1:], slots[1:], P, logits="none")
        ours(torch.tensor(b.token_ids), batch, cache)
        T = len(a.token_ids)
        ids = torch.tensor(a.token_ids[split:] + [IMAGE])
        mask = torch.cat([a.image_mask(split, T), b.image_mask(12, 13)])
        rows = vision_MH[slice(*a.image_rows(split, T))]
        x = ours.embed(ids, image_embeds_MH=rows, image_mask_T=mask)
        positions = torch.cat([a.positions(split, T), b.positions(12, 13)], dim=1)
        batch = ForwardBatch.build([T - split, 1], [split, 12], tables, slots, P,
                                   positions=positions, logits="last")
        got = ours(ids, batch, cache, inputs_embeds_TH=x)
        ref.model.rope_deltas = None
        expected_b = ref(input_ids=torch.tensor([b_ids]), use_cache=False).logits[0, -1]
    assert rel_err(got[0], hf_logits(ref, a)[-1]) < TOL
    assert rel_err(got[1], expected_b) < TOL
    with pytest.raises(ValueError, match="image placeholder rows"):
        ours.embed(ids, image_embeds_MH=rows)        # without the mask B's token is miscounted
