"""Images through the engine: greedy generation with images equals `transformers`' generate on a
tiny random VL checkpoint and a teacher-forced full forward of our model (the image rows
scattered in one step); chunked prefill that splits an image span, preemption by recompute and a
batch mixing image and text requests change nothing; bad images reject only their request."""
from __future__ import annotations

import base64
import io

import pytest
import torch

from cluster.engine import LLM, Engine, EngineConfig, RequestError, SamplingParams
from model.batch import ForwardBatch, HybridCache
from model.checkpoint import load_model
from model.image_processor import ImageProcessor
from model.mrope import prepare_multimodal
from tests.cluster.engine.conftest import run_all
from tests.model.test_vision import END, IMAGE, PROCESSOR, START, hf_vl_model, image, text

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
VL_PROMPT = "Describe <|vision_start|><|image_pad|><|vision_end|> briefly."


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers model, our model of the same weights)."""
    ref = hf_vl_model(seed=1)
    out = tmp_path_factory.mktemp("hf-vl-engine")
    ref.save_pretrained(out)
    return ref, load_model(out, dtype=torch.float32)


def vl_engine(model, tokenizer, num_blocks: int | None = None, **settings) -> Engine:
    """An engine over `model` with the small-image processor (PROCESSOR) of the HF pair."""
    settings.setdefault("kv_cache_memory", 8 << 20)
    config = EngineConfig(**settings)
    if num_blocks is not None:
        cfg = model.config
        config.kv_cache_memory = (
            num_blocks * HybridCache.bytes_per_block(cfg, config.block_size, torch.float32)
            + config.max_num_seqs * HybridCache.bytes_per_slot(cfg, torch.float32))
    return Engine(model, tokenizer, config, [], ImageProcessor(PROCESSOR))


def vl_request(parts) -> dict:
    """parts: ints (that many random text tokens) and PIL images, in prompt order."""
    ids, images = [], []
    for i, part in enumerate(parts):
        if isinstance(part, int):
            ids += text(part, seed=i)
        else:
            ids += [START, IMAGE, END]
            images.append(part)
    return {"prompt_token_ids": ids, "images": images}


def run(engine: Engine, requests: dict, params: SamplingParams = GREEDY) -> dict:
    for rid, prompt in requests.items():
        engine.add_request(rid, prompt, params)
    return {rid: out.outputs[0].token_ids for rid, out in run_all(engine).items()}


def hf_generate(ref, request: dict, processor: ImageProcessor, cfg) -> list[int]:
    mm = prepare_multimodal(request["prompt_token_ids"], request["images"], processor, cfg)
    ids = torch.tensor([mm.token_ids])
    ref.model.rope_deltas = None
    with torch.no_grad():
        out = ref.generate(input_ids=ids, pixel_values=mm.pixel_values, image_grid_thw=mm.grid_thw,
                           mm_token_type_ids=(ids == IMAGE).int(), max_new_tokens=8,
                           do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def full_forward_argmax(model, mm, generated: list[int], block_size: int = 16) -> list[int]:
    """Teacher forcing from an empty cache: the argmax after each of prompt + generated[:-1]."""
    ids = mm.token_ids + generated
    T, blocks = len(ids), -(-len(ids) // block_size)
    cache = model.new_cache(num_blocks=blocks, block_size=block_size, num_slots=1)
    batch = ForwardBatch.build([T], [0], [list(range(blocks))], [0], block_size,
                               positions=mm.positions(0, T), logits="all")
    ids_T = torch.tensor(ids)
    with torch.inference_mode():
        x_TH = model.embed(ids_T, mm.pixel_values, mm.grid_thw, image_mask_T=mm.image_mask(0, T))
        logits_TV = model(ids_T, batch, cache, inputs_embeds_TH=x_TH)
    return logits_TV[len(mm.token_ids) - 1:-1].argmax(-1).tolist()


TWO_IMAGES = [4, image(96, 64, 5), 6, image(64, 128, 6), 5]


def test_greedy_with_images_matches_transformers_generate(hf_pair, tiny):
    ref, ours = hf_pair
    request = vl_request(TWO_IMAGES)
    expected = hf_generate(ref, request, ImageProcessor(PROCESSOR), ours.config)
    engine = vl_engine(ours, tiny.tokenizer)
    engine.add_request("a", request, GREEDY)
    out = run_all(engine)["a"]
    assert out.outputs[0].token_ids == expected
    assert out.prompt_token_ids.count(IMAGE) > 2              # placeholders expanded
    assert all(s.vision is None for r in engine.requests.values() for s in r.seqs)


def test_chunked_prefill_and_preemption_split_image_spans(hf_pair, tiny):
    """A 5-token budget splits every image span over chunks; 8 blocks of 8 tokens for 3
    sequences force preemption by recompute, which encodes the images again."""
    _, ours = hf_pair
    requests = {"two": vl_request(TWO_IMAGES), "one": vl_request([3, image(64, 64, 7), 2]),
                "text": vl_request([9])}
    roomy = vl_engine(ours, tiny.tokenizer)
    alone = {rid: run(roomy, {rid: prompt})[rid] for rid, prompt in requests.items()}
    crowded = vl_engine(ours, tiny.tokenizer, num_blocks=8, block_size=8, max_num_seqs=3,
                        max_num_batched_tokens=5)
    assert run(crowded, requests) == alone
    assert crowded.scheduler.num_preemptions > 0, "the settings should force preemption"
    assert crowded.cache.num_free_blocks == crowded.cache.num_blocks


def test_batch_mixing_image_and_text_requests_equals_each_alone(hf_pair, tiny):
    _, ours = hf_pair
    requests = {"img": vl_request([2, image(80, 48, 8), 3]), "text": vl_request([12]),
                "img2": vl_request([image(64, 64, 9), 4, image(48, 96, 10)]),
                "text2": vl_request([5])}
    # a text request that emits <|image_pad|> must keep it an ordinary token in a mixed step
    requests["pad"] = {"prompt_token_ids": text(6, seed=3) + [IMAGE], "images": []}
    engine = vl_engine(ours, tiny.tokenizer, max_num_batched_tokens=24)
    together = run(engine, requests)
    for rid, prompt in requests.items():
        assert together[rid] == run(engine, {rid: prompt})[rid], rid


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    "corrupt bytes": ([b"definitely not an image"], "not a recognised image"),
    "truncated file": ([png_bytes(image(64, 64, 1))[:300]], "truncated"),
    "more images than placeholders": ([image(32, 32, 1), image(32, 32, 2)], "placeholder"),
    "s3 without a filesystem": (["s3://bucket/cat.png"], "filesystem"),
    "http url": (["https://example.com/cat.png"], "not fetched"),
    "not a list": (image(32, 32, 1), "must be a list"),
}


def test_bad_images_reject_only_their_request(hf_pair, tiny):
    _, ours = hf_pair
    good = vl_request([3, image(64, 64, 11), 2])
    engine = vl_engine(ours, tiny.tokenizer, max_num_batched_tokens=16)
    expected = run(engine, {"good": good})["good"]
    engine.add_request("good", good, GREEDY)
    engine.step()                                         # mid-prefill of the good request
    ids = good["prompt_token_ids"]
    for name, (images, message) in BAD.items():
        with pytest.raises(RequestError, match=message):
            engine.add_request(name, {"prompt_token_ids": ids, "images": images}, GREEDY)
        assert list(engine.requests) == ["good"], name
    final = run_all(engine)
    assert list(final) == ["good"] and final["good"].outputs[0].token_ids == expected


# ---- the offline API on the tiny preset (a VL checkpoint) --------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), kv_cache_memory=8 << 20, max_num_seqs=8)


def data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def test_generate_with_images_equals_a_full_forward(llm, tiny_checkpoint):
    img = image(64, 64, 12)
    out = llm.generate({"prompt": VL_PROMPT, "images": [img]}, GREEDY)[0]
    mm = prepare_multimodal(llm.tokenizer.encode(VL_PROMPT), [img],
                            ImageProcessor.from_pretrained(tiny_checkpoint), llm.model.config)
    assert out.prompt_token_ids == mm.token_ids
    assert out.prompt_token_ids.count(llm.model.config.image_token_id) == 64   # 256x256 / 32^2
    got = out.outputs[0].token_ids
    assert len(got) == 8 and got == full_forward_argmax(llm.model, mm, got)
    text_only = llm.generate(VL_PROMPT.replace("<|image_pad|>", "x"), GREEDY)[0]
    assert text_only.outputs[0].token_ids != got            # the image changed the answer


def test_chat_with_image_parts(llm):
    img = image(64, 64, 12)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected_prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True, enable_thinking=False)
    expected = llm.generate({"prompt": expected_prompt, "images": [img]}, params)[0]
    for part in ({"type": "image_url", "image_url": {"url": data_url(img)}},
                 {"type": "image", "image": img}):
        conversation = [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}]
        out = llm.chat(conversation, params)[0]
        assert out.prompt_token_ids == expected.prompt_token_ids, part["type"]
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids, part["type"]
