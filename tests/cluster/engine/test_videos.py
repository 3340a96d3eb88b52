"""Videos through the engine and the offline API on the tiny VL preset. The model-level video
math is held to transformers in tests/model/test_video.py; here the engine (placeholder
expansion, timestamps through the real tokenizer, M-RoPE positions across steps, chunked
prefill over a video span) is held to a one-shot full forward of the same model."""
from __future__ import annotations

import pytest
import torch

from cluster.engine import LLM, RequestError, SamplingParams
from model.image_processor import ImageProcessor
from model.mrope import prepare_multimodal
from model.video import Video, VideoProcessor
from tests.cluster.engine.test_images import GREEDY, full_forward_argmax, image

VIDEO_PROMPT = "Watch <|vision_start|><|video_pad|><|vision_end|> and tell."


def clip(seed: int) -> Video:
    return Video([image(64, 64, seed + i) for i in range(4)], fps=2.0)


def full_forward_video_argmax(model, mm, generated: list[int]) -> list[int]:
    """full_forward_argmax with the video tokens written in as well."""
    ids = mm.token_ids + generated
    T, P = len(ids), 16
    blocks = -(-T // P)
    from model.batch import ForwardBatch
    cache = model.new_cache(num_blocks=blocks, block_size=P, num_slots=1)
    batch = ForwardBatch.build([T], [0], [list(range(blocks))], [0], P,
                               positions=mm.positions(0, T), logits="all")
    ids_T = torch.tensor(ids)
    with torch.inference_mode():
        x_TH = model.embed(ids_T, pixel_values_videos_NP=mm.pixel_values_videos,
                           video_grid_thw_V3=mm.video_grid_thw, video_mask_T=mm.video_mask(0, T))
        logits_TV = model(ids_T, batch, cache, inputs_embeds_TH=x_TH)
    return logits_TV[len(mm.token_ids) - 1:-1].argmax(-1).tolist()


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), kv_cache_memory=8 << 20, max_num_seqs=8)


@pytest.fixture(scope="module")
def mm_and_out(llm, tiny_checkpoint):
    video = clip(20)
    out = llm.generate({"prompt": VIDEO_PROMPT, "videos": [video]}, GREEDY)[0]
    mm = prepare_multimodal(llm.tokenizer.encode(VIDEO_PROMPT), [],
                            ImageProcessor.from_pretrained(tiny_checkpoint), llm.model.config,
                            videos=[video], video_processor=VideoProcessor.from_pretrained(
                                tiny_checkpoint), tokenizer=llm.tokenizer)
    return video, mm, out


def test_generate_with_a_video_equals_a_full_forward(llm, mm_and_out):
    video, mm, out = mm_and_out
    assert out.prompt_token_ids == mm.token_ids
    assert "seconds" in llm.tokenizer.decode(out.prompt_token_ids)     # timestamped patches
    got = out.outputs[0].token_ids
    assert len(got) == 8 and got == full_forward_video_argmax(llm.model, mm, got)
    text_only = llm.generate(VIDEO_PROMPT.replace("<|video_pad|>", "x"), GREEDY)[0]
    assert text_only.outputs[0].token_ids != got


def test_chunked_prefill_over_a_video_span_gives_the_same_tokens(tiny_checkpoint, mm_and_out):
    video, mm, out = mm_and_out
    chunky = LLM(str(tiny_checkpoint), kv_cache_memory=8 << 20, max_num_seqs=8,
                 max_num_batched_tokens=7)
    again = chunky.generate({"prompt": VIDEO_PROMPT, "videos": [video]}, GREEDY)[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


def test_chat_video_parts_and_bad_videos(llm, mm_and_out):
    video, _, out = mm_and_out
    conversation = [{"role": "user", "content": [
        {"type": "video", "video": {"frames": video.frames, "fps": 2.0}},
        {"type": "text", "text": "What happens?"}]}]
    chat = llm.chat(conversation, GREEDY)[0]
    assert chat.prompt_token_ids.count(llm.model.config.video_token_id) == \
        out.prompt_token_ids.count(llm.model.config.video_token_id)
    with pytest.raises(RequestError, match="video"):
        llm.generate({"prompt": VIDEO_PROMPT, "videos": [Video(video.frames[:1], fps=2.0)]},
                     GREEDY)
    with pytest.raises(RequestError, match="video"):
        llm.generate({"prompt": VIDEO_PROMPT, "videos": ["not a video"]}, GREEDY)
