"""Loading the YAML manifest that drives ``reportgen build``, and changing its settings.

The manifest names the images to analyse (with optional hand-drawn object boxes), the map
methods to run and the settings of the model, the attention experiments, the object detector
and the output site::

    title: Sample report                  # shortcut for output.title
    model: {name: imgfocus-vits14, input_size: 224}
    attention: {head_fusion: mean, discard_ratio: 0.0}
    detector: {name: none, threshold: 0.9}
    output: {dir: ../site, cmap: inferno, alpha: 0.5}
    methods: [attention, rollout]         # or: all
    evaluate: {baseline: mean}            # or: true; off when left out
    images:
      - path: chelsea.png
        id: chelsea
        title: Chelsea the cat
        kind: single
        objects:
          - {label: cat head, box: [0, 0, 396, 300]}

This module only reads and checks text: it never decodes an image (it only checks that the
files exist) and never touches a model. :func:`load_manifest` collects every problem it
finds and raises them together as one :class:`~reportgen.errors.ManifestError`, so a user
fixes a manifest in one pass instead of one error per run. The rules themselves are declared on
the models of :mod:`reportgen.config.schema`; command-line overrides go through the same models.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from reportgen.config.messages import SettingsError, file_stem_id, locate
from reportgen.config.reading import read_yaml
from reportgen.config.schema import (
    SECTIONS,
    AttentionSettings,
    DetectorSettings,
    EvaluateSettings,
    ManifestDocument,
    MethodNames,
    ModelSettings,
    OutputSettings,
    unknown_image_ids,
)
from reportgen.config.slugs import unique_slugs
from reportgen.errors import ManifestError
from reportgen.methods import DEFAULT_METHODS

__all__ = ["ImageEntry", "Manifest", "ObjectBox", "check_overrides", "load_manifest"]


@dataclass(frozen=True)
class ObjectBox:
    """An object in an image: a labelled axis-aligned box.

    Attributes:
        label: what the object is ("cat", "wheel"); kept verbatim.
        x0: left edge, in pixels of the original (EXIF-upright) image.
        y0: top edge.
        x1: right edge; greater than ``x0``.
        y1: bottom edge; greater than ``y0``.
        score: the detector's confidence, or None for a box written in the manifest.
    """

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    score: float | None = None

    @property
    def width(self) -> float:
        """Width of the box in pixels."""
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        """Height of the box in pixels."""
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        """Area of the box in square pixels."""
        return self.width * self.height

    def as_tuple(self) -> tuple[float, float, float, float]:
        """Return the box as ``(x0, y0, x1, y1)``."""
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class ImageEntry:
    """One image of the manifest.

    Attributes:
        index: position in the manifest's ``images`` list (0-based).
        id: the user's id, or the file's stem when the entry has none.
        slug: a file-name stem derived from ``id`` that is safe on every file system and
            unique within the manifest (see :func:`~reportgen.config.slugify`).
        path: absolute path of the image file.
        title: display title; defaults to ``id``.
        caption: display caption; defaults to "".
        kind: "single" (one main object) or "multi" (several objects).
        objects: boxes written in the manifest.
    """

    index: int
    id: str
    slug: str
    path: Path
    title: str
    caption: str
    kind: str
    objects: tuple[ObjectBox, ...]


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.

    Attributes:
        path: absolute path of the manifest file.
        model: model settings.
        attention: attention settings.
        detector: detector settings.
        output: output settings.
        images: the images, in manifest order, with unique ids and slugs.
        methods: names of the map methods to run, from :data:`reportgen.methods.METHODS`.
        evaluate: whether and how the maps are evaluated against the model.
    """

    path: Path
    model: ModelSettings
    attention: AttentionSettings
    detector: DetectorSettings
    output: OutputSettings
    images: tuple[ImageEntry, ...]
    methods: tuple[str, ...] = DEFAULT_METHODS
    evaluate: EvaluateSettings = dataclasses.field(default_factory=EvaluateSettings)

    def with_overrides(self, **changes: Any) -> Manifest:
        """Return a copy with some settings replaced, e.g. from command-line options.

        The changed sections are validated again, as a whole, by the same models as the
        manifest; paths are used as given, not resolved against the manifest's folder.

        Args:
            **changes: per section ("model", "attention", "detector", "output", "evaluate"), a mapping of
                field name to new value; None or an empty mapping changes nothing. ``methods``
                is a list of method names or "all".

        Returns:
            A new manifest; this one is unchanged.

        Raises:
            SettingsError: a value the settings reject (each problem with its key).
            ValueError: an unknown section.

        Example:
            >>> m.with_overrides(model={"name": "vit_small_patch16_224"}, detector={"threshold": 0.5})
        """
        result = _overridden(self, changes)
        evaluate = result.get("evaluate")
        unknown = unknown_image_ids(evaluate.sanity, [entry.id for entry in self.images]) if evaluate is not None else []
        if unknown:
            raise SettingsError("evaluate", [("sanity", message) for _index, message in unknown])
        return dataclasses.replace(self, **result)


def check_overrides(**changes: Any) -> dict[str, Any]:
    """Check overrides on their own (over the default settings), before any manifest is read;
    returns the sections they make (only those given).

    Raises:
        SettingsError, ValueError: as :meth:`Manifest.with_overrides`.
    """
    return _overridden(None, changes)


_METHODS = TypeAdapter(MethodNames)


def _overridden(manifest: Manifest | None, changes: Mapping[str, Any]) -> dict[str, Any]:
    """The sections ``changes`` make of ``manifest``'s (or of the defaults), each validated whole."""
    result: dict[str, Any] = {}
    for section, values in changes.items():
        if section == "methods":
            if values is not None:
                try:
                    result[section] = _METHODS.validate_python(values)
                except ValidationError as err:
                    raise SettingsError.of(section, err, ManifestDocument) from None
            continue
        settings_type = SECTIONS.get(section)
        if settings_type is None:
            raise ValueError(f"unknown manifest section {section!r} (allowed: {', '.join(sorted([*SECTIONS, 'methods']))})")
        if not values:
            continue
        if not isinstance(values, Mapping):
            raise ValueError(f"overrides for {section!r} must be a mapping of field names to values")
        current = getattr(manifest, section) if manifest is not None else settings_type()
        merged = {field.name: getattr(current, field.name) for field in dataclasses.fields(settings_type)}
        try:
            result[section] = TypeAdapter(settings_type).validate_python({**merged, **values})
        except ValidationError as err:
            raise SettingsError.of(section, err, settings_type) from None
    return result


_DOCUMENT = TypeAdapter(ManifestDocument)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read, check and return the manifest at ``path``.

    Relative paths inside the manifest (images, model weights, output folder) are resolved
    against the manifest's folder. Only the existence of files is checked here; images are
    decoded (and boxes checked against their size) later.

    Args:
        path: the manifest file.

    Returns:
        The validated manifest.

    Raises:
        ManifestError: the file is missing, unreadable, not valid YAML, or has any invalid
            content; the error lists every problem found, each naming the entry and key.
    """
    manifest_path = Path(os.path.abspath(os.fspath(path)))
    data, problems = read_yaml(manifest_path)
    if data is None:
        raise ManifestError(manifest_path, problems + ["the manifest is empty; expected a mapping with an 'images' list"])
    try:
        document = _DOCUMENT.validate_python(data, context={"base": manifest_path.parent})
    except ValidationError as err:
        problems += [f"{where}: {message}" if where else message
                     for where, message in locate(err, ManifestDocument, data, document=True)]
    except Exception as exc:  # a bug here must still reach the user as a plain message
        raise ManifestError(
            manifest_path,
            [f"unexpected error while checking the manifest ({type(exc).__name__}: {exc}); please report this"],
        ) from exc
    if problems:
        raise ManifestError(manifest_path, problems)
    return _manifest(manifest_path, document)


def _manifest(path: Path, document: ManifestDocument) -> Manifest:
    """The manifest of a validated document: ids, titles and slugs settled, boxes as ObjectBox."""
    output = document.output
    if document.title is not None:
        output = dataclasses.replace(output, title=document.title)
    ids = [spec.id or file_stem_id(str(spec.path)) for spec in document.images]
    images = tuple(
        ImageEntry(
            index=index,
            id=image_id,
            slug=slug,
            path=spec.path,
            title=spec.title if spec.title is not None else image_id,
            caption=spec.caption,
            kind=spec.kind,
            objects=tuple(ObjectBox(box.label, *box.box) for box in spec.objects),
        )
        for index, (spec, image_id, slug) in enumerate(zip(document.images, ids, unique_slugs(ids)))
    )
    return Manifest(path=path, model=document.model, attention=document.attention, detector=document.detector,
                    output=output, images=images, methods=document.methods, evaluate=document.evaluate)
