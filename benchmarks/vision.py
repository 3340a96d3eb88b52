"""Vision benchmarks, each figure beside its baseline measured in the same run.

  * preprocessing: images/s of ours (model/image.py + model/image_processor.py) vs transformers'
    Pillow image processor (Qwen2VLImageProcessorPil) on the same decoded PIL images, released
    preprocessor values (patch 16, merge 2, min 65536 / max 16777216 pixels), several sizes;
  * the vision encoder's share of prefill time on the `demo` preset (random weights, fp32):
    one image + text, vision encode vs the whole prefill (encode + embed + text model).

Run: python benchmarks/vision.py [--quick]
"""
import argparse
import pathlib
import sys
import time

sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from model.batch import ForwardBatch  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.hybrid import HybridForCausalLM  # noqa: E402
from model.image import load_image  # noqa: E402
from model.image_processor import ImageProcessor, ImageProcessorConfig  # noqa: E402
from model.mrope import prepare_multimodal  # noqa: E402
from model.random_checkpoint import randomize_  # noqa: E402

SIZES = [(320, 240), (640, 480), (1024, 768), (1920, 1080)]


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_images(w: int, h: int, n: int) -> list[Image.Image]:
    rng = np.random.default_rng(w * h)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def bench_preprocessing(repeats: int, n: int) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    cfg = ImageProcessorConfig()
    kw = {k: v for k, v in cfg.to_hf_dict().items()
          if k not in ("image_processor_type", "processor_class")}
    reference, ours = Qwen2VLImageProcessorPil(**kw), ImageProcessor(cfg)
    print(f"preprocessing ({n} images per call, best of {repeats}; images/s)")
    print(f"  {'size':>10} {'grid':>9} {'transformers':>13} {'ours':>10} {'speed-up':>9}")
    for w, h in SIZES:
        images = random_images(w, h, n)
        t_ref = best_time(lambda: reference(images=images, return_tensors="np"), repeats)
        t_ours = best_time(lambda: ours([load_image(i) for i in images]), repeats)
        grid = ours(images[:1]).grid_thw[0].tolist()
        print(f"  {w:>4}x{h:<5} {grid[1]:>4}x{grid[2]:<4} {n / t_ref:>13.1f} {n / t_ours:>10.1f} "
              f"{t_ref / t_ours:>8.2f}x")


def bench_encoder_share(repeats: int, image_size: tuple[int, int], text_tokens: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("demo")
    model = HybridForCausalLM.empty(cfg, torch.float32)
    randomize_(model, seed=0)
    model.eval()
    ids = list(range(1000, 1000 + text_tokens // 2)) + [cfg.vision_start_token_id,
                                                        cfg.image_token_id, cfg.vision_end_token_id]
    ids += list(range(2000, 2000 + text_tokens // 2))
    mm = prepare_multimodal(ids, random_images(*image_size, 1), ImageProcessor(), cfg)
    T, P = len(mm.token_ids), 64

    def encode():
        with torch.inference_mode():
            return model.encode_images(mm.pixel_values, mm.grid_thw)

    def prefill():
        with torch.inference_mode():
            cache = model.new_cache(num_blocks=T // P + 2, block_size=P, num_slots=1)
            batch = ForwardBatch.build([T], [0], [list(range(T // P + 1))], [0], P,
                                       positions=mm.positions(0, T))
            x_TH = model.embed(torch.tensor(mm.token_ids), image_embeds_MH=encode())
            return model(torch.tensor(mm.token_ids), batch, cache, inputs_embeds_TH=x_TH)

    encode(), prefill()
    pairs = [(best_time(encode, 1), best_time(prefill, 1)) for _ in range(repeats)]   # interleaved
    t_enc, t_all = min(p[0] for p in pairs), min(p[1] for p in pairs)
    share = float(np.median([e / a for e, a in pairs]))
    n_img = int(mm.grid_thw.prod())
    print(f"demo preset prefill, one {image_size[0]}x{image_size[1]} image ({n_img} patches -> "
          f"{n_img // 4} tokens) + {text_tokens} text tokens = {T} tokens, {repeats} interleaved pairs")
    print(f"  vision encoder {t_enc * 1e3:8.1f} ms")
    print(f"  whole prefill  {t_all * 1e3:8.1f} ms   encoder share {t_enc / t_all:.1%} of the best "
          f"times, median per-pair share {share:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    repeats = 2 if args.quick else 5
    bench_preprocessing(repeats, n=2 if args.quick else 4)
    bench_encoder_share(2 * repeats, (448, 448), 64)


if __name__ == "__main__":
    main()
