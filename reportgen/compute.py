"""The model stage of a build: decode and preprocess images, run the ViT with attention capture,
the three experiments and the figures, for the images the cache could not supply.

Kept apart from :mod:`reportgen.build` so that a rebuild with nothing to compute never imports
torch or timm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import timm
import torch
from PIL import Image

import reportgen
from reportgen.cache import model_identity
from reportgen.config import ImageEntry, Manifest, ObjectBox
from reportgen.errors import ImageError
from reportgen.experiments import (
    ImageResult,
    TokenLayout,
    attention_experiment,
    objects_experiment,
    rollout_experiment,
)
from reportgen.imaging import Geometry, open_image, preprocess, source_size
from reportgen.model.capture import CaptureInfo
from reportgen.model.loading import LoadedModel, load_model
from reportgen.model.runner import ModelRunner
from reportgen.site.figures import write_image_figures
from reportgen.site.pages import image_record, plain

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    entry: ImageEntry
    key: str
    original: Image.Image
    tensor: torch.Tensor
    geometry: Geometry
    view: Image.Image


def analyse(manifest: Manifest, options, todo, staging: Path, report, records, status, fail, progress) -> dict:
    """Load the model and run it over the images in ``todo``; records and status entries are
    filled in place, failures go to ``fail``. Returns the model-run description (see :func:`model_run`).

    Images are decoded in a background thread one batch ahead of the model, and nothing per image
    outlives its batch except its record, so memory does not grow with the number of images.
    """
    # Entered first, so the figure writer is shut down however this ends (also if the model
    # cannot be loaded); its thread imports seaborn while the model loads.
    with _FigureWriter(options.jobs, options.batch_size) as figures:
        if any(entry.kind == "multi" for entry, _key in todo):
            figures.preload(_import_seaborn)  # ~1 s of imports (pandas, scipy)
        loaded, report.model_load_seconds = kept_model(manifest, options)
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
                    fail(entry, message)
                if prepared:
                    maps = runner.run(torch.stack([p.tensor for p in prepared]))
                    for item, item_maps in zip(prepared, maps):
                        try:
                            result = _experiments(item, item_maps, layout, objects_for)
                        except Exception as err:  # reported per image, as ImageError or internal error
                            _record(item, None, err, records, status, fail)
                            continue
                        figures.submit(
                            item, result,
                            (result, item.original, item.view, staging, f"figures/{item.entry.slug}",
                             manifest.output.cmap, manifest.output.alpha,
                             loaded.num_prefix_tokens),
                        )
                for item, result, written in figures.finished():
                    _record(item, result, written, records, status, fail)
                if progress:
                    progress(len(batches[index]))
            for item, result, written in figures.finished(wait=True):
                _record(item, result, written, records, status, fail)
    return model_run(loaded, runner.capture_info)


def kept_model(manifest: Manifest, options) -> tuple[LoadedModel, float | None]:
    """The model for this manifest and device, and the seconds it took to load (``None`` when it
    came from ``options.model_cache``, which the caller keeps across builds, as ``--watch`` does).

    Raises:
        ModelLoadError: if it cannot be loaded.
    """
    cache = options.model_cache
    # The identity hashes a local weights file, so a file replaced under the same name is reloaded.
    key = json.dumps([model_identity(manifest.model), options.device], sort_keys=True) if cache is not None else None
    if cache is not None and key in cache:
        return cache[key], None
    started = time.perf_counter()
    loaded = load_model(manifest.model, options.device)
    seconds = time.perf_counter() - started
    if cache is not None:
        cache.clear()  # one model at a time: a replaced one is not kept alive
        cache[key] = loaded
    return loaded, seconds


def _import_seaborn() -> None:
    import seaborn  # noqa: F401  (for the similarity heatmaps: pandas and scipy come with it)


def prepare_for_rebuilds(manifest: Manifest, options) -> float | None:
    """Load the model into ``options.model_cache`` ahead of need and run it once on a blank
    image, so the first rebuild is as quick as the next (a process's first forward pass is
    several times slower than later ones); the figure libraries are imported too. Returns the
    seconds the load took, ``None`` if the model was already kept.

    Raises:
        ModelLoadError: if the model cannot be loaded.
    """
    loaded, seconds = kept_model(manifest, options)
    if seconds is not None:
        _channels, height, width = loaded.data_config["input_size"]
        ModelRunner(loaded, manifest.attention).run(torch.zeros(1, 3, height, width))
        _import_seaborn()
    return seconds


def _record(item: _Prepared, result: ImageResult | None, written, records, status, fail) -> None:
    """Store an image's record once its figures are written (``written`` is the figure paths, or
    the exception that stopped them)."""
    if isinstance(written, ImageError):
        fail(item.entry, str(written))
    elif isinstance(written, OSError):  # the output cannot be written (disk full ...): stops the build
        raise written
    elif isinstance(written, BaseException):  # a bug must cost one image, not the whole site
        log.debug("figures of %s failed", item.entry.id, exc_info=written)
        fail(item.entry, f"internal error in reportgen ({type(written).__name__}: {written})")
    else:
        record = image_record(result, written)
        records[item.entry.slug] = record
        if result.objects is not None and result.objects.detector_unavailable:
            return  # not cached as complete: the next build tries the detector again
        status.entries[item.entry.slug] = {"key": item.key, "record": record}


class _FigureWriter:
    """Writes each image's figures in the background while the model runs the next batch: in one
    thread by default (the forward pass spends its time in torch kernels that release the GIL),
    or with ``jobs > 1`` in that many worker processes. Figures are single-threaded and the
    forward pass is not, so on a few cores the gain is the time the forward pass leaves idle."""

    def __init__(self, jobs: int, batch_size: int):
        if jobs > 1:
            # spawn, not fork: forking a process that runs torch's thread pools is unsafe.
            self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reportgen-figures")
        # Images waiting for a worker: about one batch, so memory stays bounded (at most about two
        # batches of decoded images are alive, this one and the one the model is running).
        self._limit = batch_size + jobs
        self._pending: deque = deque()
        self._done: list = []

    def __enter__(self) -> "_FigureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def preload(self, function) -> None:
        """Run ``function`` in the figure thread ahead of the figures (a no-op with processes,
        which import what they need when they start)."""
        if isinstance(self._pool, ThreadPoolExecutor):
            self._pool.submit(function)

    def submit(self, item: _Prepared, result: ImageResult, args: tuple) -> None:
        self._pending.append((item, result, self._pool.submit(write_image_figures, *args)))
        while len(self._pending) > self._limit:
            self._collect(self._pending.popleft())

    def finished(self, wait: bool = False):
        """Images whose figures are written, in order; with ``wait``, all of them."""
        while self._pending and (wait or self._pending[0][2].done()):
            self._collect(self._pending.popleft())
        done, self._done = self._done, []
        return done

    def _collect(self, pending) -> None:
        item, result, future = pending
        try:
            written = future.result()
        except Exception as err:  # re-raised in the worker; reported per image
            written = err
        self._done.append((item, result, written))


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
        boxes, source, unavailable = objects_for(entry, item.original)
        objects = objects_experiment(maps, layout, item.geometry, boxes, source, unavailable)
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

    def __init__(self, manifest: Manifest, report):
        self.settings = manifest.detector
        self.report = report
        self._detector = None
        self._unavailable: str | None = None
        self._tried = False

    def __call__(self, entry: ImageEntry, image) -> tuple[tuple[ObjectBox, ...], str, str | None]:
        """(boxes, where they came from, why the detector could not be loaded or None)."""
        if entry.objects or self.settings.name is None:
            return entry.objects, "manifest", None
        detector = self._load()
        if detector is None:
            return (), self.settings.name, self._unavailable
        return tuple(detector.detect(image)), self.settings.name, None

    def _load(self):
        if not self._tried:
            self._tried = True  # a detector that failed to load is not retried for every image
            from reportgen.model.detector import DetectorUnavailable, load_detector

            try:
                self._detector = load_detector(self.settings.name, self.settings.threshold)
            except DetectorUnavailable as err:
                self._unavailable = err.reason  # published on the image's page and the index
                self.report.warnings.append(
                    f"{err} Images with boxes in the manifest still get the objects experiment."
                )
        return self._detector


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
        "capture": plain(capture) if capture else {"method": "not run (no image could be read)", "layers": [], "fused_attention": 0},
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
