"""How a build runs (as opposed to what it computes): validated by the same rules as the settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, InstanceOf, ValidationError
from pydantic.dataclasses import dataclass

from reportgen.config.messages import SettingsError
from reportgen.config.rules import Count, Flag, OneOf, Pattern, Text

__all__ = ["DEFAULT_OUTPUT", "DEVICE_PATTERN", "EXPORT_FORMATS", "MAX_DPI", "BuildOptions", "ExportOptions", "build_options",
           "export_options"]

DEFAULT_OUTPUT = Path("site")
#: Devices a build can run on; whether one is present is checked when the model is loaded.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"

_DEVICE = Pattern(DEVICE_PATTERN, "auto, cpu, cuda, cuda:N or mps", hints=(
    ("meta", "the meta device holds no data, so there would be no attention to show"),
))


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class BuildOptions:
    """How to run a build (things that do not change the numbers, except ``device``).

    Attributes:
        output: the site folder to (re)place.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1`` ...
        batch_size: images per forward pass.
        strict: stop at the first image that fails instead of reporting it on its card.
        force: ignore the previous build's cache and recompute every image.
        jobs: figure writers: 1 is a thread, more are processes; either way figures are written
            while the model runs the next batch.
        model_cache: a dict the caller keeps across builds (``--watch``): the loaded model is
            kept in it and reused while the model settings and device stay the same.
        wait: when another build holds the output folder's lock, wait for it (else fail at once).
        on_wait: called with a message when the build has to wait for that lock.

    Raises:
        pydantic.ValidationError: a field has an impossible value (:func:`build_options` turns it
            into a :class:`~reportgen.config.SettingsError`).
    """

    output: Path = DEFAULT_OUTPUT
    device: Annotated[str, _DEVICE] = "auto"
    batch_size: Annotated[int, Count()] = 8
    strict: Annotated[bool, Flag()] = False
    force: Annotated[bool, Flag()] = False
    jobs: Annotated[int, Count()] = 1
    # InstanceOf: the very dict the caller keeps, not a validated copy of it.
    model_cache: InstanceOf[dict] | None = dataclasses.field(default=None, compare=False, repr=False)
    wait: Annotated[bool, Flag()] = True
    on_wait: Callable[[str], None] | None = dataclasses.field(default=None, compare=False, repr=False)


def build_options(**values) -> BuildOptions:
    """The build options ``values``; every impossible one is named in one
    :class:`~reportgen.config.SettingsError` (a ``ValueError``), as a bad setting would be."""
    try:
        return BuildOptions(**values)
    except ValidationError as err:
        raise SettingsError.of("options", err, BuildOptions) from None


#: The formats ``reportgen export`` writes (matplotlib's writers of the same names).
EXPORT_FORMATS = ("svg", "pdf", "png")
#: Highest ``--dpi``: a 4-map figure at 1200 dpi is already about 12000 x 3600 pixels.
MAX_DPI = 1200


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ExportOptions:
    """What ``reportgen export`` writes.

    Attributes:
        image: the id of the image (as in the manifest, and ``id`` in results.json).
        format: ``svg``, ``pdf`` or ``png``.
        dpi: dots per inch: the PNG's pixels per inch (its size is the figure's inches times
            this); in PDF and SVG only the colour bars' gradients are rasterised at it (the
            images are embedded at their own pixels, the text and lines are vectors).
        output: the file to write.
        device: where the model runs when exporting from a manifest.
    """

    image: Annotated[str, Text(1000, empty=False)]
    format: Annotated[str, OneOf(EXPORT_FORMATS)] = "svg"
    dpi: Annotated[int, Count(most=MAX_DPI)] = 300
    output: Path | None = None
    device: Annotated[str, _DEVICE] = "auto"


def export_options(**values) -> ExportOptions:
    """The export options ``values``; every impossible one is named in one
    :class:`~reportgen.config.SettingsError` (section ``export``)."""
    try:
        return ExportOptions(**values)
    except ValidationError as err:
        raise SettingsError.of("export", err, ExportOptions) from None
