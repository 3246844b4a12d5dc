"""What each map method costs against its own floor, measured in one run.

The floor of the attention methods is the model's bare batched forward under inference mode; the
floor of the gradient methods is a bare batched forward + backward of the same model and batch
(the gradient of the summed top-1 logits, or of the label-free score of a headless model, with
respect to the input, timm's attention as the model has it). Each method runs through the Python
API (decoding, the model stage and the experiments; no site is written) on the same images.

Every time is taken twice: wall seconds, and the process's CPU seconds (all its threads). Wall time
is what a user waits for; it is inflated by any other process on the same cores, while the CPU
ratio counts the work done and holds under load. The goals are judged on both.
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


CLOCKS = ("wall", "cpu")


class Stopwatch:
    """Wall and process CPU seconds of a ``with`` block, as ``{"wall": s, "cpu": s}``."""

    def __enter__(self):
        self.started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = {"wall": time.perf_counter() - self.started[0], "cpu": time.process_time() - self.started[1]}


def best(runs: list[dict]) -> dict:
    """The best of ``runs`` on each clock."""
    return {clock: min(run[clock] for run in runs) for clock in CLOCKS}


def floor_passes(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[dict, dict]:
    """One timed bare forward over ``batches``, and one bare forward + backward."""
    with Stopwatch() as forward, torch.inference_mode():
        for x in batches:
            model(x)
    with Stopwatch() as backward:
        for x in batches:
            x = x.clone().requires_grad_(True)
            with torch.enable_grad():
                out = model(x)
                score = out.max(dim=-1).values.sum() if model.num_classes else (out * out.detach()).sum()
                torch.autograd.grad(score, x)
    return forward.seconds, backward.seconds


def measure(model_name: str, paths: list[Path], batch_size: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of each method set of :data:`METHOD_SETS` over ``paths``
    through the Python API, with the two floors measured in the same run: ``{"forward",
    "backward", "sets": {label: {"best", "times", "floor", "floor_name"}}}``, each time a
    ``{"wall", "cpu"}`` dict. Each round times the floors and then every set, so that a change in
    the machine's load during the run reaches floors and sets alike."""
    from reportgen.config import ModelSettings

    loaded = load_model(ModelSettings(name=model_name, pretrained=False), "cpu")
    inputs = [preprocess(open_image(p), loaded.data_config)[0] for p in paths]
    batches = [torch.stack(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    floor_passes(loaded.model, batches[:1])  # a process's first pass is several times slower than later ones
    explainers = {}
    for label, methods in METHOD_SETS.items():
        explainers[label] = Explainer(model_name, methods=methods, pretrained=False, device="cpu", batch_size=batch_size)
        explainers[label].explain(paths[:batch_size])  # load the model and warm up
    forwards, backwards, times = [], [], {label: [] for label in METHOD_SETS}
    for _ in range(repeats):
        forward, backward = floor_passes(loaded.model, batches)
        forwards.append(forward)
        backwards.append(backward)
        for label, explainer in explainers.items():
            with Stopwatch() as watch:
                explainer.explain(paths)
            times[label].append(watch.seconds)
    forward, backward = best(forwards), best(backwards)
    sets = {}
    for label in METHOD_SETS:
        floor, name = (backward, "forward + backward") if label in GRADIENT_SETS else (forward, "forward")
        sets[label] = {"best": best(times[label]), "times": times[label], "floor": floor, "floor_name": name}
    return {"forward": forward, "backward": backward, "sets": sets}


def speed_goals(measured: dict) -> list[tuple[str, bool]]:
    """Each gradient method <= 1.2 x its floor (forward + backward); all methods together <= 1.2 x
    that floor plus the report overhead of the attention build (its time minus the forward); each
    on the wall clock and on the CPU clock."""
    sets, found = measured["sets"], []
    for clock in CLOCKS:
        backward = measured["backward"][clock]
        for label in ("relevance", "grad-rollout", "gradcam"):
            taken = sets[label]["best"][clock]
            found.append((f"{clock}: {label} <= 1.2 x forward + backward ({taken:.2f} s vs limit {1.2 * backward:.2f} s; "
                          f"{taken / backward:.2f} x)", taken <= 1.2 * backward))
        overhead = sets["attention + rollout"]["best"][clock] - measured["forward"][clock]
        limit = 1.2 * backward + overhead
        taken = sets["all"]["best"][clock]
        found.append((f"{clock}: all methods <= 1.2 x forward + backward + the attention build's overhead ({taken:.2f} s "
                      f"vs limit {limit:.2f} s = 1.2 x {backward:.2f} + {overhead:.2f})", taken <= limit))
    return found


def report(measured: dict, indent: str = "  ") -> None:
    """Print the floors and each method set's time against its floor, on both clocks."""
    forward, backward = measured["forward"], measured["backward"]
    for clock in CLOCKS:
        print(f"{indent}{clock} floor: forward {forward[clock]:.2f} s; forward + backward {backward[clock]:.2f} s "
              f"({backward[clock] / forward[clock]:.2f} x the forward)")
    for label, m in measured["sets"].items():
        ratios = "; ".join(f"{clock} {m['best'][clock]:.2f} s = {m['best'][clock] / m['floor'][clock]:.2f} x" for clock in CLOCKS)
        runs = ", ".join(f"{t['wall']:.2f}" for t in m["times"])
        print(f"{indent}{label:22s} {ratios} its floor ({m['floor_name']}); wall runs {runs} s, "
              f"median {statistics.median(t['wall'] for t in m['times']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
