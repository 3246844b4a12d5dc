"""``reportgen build``: manifest in, static site out.

The pipeline reads top to bottom: validated manifest -> model -> per batch of images: decode and
preprocess, run the model with attention capture, the three experiments, figures -> pages and
results.json -> the finished folder swapped in for the old one.

The site is built in a staging folder beside the output and swapped in only when complete, so an
interrupted or failed build leaves the previous site as it was. An output folder is only replaced
when it is empty or carries reportgen's marker file: a user's own folder is never deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import timm
import torch

import reportgen
from reportgen.capture import CaptureInfo
from reportgen.errors import ImageError, ModelLoadError, ReportgenError
from reportgen.experiments import (
    ImageResult,
    TokenLayout,
    attention_experiment,
    fraction_lowered,
    objects_experiment,
    rollout_experiment,
    summarise_pairs,
)
from reportgen.figures import write_colourbar, write_image_figures
from reportgen.imaging import open_image, preprocess
from reportgen.manifest import ImageEntry, Manifest, ObjectBox
from reportgen.models import LoadedModel, load_model
from reportgen.runner import ModelRunner
from reportgen.site import image_record, plain, write_site

log = logging.getLogger(__name__)

MARKER = ".reportgen-site"
DEFAULT_OUTPUT = Path("site")


@dataclass(frozen=True)
class BuildOptions:
    """How to run a build (things that do not change the numbers, except ``device``).

    Attributes:
        output: the site folder to (re)place.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        batch_size: images per forward pass.
        strict: stop at the first image that fails instead of reporting it on its card.
    """

    output: Path = DEFAULT_OUTPUT
    device: str = "auto"
    batch_size: int = 8
    strict: bool = False


@dataclass
class BuildReport:
    """What a build did: where it wrote, which images failed and why, warnings."""

    output: Path
    images: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


ProgressCallback = Callable[[int], None]


def build(manifest: Manifest, options: BuildOptions, progress: ProgressCallback | None = None) -> BuildReport:
    """Build the site for ``manifest``.

    Args:
        manifest: a validated manifest (with any command-line overrides applied).
        options: output folder, device, batch size, strictness.
        progress: called with the number of images just finished.

    Raises:
        ReportgenError: for an output folder that must not be replaced, a model that cannot be
            loaded, or (with ``strict``) the first failing image.
    """
    started = time.perf_counter()
    output = options.output.resolve()
    check_replaceable(output)
    loaded = load_model(manifest.model, options.device)
    report = BuildReport(output=output)
    staging = _staging_dir(output)
    try:
        results, records, capture = _analyse(manifest, options, loaded, staging, report, progress)
        colourbar = "assets/colourbar.png"
        write_colourbar(manifest.output.cmap, staging / colourbar)
        write_site(
            staging,
            run=run_metadata(manifest, loaded, capture),
            records=records,
            pairs=summarise_pairs(results),
            lowered=fraction_lowered(results),
            colourbar=colourbar,
        )
        (staging / MARKER).write_text("This folder was written by reportgen and is replaced by each build.\n")
        _swap_in(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    report.images = len(manifest.images)
    report.seconds = time.perf_counter() - started
    return report


def check_replaceable(output: Path) -> None:
    """Refuse to replace a folder reportgen did not make (unless it is empty)."""
    if output.exists() and not output.is_dir():
        raise ReportgenError(f"{output}: exists and is not a folder; choose another output with --output")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise ReportgenError(
            f"{output}: the folder is not empty and was not made by reportgen (no {MARKER} file in it); "
            "refusing to replace it. Choose another output folder with --output, or empty this one."
        )


def _staging_dir(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _swap_in(staging: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
        os.rename(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, output)


@dataclass
class _Prepared:
    entry: ImageEntry
    original: object
    tensor: torch.Tensor
    geometry: object
    view: object


def _analyse(manifest, options, loaded: LoadedModel, staging: Path, report: BuildReport, progress):
    runner = ModelRunner(loaded, manifest.attention)
    layout = TokenLayout(loaded.num_prefix_tokens, loaded.grid, loaded.patch_size)
    objects_for = _ObjectSource(manifest, report)
    results: list[ImageResult] = []
    records: list[dict] = []
    entries = list(manifest.images)
    for start in range(0, len(entries), options.batch_size):
        batch_entries = entries[start : start + options.batch_size]
        prepared: list[_Prepared] = []
        for entry in batch_entries:
            try:
                prepared.append(_prepare(entry, loaded.data_config))
            except ImageError as err:
                _fail(entry, str(err), options, report, results, records)
        if prepared:
            maps = runner.run(torch.stack([p.tensor for p in prepared]))
            for item, item_maps in zip(prepared, maps):
                try:
                    result = _experiments(item, item_maps, layout, objects_for)
                    figures = write_image_figures(
                        result, item.original, item.view, staging / "figures" / item.entry.slug,
                        f"figures/{item.entry.slug}", manifest.output.cmap, manifest.output.alpha,
                        loaded.num_prefix_tokens,
                    )
                except ImageError as err:
                    _fail(item.entry, str(err), options, report, results, records)
                    continue
                results.append(result)
                records.append(image_record(result, figures))
        if progress:
            progress(len(batch_entries))
    # Keep manifest order in the site whatever order failures were recorded in.
    order = {entry.slug: i for i, entry in enumerate(entries)}
    records.sort(key=lambda r: order[r["slug"]])
    return results, records, runner.capture_info


def _fail(entry: ImageEntry, message: str, options, report, results, records) -> None:
    if options.strict:
        raise ImageError(f"images[{entry.index}] (id {entry.id!r}): {message}")
    report.failed.append((entry.id, message))
    result = ImageResult(entry=entry, error=message)
    results.append(result)
    records.append(image_record(result, {}))


def _prepare(entry: ImageEntry, data_config: dict) -> _Prepared:
    original = open_image(entry.path)
    w, h = original.size
    for i, box in enumerate(entry.objects):
        if box.x1 > w or box.y1 > h:
            raise ImageError(
                f"objects[{i}] ({box.label!r}) box {list(box.as_tuple())} lies outside the {w}x{h} image"
            )
    tensor, geometry, view = preprocess(original, data_config)
    return _Prepared(entry, original, tensor, geometry, view)


def _experiments(item: _Prepared, maps, layout: TokenLayout, objects_for: "_ObjectSource") -> ImageResult:
    entry = item.entry
    objects = None
    if entry.kind == "multi":
        boxes, source, notes = objects_for(entry, item.original)
        objects = objects_experiment(maps, layout, item.geometry, boxes, source, notes)
    return ImageResult(
        entry=entry,
        size=item.original.size,
        geometry=item.geometry,
        attention=attention_experiment(maps, layout, item.geometry, entry.objects),
        rollout=rollout_experiment(maps, layout),
        objects=objects,
    )


class _ObjectSource:
    """Objects of an image: the manifest's boxes, else the detector's (loaded on first need)."""

    def __init__(self, manifest: Manifest, report: BuildReport):
        self.settings = manifest.detector
        self.report = report
        self._detector = None
        self._failure: str | None = None

    def __call__(self, entry: ImageEntry, image) -> tuple[tuple[ObjectBox, ...], str, tuple[tuple[str, str], ...]]:
        """(boxes, where they came from, notes on objects that could not be found)."""
        if entry.objects or self.settings.name is None:
            return entry.objects, "manifest", ()
        detector = self._load()
        if detector is None:
            return (), self.settings.name, (("objects", "none found: the detector could not be loaded (see the build's warning)"),)
        return tuple(detector.detect(image)), self.settings.name, ()

    def _load(self):
        if self._detector is None and self._failure is None:
            from reportgen.detector import load_detector

            try:
                self._detector = load_detector(self.settings.name, self.settings.threshold)
            except ModelLoadError as err:
                self._failure = str(err)
                self.report.warnings.append(
                    f"{err} Images with boxes in the manifest still get the objects experiment."
                )
        return self._detector


def generated_at() -> str:
    """Build time for the footer: SOURCE_DATE_EPOCH when set, for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def run_metadata(manifest: Manifest, loaded: LoadedModel, capture: CaptureInfo | None) -> dict:
    """Everything about the run a reader (or script) needs to interpret the numbers."""
    config = loaded.data_config
    heads = getattr(loaded.model.blocks[0].attn, "num_heads", None) if loaded.depth else None
    return {
        "title": manifest.output.title,
        "generated": generated_at(),
        "model": {
            "name": loaded.name,
            "architecture": loaded.architecture,
            "source": loaded.source,
            "weights_file": loaded.weights_file.name if loaded.weights_file else None,
            "weights_sha256": loaded.weights_sha256,
            "input_size": [int(config["input_size"][2]), int(config["input_size"][1])],
            "patch_size": list(loaded.patch_size),
            "grid": list(loaded.grid),
            "num_prefix_tokens": loaded.num_prefix_tokens,
            "depth": loaded.depth,
            "heads": heads,
            "data_config": plain({k: config.get(k) for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}),
        },
        "capture": plain(asdict(capture)) if capture else {"method": "not run (no image could be read)", "layers": [], "fused_attention": 0},
        "settings": {
            "head_fusion": manifest.attention.head_fusion,
            "discard_ratio": manifest.attention.discard_ratio,
            "detector": manifest.detector.name,
            "detector_threshold": manifest.detector.threshold,
            "cmap": manifest.output.cmap,
            "alpha": manifest.output.alpha,
        },
        "versions": {
            "reportgen": reportgen.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "transformers": _version("transformers"),
        },
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
