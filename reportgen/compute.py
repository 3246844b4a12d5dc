"""The compute phase of a build: decode and preprocess images, run the ViT with attention capture,
the map methods and the experiments, for the images the cache could not supply.

:meth:`Computation.results` yields one :class:`~reportgen.experiments.ImageResult` or
:class:`~reportgen.experiments.ImageFailure` per image, in order; it changes no build state (the
build decides what a failure means). Kept apart from :mod:`reportgen.builder` so that a rebuild with
nothing to compute never imports torch or timm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import timm
import torch
from PIL import Image

import reportgen
from reportgen.config import ImageEntry, Manifest, ObjectBox
from reportgen.errors import ImageError, ModelSettingsError
from reportgen.experiments import ImageFailure, ImageResult, Objects, explain, seen_objects
from reportgen.imaging import Geometry, open_image, preprocess, source_size
from reportgen.methods import METHODS, create_methods
from reportgen.model.capture import CaptureInfo
from reportgen.model.loading import LoadedModel, load_model
from reportgen.model.runner import ModelRunner
from reportgen.model.sources import model_identity
from reportgen.model.targets import NO_HEAD, Targets

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    entry: ImageEntry
    original: Image.Image
    tensor: torch.Tensor
    geometry: Geometry
    view: Image.Image
    objects: Objects | None = None
    coverages: list[tuple[str, np.ndarray]] = dataclasses.field(default_factory=list)  # explained objects


@dataclass(frozen=True)
class ModelRun:
    """The model that ran, how attention was captured and the library versions (for the report).

    Attributes:
        model: the loaded model and its metadata.
        capture: how attention was captured (None if no image reached the model).
        versions: reportgen, torch, timm and transformers versions.
    """

    model: LoadedModel
    capture: CaptureInfo | None
    versions: dict[str, str | None]


class Computation:
    """The model stage over some images.

    Attributes (read after :meth:`results` is exhausted):
        model_run: what ran, for the report; None until the model is loaded.
        model_load_seconds: how long loading took; None when a kept model was used.
        warnings: what the reader should know (a detector that could not be loaded).

    Args:
        settings: the model, attention, detector and methods settings (a :class:`Manifest`, or
            the Python API's own).
        device: where the model runs.
        batch_size: images per forward pass.
        model_cache: a dict the caller keeps across builds to keep the loaded model in.
    """

    def __init__(self, settings: Manifest, device: str, batch_size: int, model_cache: dict | None = None):
        self.manifest = settings
        self.device = device
        self.batch_size = batch_size
        self.model_cache = model_cache
        self.model_run: ModelRun | None = None
        self.model_load_seconds: float | None = None
        self.warnings: list[str] = []

    def results(
        self, entries: Sequence[ImageEntry], images: Sequence[Image.Image | None] | None = None
    ) -> Iterator[ImageResult | ImageFailure]:
        """One result or failure per entry, in order. ``images``, aligned with ``entries``, gives
        images already in memory (from :func:`reportgen.imaging.from_pil`); the others are read
        from their entry's path.

        Images are decoded in a background thread one batch ahead of the model, and nothing per
        image outlives its batch unless the caller keeps it, so memory does not grow with the
        number of images.

        Raises:
            ModelLoadError: the model cannot be loaded.
            ModelSettingsError: a setting does not fit the model (the rollout start layer).
            CaptureError: attention could not be captured (a model reportgen cannot read).
        """
        loaded, self.model_load_seconds = kept_model(self.manifest, self.device, self.model_cache)
        chosen, top = check_fits_model(self.manifest, loaded)
        methods = create_methods(self.manifest.methods, self.manifest.attention)
        runner = ModelRunner(loaded, methods, chosen, top)
        evaluate = self.manifest.evaluate
        perturber = None
        if evaluate.enabled:
            from reportgen.model.perturbation import Perturber

            perturber = Perturber(loaded, evaluate.baseline, evaluate.random_orders)
        sanity = evaluate.enabled and bool(evaluate.sanity) and bool(loaded.adapter.blocks())
        if evaluate.enabled and evaluate.sanity and not sanity:
            self.warnings.append(
                f"evaluate.sanity: the model randomisation check re-initialises the model's blocks; reportgen cannot "
                f"re-initialise those of {loaded.name}, so it is left out."
            )
        self.model_run = ModelRun(loaded, None, _versions())
        layout = loaded.layout
        objects_for = _ObjectSource(self.manifest, self.warnings)
        attention = self.manifest.attention
        explain_objects = attention.object_targets and runner.gradients
        if (attention.object_targets or attention.target_classes is not None) and not runner.gradients:
            self.warnings.append(
                "attention.target_classes and attention.object_targets choose what the gradient methods "
                f"({', '.join(name for name, spec in METHODS.items() if spec.targeted)}) explain; none of them "
                "runs in this build, so they have no effect."
            )

        def with_objects(item):
            """The image's objects, found before the model runs (object targets need them), with
            each one's patch coverage for the object targets."""
            if not isinstance(item, _Prepared) or item.entry.kind != "multi":
                return item
            objects = objects_for(item.entry, item.original)
            seen, _skipped = seen_objects(objects, item.geometry, layout) if explain_objects else ([], [])
            return dataclasses.replace(item, objects=objects, coverages=[(o.label, o.coverage) for o in seen])

        items = list(zip(entries, images or [None] * len(entries)))
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]

        def prepare_batch(batch):
            outcomes = []
            for entry, image in batch:
                try:
                    outcomes.append(_prepare(entry, loaded.data_config, image))
                except ImageError as err:
                    outcomes.append(ImageFailure(entry, str(err)))
            return outcomes

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reportgen-decode") as decoder:
            upcoming = decoder.submit(prepare_batch, batches[0]) if batches else None
            for index in range(len(batches)):
                outcomes = upcoming.result()
                upcoming = decoder.submit(prepare_batch, batches[index + 1]) if index + 1 < len(batches) else None
                outcomes = [_per_image(with_objects, item, "objects") for item in outcomes]
                prepared = [item for item in outcomes if isinstance(item, _Prepared)]
                coverages = [p.coverages for p in prepared] if explain_objects else None
                passes = iter(runner.run(torch.stack([p.tensor for p in prepared]), coverages) if prepared else ())
                if prepared:
                    self.model_run = ModelRun(loaded, runner.capture_info, self.model_run.versions)
                done: list[tuple[_Prepared | None, ImageResult | ImageFailure, int | None]] = []
                for item in outcomes:
                    if isinstance(item, ImageFailure):
                        done.append((None, item, None))
                        continue
                    forward = next(passes)
                    result = _per_image(
                        lambda p: explain(p.entry, forward, methods, layout, p.geometry, p.original, p.view, p.objects),
                        item, "experiments",
                    )
                    # The evaluation scores the maps that explain no target with the image's first target's class.
                    explained = forward.target.class_index if forward.target is not None else (chosen[0] if chosen else None)
                    done.append((item, result, explained))
                if perturber is not None:
                    checked = [isinstance(r, ImageResult) and evaluate.checks(r.entry.id) for _item, r, _class in done]
                    randomised = None
                    if sanity:
                        try:
                            randomised = _randomised_maps(loaded, methods, done, explain_objects, checked)
                        except Exception as err:  # a bug must cost the checked images, not the whole site
                            log.debug("sanity check failed", exc_info=err)
                            done = [(item, _internal_error(r.entry, err), c) if checked[i] else (item, r, c)
                                    for i, (item, r, c) in enumerate(done)]
                    done = _evaluated(perturber, done, layout, randomised)
                for _item, result, _class in done:
                    yield result


def _per_image(step, item: _Prepared, what: str):
    """``step(item)``, or the image's failure: an unreadable part of it, or a bug, costs that
    image, not the whole site."""
    try:
        return step(item)
    except ImageError as err:
        return ImageFailure(item.entry, str(err))
    except Exception as err:  # a bug must cost one image, not the whole site
        log.debug("%s of %s failed", what, item.entry.id, exc_info=err)
        return _internal_error(item.entry, err)


def _internal_error(entry: ImageEntry, err: Exception) -> ImageFailure:
    return ImageFailure(entry, f"internal error in reportgen ({type(err).__name__}: {err})")


def _randomised_maps(loaded: LoadedModel, methods: list, done: list, objects: bool, checked: list[bool]) -> list | None:
    """For the batch's images the sanity check is for (``checked``, aligned with ``done``; an empty
    list for the others), the maps of each step of
    the cascading randomisation (:mod:`reportgen.model.sanity`): ``[(block index, {map: grid})]``.
    Every map explains what it explains on the learnt model: the same classes (not the randomised
    model's own top predictions) and, with ``objects``, the same objects' boxes. One pass of the
    batch per step (per set of classes), the model's blocks re-initialised in place and restored after."""
    from reportgen.experiments import maps_for_every_target
    from reportgen.model.sanity import cascade

    ok = [index for index, (_item, result, _class) in enumerate(done) if isinstance(result, ImageResult) and checked[index]]
    if not ok:
        return None
    groups: dict[tuple[int, ...], list[int]] = {}
    for index in ok:
        explained = (t.class_index for t in done[index][1].targets.values() if t.kind == "class")
        groups.setdefault(tuple(dict.fromkeys(explained)), []).append(index)
    steps: list[list] = [[] for _ in done]
    layout = loaded.layout
    with cascade(loaded.adapter) as blocks:  # the user's weights come back on leaving, also on an error
        for block in blocks:
            for classes, members in groups.items():
                batch = torch.stack([done[index][0].tensor for index in members])
                coverages = [done[index][0].coverages for index in members] if objects else None
                forwards = ModelRunner(loaded, methods, classes, 1).run(batch, coverages)
                for index, forward in zip(members, forwards):
                    maps = {name: grid for method in methods for name, grid in maps_for_every_target(method, forward, layout).maps.items()}
                    steps[index].append((block, maps))
    return steps


def _evaluated(perturber, done: list, layout, randomised: list | None = None) -> list:
    """The batch's results with their :class:`~reportgen.experiments.Evaluation`: every image's
    perturbed inputs go through the model together."""
    from reportgen.experiments import evaluation, sanity
    from reportgen.model.perturbation import Subject

    ok = [(index, item, result, explained) for index, (item, result, explained) in enumerate(done) if isinstance(result, ImageResult)]
    if not ok:
        return done
    done = list(done)
    try:
        subjects = [
            Subject(item.tensor, result.maps, result.content.weights, item.geometry.content_box(), explained,
                    _map_targets(result, item))
            for _index, item, result, explained in ok
        ]
        curves = perturber.curves(subjects)
    except Exception as err:  # a bug must cost this batch's images, not the whole site
        log.debug("evaluation failed", exc_info=err)
        for index, item, result, explained in ok:
            done[index] = (item, _internal_error(result.entry, err), explained)
        return done
    for (index, item, result, explained), scored in zip(ok, curves):
        try:
            checked = sanity(result, randomised[index]) if randomised is not None and randomised[index] else None
            judged = evaluation(result, scored, perturber.baseline, layout, checked)
            done[index] = (item, dataclasses.replace(result, evaluation=judged), explained)
        except Exception as err:
            log.debug("evaluation of %s failed", result.entry.id, exc_info=err)
            done[index] = (item, _internal_error(result.entry, err), explained)
    return done


def _map_targets(result: ImageResult, item: _Prepared) -> dict:
    """Per map that explains a class or an object, its target for the evaluation (object ``j``'s
    coverage from the objects the model explained, in the order the maps number them)."""
    from reportgen.model.perturbation import MapTarget

    targets = {}
    for name, target in result.targets.items():
        if target.kind == "class":
            targets[name] = MapTarget("class", class_index=target.class_index)
        elif target.kind == "object":
            label, coverage = item.coverages[int(name.rpartition("/object-")[2]) - 1]
            assert label == target.object_label, (label, target.object_label)
            targets[name] = MapTarget("object", object_label=label, coverage=coverage)
    return targets


def check_fits_model(settings: Manifest, loaded: LoadedModel) -> tuple[tuple[int, ...], int]:
    """The rules a setting can only be checked by once the model is loaded. Returns the indices of
    the classes the gradient methods explain (``attention.target_classes``; empty for each image's
    top predictions, and when nothing explains a target) and how many top predictions to
    explain without them. The evaluation scores the maps that explain no target with each image's first target.

    Raises:
        ModelSettingsError: naming the setting, its value and what the model allows.
    """
    start = settings.attention.rollout_start_layer
    if "rollout" in settings.methods and start > loaded.depth:
        raise ModelSettingsError(
            f"attention.rollout_start_layer (--rollout-start-layer) {start}: greater than the depth of "
            f"{loaded.name} ({loaded.depth} layers); use a layer from 1 to {loaded.depth}."
        )
    choice = settings.attention.target_classes
    if choice is None or not (any(METHODS[name].targeted for name in settings.methods) or settings.evaluate.enabled):
        return (), 1
    targets = Targets(loaded.adapter)
    written = choice.as_written()
    try:
        if not targets.classifier:
            raise ValueError(NO_HEAD)
        if choice.top > targets.num_classes:
            raise ValueError(f"the model has {targets.num_classes} classes")
        chosen = []
        for index, one in enumerate(choice.classes):
            found = targets.resolve(one)
            if found in chosen:
                raise ValueError(f"class {found} is listed twice (entry {chosen.index(found) + 1} and {index + 1})")
            chosen.append(found)
    except ValueError as err:
        raise ModelSettingsError(
            f"attention.target_classes (--target-classes) {written!r}: {loaded.name}: {err}."
        ) from None
    return tuple(chosen), choice.top


def kept_model(manifest: Manifest, device: str, cache: dict | None) -> tuple[LoadedModel, float | None]:
    """The model for this manifest and device, and the seconds it took to load (``None`` when it
    came from ``cache``, a dict the caller keeps across builds, as ``--watch`` does).

    Raises:
        ModelLoadError: if it cannot be loaded.
    """
    # The identity hashes a local weights file, so a file replaced under the same name is reloaded.
    key = json.dumps([model_identity(manifest.model), device], sort_keys=True) if cache is not None else None
    if cache is not None and key in cache:
        return cache[key], None
    started = time.perf_counter()
    loaded = load_model(manifest.model, device)
    seconds = time.perf_counter() - started
    if cache is not None:
        cache.clear()  # one model at a time: a replaced one is not kept alive
        cache[key] = loaded
    return loaded, seconds


def prepare_for_rebuilds(manifest: Manifest, device: str, cache: dict) -> float | None:
    """Load the model into ``cache`` ahead of need and run it once on a blank image, so the first
    rebuild is as quick as the next (a process's first forward pass is several times slower than
    later ones); the figure libraries are imported too. Returns the seconds the load took,
    ``None`` if the model was already kept.

    Raises:
        ModelLoadError: if the model cannot be loaded.
    """
    loaded, seconds = kept_model(manifest, device, cache)
    chosen, top = check_fits_model(manifest, loaded)
    if seconds is not None:
        _channels, height, width = loaded.data_config["input_size"]
        ModelRunner(loaded, create_methods(manifest.methods, manifest.attention), chosen, top).run(
            torch.zeros(1, 3, height, width))
        import seaborn  # noqa: F401  (the index's figures: pandas, scipy and matplotlib come with it)
    return seconds


def _prepare(entry: ImageEntry, data_config: dict, image: Image.Image | None = None) -> _Prepared:
    original = open_image(entry.path) if image is None else image
    w, h = source_size(original)  # boxes are in the file's (upright) pixels, before any downscaling
    for i, box in enumerate(entry.objects):
        if box.x1 > w or box.y1 > h:
            raise ImageError(
                f"objects[{i}] ({box.label!r}) box {list(box.as_tuple())} lies outside the {w}x{h} image"
            )
    # The boxes stay as given: the geometry maps the file's pixels (the reader's) into the input.
    tensor, geometry, view = preprocess(original, data_config)
    return _Prepared(entry, original, tensor, geometry, view)


class _ObjectSource:
    """Objects of an image: the manifest's boxes, else the detector's (loaded on first need)."""

    def __init__(self, manifest: Manifest, warnings: list[str]):
        self.settings = manifest.detector
        self.warnings = warnings
        self._detector = None
        self._unavailable: str | None = None
        self._tried = False

    def __call__(self, entry: ImageEntry, image: Image.Image) -> Objects:
        if entry.objects or self.settings.name is None:
            return Objects(entry.objects, "manifest")
        detector = self._load()
        if detector is None:
            return Objects((), self.settings.name, self._unavailable)
        return Objects(_in_source_pixels(detector.detect(image), image), self.settings.name)

    def _load(self):
        if not self._tried:
            self._tried = True  # a detector that failed to load is not retried for every image
            from reportgen.model.detector import DetectorUnavailable, load_detector

            try:
                self._detector = load_detector(self.settings.name, self.settings.threshold)
            except DetectorUnavailable as err:
                self._unavailable = err.reason  # published on the image's page and the index
                self.warnings.append(f"{err} Images with boxes in the manifest still get the objects experiment.")
        return self._detector


def _in_source_pixels(boxes: list[ObjectBox], image: Image.Image) -> tuple[ObjectBox, ...]:
    """Boxes found in a decoded image, in the pixels of the file it came from (which are larger
    when the image was downscaled on decoding), like the manifest's."""
    w, h = source_size(image)
    if (w, h) == image.size:
        return tuple(boxes)
    fx, fy = w / image.width, h / image.height
    return tuple(dataclasses.replace(b, x0=b.x0 * fx, y0=b.y0 * fy, x1=b.x1 * fx, y1=b.y1 * fy) for b in boxes)


def _versions() -> dict[str, str | None]:
    return {
        "reportgen": reportgen.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": _version("transformers"),
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
