"""What each map method costs against its own floor, measured in one run.

The floor of the attention methods is the model's bare batched forward under inference mode; the
floor of the gradient methods is a bare batched forward + backward of the same model and batch
(the gradient of the summed top-1 logits, or of the label-free score of a headless model, with
respect to the input, timm's attention as the model has it). Each method runs through the Python
API (decoding, the model stage and the experiments; no site is written) on the same images.
Run by hand, not by the test suite:

    python bench/methods.py                                  # ViT-S/16, random weights, 16 images
    python bench/methods.py --model vit_base_patch16_224 --images 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import make_images  # noqa: E402  (the benchmark's images: varied sample photos)

from reportgen import Explainer  # noqa: E402
from reportgen.imaging import open_image, preprocess  # noqa: E402
from reportgen.model.loading import load_model  # noqa: E402

METHOD_SETS = {
    "attention + rollout": ("attention", "rollout"),
    "relevance": ("relevance",),
    "grad-rollout": ("grad-rollout",),
    "gradcam": ("gradcam",),
    "all": "all",
}
GRADIENT_SETS = {"relevance", "grad-rollout", "gradcam", "all"}


def floors(model: torch.nn.Module, batches: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of the bare forward, and of the bare forward + backward."""
    forward, backward = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                model(x)
        forward.append(time.perf_counter() - started)
        started = time.perf_counter()
        for x in batches:
            x = x.clone().requires_grad_(True)
            with torch.enable_grad():
                out = model(x)
                score = out.max(dim=-1).values.sum() if model.num_classes else (out * out.detach()).sum()
                torch.autograd.grad(score, x)
        backward.append(time.perf_counter() - started)
    return min(forward), min(backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the best counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="reportgen-methods-") as work:
        paths = [entry["file"] for entry in make_images(Path(work), args.images)]
        from reportgen.config import ModelSettings

        loaded = load_model(ModelSettings(name=args.model, pretrained=False), "cpu")
        inputs = [preprocess(open_image(p), loaded.data_config)[0] for p in paths]
        batches = [torch.stack(inputs[i : i + args.batch_size]) for i in range(0, len(inputs), args.batch_size)]
        forward, backward = floors(loaded.model, batches, args.repeats)
        print(f"{args.model} (random weights), {args.images} images, batch {args.batch_size}, "
              f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads")
        print(f"  floor: forward {forward:.2f} s ({1000 * forward / args.images:.0f} ms/image); "
              f"forward + backward {backward:.2f} s ({backward / forward:.2f} x the forward)")
        for label, methods in METHOD_SETS.items():
            explainer = Explainer(args.model, methods=methods, pretrained=False, device="cpu", batch_size=args.batch_size)
            explainer.explain(paths[: args.batch_size])  # load the model and warm up
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                explainer.explain(paths)
                times.append(time.perf_counter() - started)
            best = min(times)
            floor, name = (backward, "forward + backward") if label in GRADIENT_SETS else (forward, "forward")
            print(f"  {label:22s} {best:6.2f} s  {best / floor:.2f} x its floor ({name}); "
                  f"runs {', '.join(f'{t:.2f}' for t in times)} s, median {statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
