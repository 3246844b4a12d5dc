"""What ``--evaluate`` costs against its floor, measured in one run (issue 16).

The floor is the bare batched forward (``forward_features`` and ``forward_head``, inference mode)
of exactly the perturbed inputs the evaluation scores, made before timing. The evaluation is
measured twice: the perturbation stage alone (:meth:`reportgen.model.perturbation.Perturber.curves`
on the same images' maps: making the inputs, the forwards and the scores) and the in-process build
with ``evaluate`` on minus the same build without it (everything the option adds: the curves,
localisation, agreement, the curves' figure, the records and pages). Run by hand, or through
``bench/run.py`` (``--evaluate-images``)::

    python bench/evaluate.py                                    # ViT-S/16, random weights, 8 images
    python bench/evaluate.py --model vit_base_patch16_224 --images 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The target: the evaluation at most this many times its floor.
TARGET = 1.2


def _manifest(path: Path, model: dict, entries: list[dict], evaluate: bool, random_orders: int) -> Path:
    data = {
        "title": "Benchmark, evaluate",
        "model": model,
        "detector": {"name": "none"},
        "images": entries,
        **({"evaluate": {"random_orders": random_orders}} if evaluate else {}),
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def measure(model: dict, entries: list[dict], batch_size: int, work: Path, random_orders: int = 5, repeats: int = 2) -> dict:
    """Seconds of the floor, the perturbation stage and the build's extra cost (best of ``repeats``)."""
    import torch

    from reportgen.builder import BuildOptions, build
    from reportgen.compute import Computation
    from reportgen.config import load_manifest
    from reportgen.model.perturbation import Perturber, Subject

    plain = load_manifest(_manifest(work / "manifest-plain.yaml", model, entries, False, random_orders))
    judged = load_manifest(_manifest(work / "manifest-evaluate.yaml", model, entries, True, random_orders))

    # The subjects: each image's input, maps and content, from the model stage without the evaluation.
    computation = Computation(plain, "cpu", batch_size)
    results = list(computation.results(plain.images))
    loaded = computation.model_run.model
    from reportgen.imaging import open_image, preprocess

    subjects = [
        Subject(preprocess(open_image(r.entry.path), loaded.data_config)[0], r.maps, r.content.weights, r.geometry.content_box())
        for r in results
    ]
    perturber = Perturber(loaded, judged.evaluate.baseline, judged.evaluate.random_orders)
    groups = [subjects[i : i + batch_size] for i in range(0, len(subjects), batch_size)]
    inputs = [chunk for group in groups for chunk in perturber.inputs(group)]
    model_ = loaded.model
    forwards = sum(len(chunk) for chunk in inputs) + len(subjects)
    originals = [torch.stack([s.tensor for s in group]) for group in groups]

    def bare() -> None:
        with torch.inference_mode():
            for x in originals + inputs:
                features = model_.forward_features(x)
                model_.forward_head(features, pre_logits=not getattr(model_, "num_classes", 0))

    def stage() -> None:
        for group in groups:
            perturber.curves(group)

    def timed_once(function) -> float:
        started = time.perf_counter()
        function()
        return time.perf_counter() - started

    bare()  # warm-up
    # Interleaved, best of each: the load of other processes drifts, and only ever slows a pass down.
    floor = perturbation = float("inf")
    for _ in range(repeats):
        floor = min(floor, timed_once(bare))
        perturbation = min(perturbation, timed_once(stage))
    inputs.clear()  # the perturbed inputs are not needed for the builds
    del loaded, computation, results

    def built_once(manifest) -> float:
        return timed_once(lambda: build(
            manifest, BuildOptions(output=work / "site-evaluate", device="cpu", batch_size=batch_size, force=True)))

    without = with_evaluate = float("inf")
    for _ in range(repeats):  # interleaved too
        without, with_evaluate = min(without, built_once(plain)), min(with_evaluate, built_once(judged))
    return {
        "images": len(entries),
        "forwards": forwards,
        "floor": floor,
        "perturbation": perturbation,
        "build_without": without,
        "build_with": with_evaluate,
        "extra": with_evaluate - without,
    }


def report(found: dict) -> list[tuple[str, bool]]:
    """Printed lines, and the targets with whether each holds."""
    floor = found["floor"]
    print(f"  evaluate, {found['images']} images: {found['forwards']} forward passes "
          f"({found['forwards'] / found['images']:.0f} per image)")
    print(f"  floor: the bare batched forwards of the same perturbed inputs  {floor:8.2f} s")
    print(f"  perturbation stage (inputs, forwards, scores)               {found['perturbation']:8.2f} s  "
          f"{found['perturbation'] / floor:.2f} x floor")
    print(f"  build with evaluate - build without (best of each)          {found['extra']:8.2f} s  "
          f"{found['extra'] / floor:.2f} x floor  ({found['build_with']:.2f} - {found['build_without']:.2f} s)")
    return [
        (f"evaluate's perturbation stage <= {TARGET} x the bare forwards of its inputs "
         f"({found['perturbation']:.2f} s vs {floor:.2f} s; {found['perturbation'] / floor:.2f} x)",
         found["perturbation"] <= TARGET * floor),
        (f"evaluate's extra build time <= {TARGET} x the bare forwards of its inputs "
         f"({found['extra']:.2f} s vs {floor:.2f} s; {found['extra'] / floor:.2f} x)", found["extra"] <= TARGET * floor),
    ]


def main() -> None:
    from run import make_images, model_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--random-orders", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reportgen-evaluate-") as folder:
        work = Path(folder)
        images = make_images(work / "images", args.images)
        found = measure(model_section(args.model, None), [i["entry"] for i in images], args.batch_size, work,
                        args.random_orders, args.repeats)
    print(f"{args.model} (random weights), batch {args.batch_size}, {args.random_orders} random orders")
    for text, ok in report(found):
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
