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
    with torch.inference_mode():
        model(batches[0])  # a process's first pass is several times slower than later ones
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


def measure(model_name: str, paths: list[Path], batch_size: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of each method set of :data:`METHOD_SETS` over ``paths``
    through the Python API, with the two floors measured in the same run: ``{"forward",
    "backward", "sets": {label: {"best", "times", "floor", "floor_name"}}}``."""
    from reportgen.config import ModelSettings

    loaded = load_model(ModelSettings(name=model_name, pretrained=False), "cpu")
    inputs = [preprocess(open_image(p), loaded.data_config)[0] for p in paths]
    batches = [torch.stack(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    forward, backward = floors(loaded.model, batches, repeats)
    sets = {}
    for label, methods in METHOD_SETS.items():
        explainer = Explainer(model_name, methods=methods, pretrained=False, device="cpu", batch_size=batch_size)
        explainer.explain(paths[:batch_size])  # load the model and warm up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            explainer.explain(paths)
            times.append(time.perf_counter() - started)
        floor, name = (backward, "forward + backward") if label in GRADIENT_SETS else (forward, "forward")
        sets[label] = {"best": min(times), "times": times, "floor": floor, "floor_name": name}
    return {"forward": forward, "backward": backward, "sets": sets}


def speed_goals(measured: dict) -> list[tuple[str, bool]]:
    """Each gradient method <= 1.2 x its floor (forward + backward); all methods together <= 1.2 x
    that floor plus the report overhead of the attention build (its time minus the forward)."""
    sets, backward = measured["sets"], measured["backward"]
    found = []
    for label in ("relevance", "grad-rollout", "gradcam"):
        best = sets[label]["best"]
        found.append((f"{label} <= 1.2 x forward + backward ({best:.2f} s vs limit {1.2 * backward:.2f} s; "
                      f"{best / backward:.2f} x)", best <= 1.2 * backward))
    overhead = sets["attention + rollout"]["best"] - measured["forward"]
    limit = 1.2 * backward + overhead
    best = sets["all"]["best"]
    found.append((f"all methods <= 1.2 x forward + backward + the attention build's overhead ({best:.2f} s vs limit "
                  f"{limit:.2f} s = 1.2 x {backward:.2f} + {overhead:.2f})", best <= limit))
    return found


def report(measured: dict, indent: str = "  ") -> None:
    """Print the floors and each method set's time against its floor."""
    forward, backward = measured["forward"], measured["backward"]
    print(f"{indent}floor: forward {forward:.2f} s; forward + backward {backward:.2f} s ({backward / forward:.2f} x the forward)")
    for label, m in measured["sets"].items():
        print(f"{indent}{label:22s} {m['best']:6.2f} s  {m['best'] / m['floor']:.2f} x its floor ({m['floor_name']}); "
              f"runs {', '.join(f'{t:.2f}' for t in m['times'])} s, median {statistics.median(m['times']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the best counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="reportgen-methods-") as work:
        paths = [entry["file"] for entry in make_images(Path(work), args.images)]
        print(f"{args.model} (random weights), {args.images} images, batch {args.batch_size}, "
              f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads")
        measured = measure(args.model, paths, args.batch_size, args.repeats)
        report(measured)
        for text, ok in speed_goals(measured):
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
