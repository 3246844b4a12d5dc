"""``reportgen build``: manifest in, static site out.

The pipeline reads top to bottom: validated manifest -> model -> per batch of images: decode and
preprocess, run the model with attention capture, the three experiments, figures -> pages and
results.json -> the finished folder swapped in for the old one.

The site is built in a staging folder beside the output and swapped in only when complete, so an
interrupted or failed build leaves the previous site as it was. An output folder is only replaced
when it is empty or carries reportgen's marker file: a user's own folder is never deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

import reportgen
from reportgen.cache import STATUS_FILE, Status, image_key, read_status, reuse, settings_key
from reportgen.capture import CaptureInfo
from reportgen.errors import ImageError, ModelLoadError, ReportgenError
from reportgen.experiments import (
    ImageResult,
    ObjectTable,
    TokenLayout,
    attention_experiment,
    fraction_lowered,
    objects_experiment,
    rollout_experiment,
    summarise_pairs,
)
from reportgen.figures import write_colourbar, write_image_figures
from reportgen.imaging import Geometry, open_image, preprocess, source_size
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
        force: ignore the previous build's cache and recompute every image.
    """

    output: Path = DEFAULT_OUTPUT
    device: str = "auto"
    batch_size: int = 8
    strict: bool = False
    force: bool = False


@dataclass
class BuildReport:
    """What a build did: where it wrote, images reused from the cache, which failed and why, warnings."""

    output: Path
    images: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


ProgressCallback = Callable[[int], None]


def build(manifest: Manifest, options: BuildOptions, progress: ProgressCallback | None = None) -> BuildReport:
    """Build the site for ``manifest``.

    Args:
        manifest: a validated manifest (with any command-line overrides applied).
        options: output folder, device, batch size, strictness, cache use.
        progress: called with the number of images just finished.

    Raises:
        ReportgenError: for an output folder that must not be replaced, a model that cannot be
            loaded, or (with ``strict``) the first failing image.
    """
    started = time.perf_counter()
    output = options.output.resolve()
    check_replaceable(output, manifest)
    report = BuildReport(output=output)
    global_key = settings_key(manifest)
    previous = None if options.force else read_status(output, global_key, report.warnings)
    staging = _staging_dir(output)
    try:
        status = Status(settings_key=global_key)
        records: dict[str, dict] = {}
        todo: list[tuple[ImageEntry, str]] = []
        for entry in manifest.images:
            try:
                key = image_key(entry, global_key)
            except OSError as err:
                _fail(entry, f"{entry.path.name}: could not be read ({err.strerror or err})", options, report, records)
                _advance(progress)
                continue
            record = reuse(previous, entry, key, output, staging) if previous else None
            if record is None:
                todo.append((entry, key))
                continue
            records[entry.slug] = record
            status.entries[entry.slug] = {"key": key, "record": record}
            report.reused += 1
            _advance(progress)
        if todo:
            # Only now is a model needed: a rebuild with nothing changed never loads one.
            loaded = load_model(manifest.model, options.device)
            capture = _analyse(manifest, options, loaded, todo, staging, report, records, status, progress)
            status.model_run = model_run(loaded, capture)
        else:
            status.model_run = previous.model_run if previous else None
        ordered = [records[entry.slug] for entry in manifest.images]
        tables = _object_tables(ordered)
        colourbar = "assets/colourbar.png"
        write_colourbar(manifest.output.cmap, staging / colourbar)
        write_site(
            staging,
            run=run_metadata(manifest, status.model_run),
            records=ordered,
            pairs=summarise_pairs(tables),
            lowered=fraction_lowered(tables),
            colourbar=colourbar,
        )
        (staging / MARKER).write_text("This folder was written by reportgen and is replaced by each build.\n")
        (staging / STATUS_FILE).write_text(status.to_json() + "\n", encoding="utf-8")  # written last
        _swap_in(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    report.images = len(manifest.images)
    report.seconds = time.perf_counter() - started
    return report


def _advance(progress: ProgressCallback | None, count: int = 1) -> None:
    if progress:
        progress(count)


def _object_tables(records: list[dict]) -> list[ObjectTable]:
    """(base labels, plain, rollout similarities) of every image with objects."""
    tables = []
    for record in records:
        objects = record.get("objects")
        if objects and objects["objects"]:
            tables.append(
                (
                    [o["base_label"] for o in objects["objects"]],
                    np.asarray(objects["plain_similarity"], dtype=np.float64),
                    np.asarray(objects["rollout_similarity"], dtype=np.float64),
                )
            )
    return tables


def check_replaceable(output: Path, manifest: Manifest | None = None) -> None:
    """Refuse to replace a folder reportgen did not make (unless it is empty), or one holding the inputs."""
    if output.exists() and not output.is_dir():
        raise ReportgenError(f"{output}: exists and is not a folder; choose another output with --output")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise ReportgenError(
            f"{output}: the folder is not empty and was not made by reportgen (no {MARKER} file in it); "
            "refusing to replace it. Choose another output folder with --output, or empty this one."
        )
    if manifest is not None:
        inputs = [manifest.path, *(entry.path for entry in manifest.images)]
        if manifest.model.weights is not None:
            inputs.append(manifest.model.weights)
        inside = [p for p in inputs if output == Path(p).resolve() or output in Path(p).resolve().parents]
        if inside:
            raise ReportgenError(
                f"{output}: holds this build's own input {inside[0]}; replacing the folder would delete it. "
                "Choose another output folder with --output."
            )


def _staging_dir(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.*-*"):
        kind, _, pid = stale.name.rpartition("-")
        if kind in (f".{output.name}.building", f".{output.name}.old") and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = output.parent / f".{output.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _running(pid: int) -> bool:
    """Whether a process with this id exists (a staging folder of a running build is left alone)."""
    if pid == os.getpid():
        return False  # our own leftover from an earlier build in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


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
    key: str
    original: Image.Image
    tensor: torch.Tensor
    geometry: Geometry
    view: Image.Image


def _analyse(manifest, options, loaded: LoadedModel, todo, staging: Path, report, records, status, progress):
    """Run the model over the images in ``todo``; records and status entries are filled in place.

    Images are decoded in a background thread one batch ahead of the model, and nothing per image
    outlives its batch except its record, so memory does not grow with the number of images.
    """
    runner = ModelRunner(loaded, manifest.attention)
    layout = TokenLayout(loaded.num_prefix_tokens, loaded.grid, loaded.patch_size)
    objects_for = _ObjectSource(manifest, report)
    batches = [todo[i : i + options.batch_size] for i in range(0, len(todo), options.batch_size)]

    def prepare_batch(batch):
        prepared, failures = [], []
        for entry, key in batch:
            try:
                prepared.append(_prepare(entry, key, loaded.data_config))
            except ImageError as err:
                failures.append((entry, str(err)))
        return prepared, failures

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reportgen-decode") as decoder:
        upcoming = decoder.submit(prepare_batch, batches[0]) if batches else None
        for index in range(len(batches)):
            prepared, failures = upcoming.result()
            upcoming = decoder.submit(prepare_batch, batches[index + 1]) if index + 1 < len(batches) else None
            for entry, message in failures:
                _fail(entry, message, options, report, records)
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
                        _fail(item.entry, str(err), options, report, records)
                        continue
                    except Exception as err:  # a bug must cost one image, not the whole site
                        if options.strict:
                            raise
                        log.debug("image %s failed", item.entry.id, exc_info=True)
                        _fail(item.entry, f"internal error in reportgen ({type(err).__name__}: {err})", options, report, records)
                        continue
                    record = image_record(result, figures)
                    records[item.entry.slug] = record
                    status.entries[item.entry.slug] = {"key": item.key, "record": record}
            _advance(progress, len(batches[index]))
    return runner.capture_info


def _fail(entry: ImageEntry, message: str, options, report, records) -> None:
    if options.strict:
        raise ImageError(f"images[{entry.index}] (id {entry.id!r}): {message}")
    report.failed.append((entry.id, message))
    records[entry.slug] = image_record(ImageResult(entry=entry, error=message), {})


def _prepare(entry: ImageEntry, key: str, data_config: dict) -> _Prepared:
    original = open_image(entry.path)
    w, h = source_size(original)  # boxes are in the file's (upright) pixels, before any downscaling
    for i, box in enumerate(entry.objects):
        if box.x1 > w or box.y1 > h:
            raise ImageError(
                f"objects[{i}] ({box.label!r}) box {list(box.as_tuple())} lies outside the {w}x{h} image"
            )
    if original.size != (w, h):
        fx, fy = original.width / w, original.height / h
        entry = dataclasses.replace(entry, objects=tuple(
            dataclasses.replace(b, x0=b.x0 * fx, y0=b.y0 * fy, x1=b.x1 * fx, y1=b.y1 * fy) for b in entry.objects
        ))
    tensor, geometry, view = preprocess(original, data_config)
    return _Prepared(entry, key, original, tensor, geometry, view)


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


def model_run(loaded: LoadedModel, capture: CaptureInfo | None) -> dict:
    """The model, how attention was captured, and versions: cached with the images they produced."""
    config = loaded.data_config
    heads = getattr(loaded.model.blocks[0].attn, "num_heads", None) if loaded.depth else None
    return {
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
        "versions": {
            "reportgen": reportgen.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "transformers": _version("transformers"),
        },
    }


def run_metadata(manifest: Manifest, model_run: dict | None) -> dict:
    """Everything about the run a reader (or script) needs to interpret the numbers."""
    if model_run is None:  # every image failed on the first build: nothing was run
        model_run = {"model": None, "capture": None, "versions": {"reportgen": reportgen.__version__}}
    return {
        "title": manifest.output.title,
        "generated": generated_at(),
        **model_run,
        "settings": {
            "head_fusion": manifest.attention.head_fusion,
            "discard_ratio": manifest.attention.discard_ratio,
            "detector": manifest.detector.name,
            "detector_threshold": manifest.detector.threshold,
            "cmap": manifest.output.cmap,
            "alpha": manifest.output.alpha,
        },
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
