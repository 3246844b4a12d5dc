"""The Python API: the maps of a build for images in a notebook or a script.

>>> from reportgen import Explainer
>>> ex = Explainer("imgfocus-vits14")
>>> result = ex.explain("cat.jpg", boxes={"cat": (10, 20, 200, 180)})
>>> result.maps["rollout"]          # float [grid rows, grid cols]

The settings are the manifest's, checked by the same rules; the images go through the same
decoding, model stage and experiments as a build's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reportgen.builder import BuildReport
from reportgen.builder import build as _build_site
from reportgen.config import (
    AttentionSettings,
    DetectorSettings,
    EvaluateSettings,
    ImageEntry,
    ModelSettings,
    ObjectBox,
    SettingsError,
    build_options,
    check_overrides,
    load_manifest,
)
from reportgen.config.options import DEFAULT_OUTPUT
from reportgen.errors import ImageError
from reportgen.methods import DEFAULT_METHODS

ImageInput = str | os.PathLike | Image.Image
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class _Settings:
    """What the model stage reads from a manifest, without images."""

    model: ModelSettings
    attention: AttentionSettings
    detector: DetectorSettings
    methods: tuple[str, ...]
    evaluate: EvaluateSettings = EvaluateSettings()


@dataclass(frozen=True)
class Explanation:
    """The maps and experiments of one image.

    Attributes:
        result: everything computed (:class:`~reportgen.experiments.ImageResult`).
    """

    result: Any
    cmap: str = "inferno"
    alpha: float = 0.5
    scale: str = "map"
    scale_percentile: float = 99.0

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """Every map by name (``attention/mean``, ``attention/max``, ``rollout``): float32
        ``[grid rows, grid cols]`` over the patches of the model input."""
        return {name: grid.astype(np.float32) for name, grid in self.result.maps.items()}

    @property
    def entropy(self) -> dict[str, Any]:
        """Per map name, its entropy over the patches (``.nats`` and ``.normalised``; both None for
        an all-zero map, which has no entropy)."""
        return self.result.entropy

    @property
    def targets(self) -> dict[str, Any]:
        """Per map name, what the map explains (a :class:`~reportgen.methods.base.Target`:
        ``kind``, ``description``, ``score``, ``class_index``, ``class_name``), for the maps of
        methods that explain one (``relevance``, ``grad-rollout``, ``gradcam``)."""
        return self.result.targets

    @property
    def predictions(self) -> tuple | None:
        """A classifier's top-5 predictions (``index``, ``name``, ``probability``), best first,
        when a method that explains a target ran; None otherwise and for a headless model."""
        return self.result.predictions

    @property
    def objects(self):
        """The objects experiment (for images given ``boxes``), or None."""
        return self.result.objects

    def figure(self, column_inches: float = 3.0):
        """The model input and every map over it, as a matplotlib Figure (shown by notebooks)."""
        from reportgen.site.panels import panel_figure
        from reportgen.site.scales import ScaleSetting

        return panel_figure(self.result, self.cmap, self.alpha, column_inches, ScaleSetting(self.scale, self.scale_percentile))


class Explainer:
    """Explains images with a Vision Transformer.

    Args:
        model: a timm model name, ``imgfocus-vits14`` for the offline model, ``hf:ORG/NAME`` for a
            transformers model on the Hugging Face hub, or the path of a folder written by
            ``save_pretrained`` (with the model's image processor).
        methods: map methods to run (names from ``reportgen.methods.METHODS``), or ``"all"``.
        weights: a local weights file (timm models).
        input_size: square input size (default: the model's).
        pretrained: False builds the model with random weights.
        options: extra keyword arguments for ``timm.create_model`` (timm models).
        head_fusion / discard_ratio / rollout_start_layer: rollout settings.
        target_classes: the classes the gradient methods explain, as the manifest's
            ``attention.target_classes``: a class index or name, a list of them, or ``"top-k"``;
            None for each image's top-1 class. Each further target's maps are named
            ``{map}/target-k`` in :attr:`Explanation.maps`.
        object_targets: the gradient methods also explain each box of an image given ``boxes``
            (the manifest's ``attention.object_targets``): maps ``{map}/object-j``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        batch_size: images per forward pass.
        cmap / alpha: colour map and opacity of :meth:`Explanation.figure`.
        scale / scale_percentile: its colour scale, as the manifest's ``output.scale`` (``map``,
            ``shared`` or ``percentile``) and ``output.scale_percentile``.
        evaluate / evaluate_baseline / random_orders / sanity: evaluate every map against the model,
            as the manifest's ``evaluate`` section (``result.evaluation`` of each explanation).

    Raises:
        SettingsError: (a ``ValueError``) a setting the manifest would also refuse, named with the
            same message (``model.input_size: 100000 is too large (at most 4096)``).
        ModelLoadError: (on the first :meth:`explain`) the model cannot be loaded.
    """

    def __init__(
        self,
        model: str = "imgfocus-vits14",
        *,
        methods: Sequence[str] | str = DEFAULT_METHODS,
        weights: str | os.PathLike | None = None,
        input_size: int | None = None,
        pretrained: bool = True,
        options: Mapping[str, Any] | None = None,
        head_fusion: str = "mean",
        discard_ratio: float = 0.0,
        rollout_start_layer: int = 1,
        target_classes: int | str | Sequence[int | str] | None = None,
        object_targets: bool = False,
        device: str = "auto",
        batch_size: int = 8,
        cmap: str = "inferno",
        alpha: float = 0.5,
        scale: str = "map",
        scale_percentile: float = 99.0,
        evaluate: bool = False,
        evaluate_baseline: str = "mean",
        random_orders: int = 5,
        sanity: bool = False,
    ):
        model_values = {"name": model, "weights": weights, "input_size": input_size, "pretrained": pretrained, "options": options}
        sections = check_overrides(
            model=model_values,
            attention={"head_fusion": head_fusion, "discard_ratio": discard_ratio,
                       "rollout_start_layer": rollout_start_layer, "target_classes": target_classes, "object_targets": object_targets},
            output={"cmap": cmap, "alpha": alpha, "scale": scale, "scale_percentile": scale_percentile},
            methods=[methods] if isinstance(methods, str) and methods != "all" else methods,
            evaluate={"enabled": evaluate, "baseline": evaluate_baseline, "random_orders": random_orders, "sanity": sanity},
        )
        self.options = build_options(device=device, batch_size=batch_size)
        self.settings = _Settings(
            model=sections["model"],
            attention=sections["attention"],
            detector=DetectorSettings(name=None),  # objects come only from the boxes given
            methods=sections["methods"],
            evaluate=sections["evaluate"],
        )
        self.output = sections["output"]
        self._kept: dict = {}  # the loaded model, kept between calls

    def explain(
        self,
        images: ImageInput | Sequence[ImageInput],
        boxes: Mapping[str, Box] | Sequence[Mapping[str, Box] | None] | None = None,
    ) -> Explanation | list[Explanation]:
        """Explain one image or a batch.

        Args:
            images: a path, a PIL image, or a list of them.
            boxes: for one image, ``{label: (x0, y0, x1, y1)}`` in its pixels; for a list, a list
                of those (or None). Images with boxes get the objects experiment.

        Returns:
            One :class:`Explanation`, or a list for a list of images. A batch gives the same
            numbers as one call per image.

        Raises:
            ImageError: an image cannot be read or explained (naming it).
        """
        from reportgen.compute import Computation
        from reportgen.experiments import ImageFailure
        from reportgen.imaging import from_pil

        single = isinstance(images, (str, os.PathLike, Image.Image))
        items = [images] if single else list(images)
        per_image = [boxes] if single else list(boxes) if boxes is not None else [None] * len(items)
        if len(per_image) != len(items):
            raise ValueError(f"boxes: {len(per_image)} entries for {len(items)} images")
        entries, memory = [], []
        for index, (item, item_boxes) in enumerate(zip(items, per_image)):
            in_memory = isinstance(item, Image.Image)
            path = Path(f"image-{index}") if in_memory else Path(item)
            memory.append(from_pil(item) if in_memory else None)
            entries.append(_entry(index, path, item_boxes))
        computation = Computation(self.settings, self.options.device, self.options.batch_size, self._kept)
        explained = []
        for outcome in computation.results(entries, memory):
            if isinstance(outcome, ImageFailure):
                raise ImageError(f"images[{outcome.entry.index}] ({outcome.entry.id}): {outcome.message}")
            out = self.output
            explained.append(Explanation(outcome, out.cmap, out.alpha, out.scale, out.scale_percentile))
        return explained[0] if single else explained


def _entry(index: int, path: Path, boxes: Mapping[str, Box] | None) -> ImageEntry:
    """An image entry, its boxes checked by the manifest's own rules for objects."""
    from pydantic import ValidationError

    from reportgen.config.schema import ObjectSpec

    objects = []
    for number, (label, box) in enumerate((boxes or {}).items()):
        try:
            spec = ObjectSpec(label=label, box=box)
        except ValidationError as err:
            raise SettingsError.of(f"boxes[{number}]", err, ObjectSpec) from None
        objects.append(ObjectBox(spec.label, *spec.box))
    name = path.stem or f"image-{index}"
    return ImageEntry(
        index=index, id=name, slug=f"image-{index}", path=path, title=name, caption="",
        kind="multi" if objects else "single", objects=tuple(objects),
    )


def build(manifest: str | os.PathLike, output: str | os.PathLike | None = None, **options: Any) -> BuildReport:
    """Build the site of a manifest, as ``reportgen build`` does.

    Args:
        manifest: the manifest file.
        output: the site folder (default: the manifest's ``output.dir``, else ``site``).
        **options: :class:`~reportgen.config.BuildOptions` fields (device, batch_size, strict,
            force, jobs, wait).

    Raises:
        ReportgenError: as the command line reports it (a bad manifest, a model that cannot be
            loaded, an output folder that must not be replaced ...).
        SettingsError: (a ``ValueError``) an impossible build option, named.
    """
    loaded = load_manifest(manifest)
    folder = Path(output) if output is not None else loaded.output.dir or DEFAULT_OUTPUT
    return _build_site(loaded, build_options(output=folder, **options))
