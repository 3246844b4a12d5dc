"""The settings and the manifest as declarative models (pydantic dataclasses).

Each section of the manifest is one frozen model whose fields carry their rules
(:mod:`reportgen.config.rules`); :class:`ManifestDocument` is the whole file. Unknown keys are
refused, every problem is collected in one validation, and a null value means "the default"
(except where null has a meaning of its own, such as ``detector.name``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from reportgen.config.bounds import (
    IMAGE_KINDS,
    MAX_CAPTION_LENGTH,
    MAX_ID_LENGTH,
    MAX_INPUT_SIZE,
    MAX_LABEL_LENGTH,
    MAX_NAME_LENGTH,
    MAX_OBJECTS,
    MAX_RANDOM_ORDERS,
    MAX_TITLE_LENGTH,
    PERTURBATION_BASELINES,
    SCALE_KINDS,
)
from reportgen.config.messages import file_stem_id, image_id, problem, problems, show, with_problems
from reportgen.config.rules import (
    FlagOrIds,
    HF_PREFIX,
    Box,
    ClassChoices,
    ClassTargets,
    Colormap,
    Count,
    File,
    Flag,
    Folder,
    Items,
    ModelName,
    Names,
    Number,
    OneOf,
    Options,
    Text,
    looks_like_folder,
)
from reportgen.methods import DEFAULT_METHODS, HEAD_FUSIONS, METHODS

_CONFIG = ConfigDict(extra="forbid")

#: The map methods a build runs: names from :data:`reportgen.methods.METHODS`, or ``all``.
MethodNames = Annotated[tuple[str, ...], Names(registry=METHODS, what="method")]


@dataclass(frozen=True, config=_CONFIG)
class _Section:
    """Shared by every model: a mapping is required, and null means "the default"."""

    #: What the value must be, for the message when it is not a mapping.
    SHAPE: ClassVar[str] = "a mapping"
    #: Keys whose null is a value of its own rather than "the default".
    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if isinstance(data, (ArgsKwargs, cls)):  # built in code: the fields say the rest
            return data
        if not isinstance(data, Mapping):
            raise problem(f"expected {cls.SHAPE}, got {show(data)}")
        return {key: value for key, value in data.items() if value is not None or key in cls.NULLABLE}


@dataclass(frozen=True, config=_CONFIG)
class ModelSettings(_Section):
    """Which Vision Transformer to run.

    Attributes:
        name: a timm model name, "imgfocus-vits14" for the offline model, ``hf:ORG/NAME`` for a
            transformers model on the Hugging Face hub, or the absolute path of a local folder
            written by transformers' ``save_pretrained`` (see :class:`~reportgen.config.rules.ModelName`).
        weights: local weights file (safetensors or torch state dict) for a timm model, or None.
        input_size: square input size in pixels, at most :data:`MAX_INPUT_SIZE`; None for the
            model's default.
        pretrained: False builds the model with random weights (tests, timing).
        options: extra keyword arguments for ``timm.create_model`` (read-only mapping); none that
            names a weights file (see :class:`~reportgen.config.rules.Options`). Only for timm models.

    Raises:
        pydantic.ValidationError: a field has an impossible value (a ``ValueError``).
    """

    name: Annotated[str, ModelName()] = "vit_base_patch16_224"
    weights: Annotated[Path, File("weights file")] | None = None
    input_size: Annotated[int, Count(most=MAX_INPUT_SIZE)] | None = None
    pretrained: Annotated[bool, Flag()] = True
    # hash=False: a mapping is not hashable, and the settings should still be.
    options: Annotated[Mapping[str, Any], Options()] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def transformers(self) -> bool:
        """Whether the model comes from Hugging Face transformers (hub name or local folder)."""
        return self.name.startswith(HF_PREFIX) or looks_like_folder(self.name)

    @model_validator(mode="after")
    def _timm_only(self):
        found = []
        if self.transformers and self.weights is not None:
            found.append((("weights",), "a transformers model's weights come from its folder or hub repository; "
                          "leave model.weights (--weights) out, or give the folder as model.name"))
        if self.transformers and self.options:
            found.append((("options",), "options are timm.create_model arguments; a transformers model takes none"))
        if found:
            raise problems(found, self)
        return self


@dataclass(frozen=True, config=_CONFIG)
class AttentionSettings(_Section):
    """How attention maps are computed.

    Attributes:
        head_fusion: how attention rollout merges the heads of a layer; one of
            :data:`~reportgen.methods.HEAD_FUSIONS`.
        discard_ratio: fraction of the weakest attention weights rollout drops, 0 <= r < 1.
        rollout_start_layer: the first layer rollout multiplies (1-based; the layers before it
            count as the identity); 1 = all layers. At most the model's depth, which is known only
            once the model is loaded (checked there).
        target_classes: the classes the gradient methods explain in each image: one or several
            classes by index or name, or each image's top k predictions (``top-k``); None for
            each image's top-1. Whether the model has them (and a classifier head at all) is known
            only once it is loaded (checked there).
        object_targets: the gradient methods also explain, in each image with objects, each
            object: the cosine similarity of the image's embedding with the object's (one more
            backward pass and one more map per object and method).
    """

    head_fusion: Annotated[str, OneOf(HEAD_FUSIONS)] = "mean"
    discard_ratio: Annotated[float, Number(ge=0, lt=1)] = 0.0
    rollout_start_layer: Annotated[int, Count()] = 1
    target_classes: Annotated[ClassTargets, ClassChoices()] | None = None
    object_targets: Annotated[bool, Flag()] = False

    @property
    def target_count(self) -> int:
        """How many targets the methods that explain one have maps for, in each image."""
        return self.target_classes.count if self.target_classes is not None else 1


@dataclass(frozen=True, config=_CONFIG)
class DetectorSettings(_Section):
    """The object detector that finds boxes in addition to the manifest's own.

    Attributes:
        name: a Hugging Face object-detection model, or None to use only manifest boxes
            (the manifest and the command line spell this "none").
        threshold: minimum detector confidence, 0 < t <= 1.
    """

    NULLABLE: ClassVar[frozenset[str]] = frozenset({"name"})  # "name: null" can only mean "no detector"

    name: Annotated[str, Text(MAX_NAME_LENGTH, empty=False)] | None = "facebook/detr-resnet-50"
    threshold: Annotated[float, Number(gt=0, le=1)] = 0.9

    @field_validator("name", mode="before")
    @classmethod
    def _none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "none" else value


@dataclass(frozen=True, config=_CONFIG)
class OutputSettings(_Section):
    """Where and how the site is written.

    Attributes:
        dir: output folder, or None to let the command line choose.
        title: title of the report, at most :data:`MAX_TITLE_LENGTH` characters.
        cmap: matplotlib colour-map name for the heat maps.
        alpha: opacity of the heat-map overlay, 0 < a <= 1.
        scale: which value of a map is drawn at the top colour, one of :data:`SCALE_KINDS`
            (see :mod:`reportgen.site.scales`).
        scale_percentile: with ``scale: percentile``, the percentile each map is clipped at,
            50 < p <= 100 (ignored by the other scales).
    """

    dir: Annotated[Path, Folder()] | None = None
    title: Annotated[str, Text(MAX_TITLE_LENGTH)] = "reportgen report"
    cmap: Annotated[str, Colormap()] = "inferno"
    alpha: Annotated[float, Number(gt=0, le=1)] = 0.5
    scale: Annotated[str, OneOf(SCALE_KINDS)] = "map"
    # Above 50: at or below the median, half the map or more would be drawn at the top colour.
    scale_percentile: Annotated[float, Number(gt=50, le=100)] = 99.0


@dataclass(frozen=True, config=_CONFIG)
class EvaluateSettings(_Section):
    """Whether, and how, each map is evaluated against the model (perturbation curves, localisation
    in the boxes, agreement between the maps; see :mod:`reportgen.methods.evaluation`). Opt-in: the
    perturbation curves cost extra forward passes.

    The manifest writes ``evaluate: true``, or a mapping of these keys, which turns it on unless it
    says ``enabled: false``.

    Attributes:
        enabled: evaluate the maps.
        baseline: what replaces a removed patch, one of :data:`PERTURBATION_BASELINES`: the image's
            mean colour (over the image, padding excluded), the image blurred, or black.
        random_orders: how many seeded random orders the random baseline averages over, at most
            :data:`MAX_RANDOM_ORDERS`.
        sanity: also run the cascading model-randomisation check (one more pass of an image per
            block of the model): true for every image, or the ids of the images to check (ids of
            the manifest's images: :func:`unknown_image_ids`).
    """

    SHAPE: ClassVar[str] = "true, false or a mapping"

    enabled: Annotated[bool, Flag()] = False
    baseline: Annotated[str, OneOf(PERTURBATION_BASELINES)] = "mean"
    random_orders: Annotated[int, Count(most=MAX_RANDOM_ORDERS)] = 5
    sanity: Annotated[bool | tuple[str, ...], FlagOrIds(MAX_ID_LENGTH)] = False

    def checks(self, image_id: str) -> bool:
        """Whether the image ``image_id`` gets the sanity check (with the evaluation on)."""
        return self.enabled and (self.sanity is True or (isinstance(self.sanity, tuple) and image_id in self.sanity))

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        # Replaces the sections' rule: a bare true/false, and a written section means "on".
        if isinstance(data, (ArgsKwargs, cls)):
            return data
        if isinstance(data, bool):
            return {"enabled": data}
        if not isinstance(data, Mapping):
            raise problem(f"expected {cls.SHAPE}, got {show(data)}")
        return {"enabled": True, **{key: value for key, value in data.items() if value is not None}}


#: The sections of the manifest that settings (and command-line overrides) can change.
SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "attention": AttentionSettings,
    "detector": DetectorSettings,
    "output": OutputSettings,
    "evaluate": EvaluateSettings,
}


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, config=_CONFIG)
class ObjectSpec(_Section):
    """An object box as written in the manifest: ``{label: cat, box: [x0, y0, x1, y1]}``."""

    SHAPE: ClassVar[str] = "a mapping with 'label' and 'box'"

    label: Annotated[str, Text(MAX_LABEL_LENGTH, empty=False)]
    box: Annotated[tuple[float, float, float, float], Box()] = Field(
        json_schema_extra={"missing": "missing: expected [x0, y0, x1, y1] in pixels"})


class _FileStem(str):
    """An id taken from the image's file name (the message about a long one says so)."""


class _ImageId(Text):
    def check(self, value: Any, base: Path | None) -> str:
        if isinstance(value, _FileStem) and len(value) > self.limit:
            raise problem(f"too long: the file name's stem, used as the id, has {len(value)} characters, more than "
                          f"the limit of {self.limit}; give the entry a shorter 'id'")
        return str(super().check(value, base))


@dataclass(frozen=True, config=_CONFIG)
class ImageSpec(_Section):
    """An image as written in the manifest; ``id`` defaults to the file name's stem."""

    SHAPE: ClassVar[str] = "a mapping with at least a 'path' key"

    path: Annotated[Path, File("image file")]
    id: Annotated[str, _ImageId(MAX_ID_LENGTH, empty=False)] | None = None
    title: Annotated[str, Text(MAX_TITLE_LENGTH)] | None = None
    caption: Annotated[str, Text(MAX_CAPTION_LENGTH)] = ""
    kind: Annotated[str, OneOf(IMAGE_KINDS)] = "single"
    objects: Annotated[tuple[ObjectSpec, ...], Items(
        "a list of {label, box} mappings", most=MAX_OBJECTS,
        too_many="{count} objects, more than the limit of {most} per image")] = ()

    @model_validator(mode="before")
    @classmethod
    def _id_from_file_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("id") is None:
            stem = file_stem_id(data.get("path"))
            if stem is not None:
                return {**data, "id": _FileStem(stem)}
        return data


# --------------------------------------------------------------------------------------------
# The whole manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, config=_CONFIG, kw_only=True)
class ManifestDocument(_Section):
    """The manifest file's content (``title`` is a shortcut for ``output.title``)."""

    SHAPE: ClassVar[str] = "a mapping with an 'images' list"
    NULLABLE: ClassVar[frozenset[str]] = frozenset({"images"})  # "images:" alone is an empty list

    title: Annotated[str, Text(MAX_TITLE_LENGTH)] | None = None
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    attention: AttentionSettings = dataclasses.field(default_factory=AttentionSettings)
    detector: DetectorSettings = dataclasses.field(default_factory=DetectorSettings)
    output: OutputSettings = dataclasses.field(default_factory=OutputSettings)
    evaluate: EvaluateSettings = dataclasses.field(default_factory=EvaluateSettings)
    methods: MethodNames = DEFAULT_METHODS
    images: Annotated[tuple[ImageSpec, ...], Items(
        "a list of images", empty="the list is empty; add at least one image")] = Field(
        json_schema_extra={"missing": "missing: the manifest must list at least one image"})

    @model_validator(mode="wrap")
    @classmethod
    def _across_entries(cls, data: Any, handler: Any) -> Any:
        """Rules across keys, checked even when entries have problems of their own, so that all
        problems are reported in one run."""
        error = None
        try:
            document = handler(data)
        except ValidationError as err:
            error, document = err, None
        found = _conflicting_titles(data) + _duplicate_ids(data) + _unknown_sanity_ids(data)
        merged = with_problems(error, found, data, order=[f.name for f in dataclasses.fields(cls)])
        if merged is not None:
            raise merged
        return document


def _conflicting_titles(data: Any) -> list[tuple[tuple, str]]:
    output = data.get("output") if isinstance(data, Mapping) else None
    inner = output.get("title") if isinstance(output, Mapping) else None
    outer = data.get("title") if isinstance(data, Mapping) else None
    if outer is not None and inner is not None and outer != inner:
        return [(("title",), "given both as 'title' and as 'output.title' with different values; keep one")]
    return []


def _duplicate_ids(data: Any) -> list[tuple[tuple, str]]:
    entries = data.get("images") if isinstance(data, Mapping) else None
    found: list[tuple[tuple, str]] = []
    first: dict[str, tuple[int, bool]] = {}
    for index, entry in enumerate(entries if isinstance(entries, list) else ()):
        known, derived = image_id(entry)
        if known is None:
            continue
        if known not in first:
            first[known] = (index, derived)
            continue
        other, other_derived = first[known]
        hint = " (taken from the file name; give the entries different 'id's)" if derived or other_derived else ""
        found.append((("images", index, "id"), f"duplicate id {show(known)}, also used by images[{other}]{hint}"))
    return found


def unknown_image_ids(chosen: Any, known: list[str]) -> list[tuple[int, str]]:
    """Of the image ids ``chosen`` (``evaluate.sanity``'s list; anything else chooses none), those
    no image of the manifest has (``known``): ``(index, message)``."""
    if not isinstance(chosen, (list, tuple)):
        return []
    listed = ", ".join(show(one) for one in known[:10]) + (", ..." if len(known) > 10 else "")
    return [(index, f"no image has the id {show(one)} (the manifest's ids: {listed})")
            for index, one in enumerate(chosen) if isinstance(one, str) and one not in known]


def _unknown_sanity_ids(data: Any) -> list[tuple[tuple, str]]:
    evaluate = data.get("evaluate") if isinstance(data, Mapping) else None
    entries = data.get("images") if isinstance(data, Mapping) else None
    if not isinstance(evaluate, Mapping) or not isinstance(entries, list):
        return []
    known = [found for found, _derived in map(image_id, entries) if found is not None]
    return [(("evaluate", "sanity", index), message) for index, message in unknown_image_ids(evaluate.get("sanity"), known)]
