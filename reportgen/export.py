"""``reportgen export``: one image's panels as a print-ready figure (SVG, PDF or PNG).

The figure is drawn from the image's record (:mod:`reportgen.site.records`) and the model's view
of the image, which come from one of two places:

- a **site** (its folder, or its ``results.json``): the record in results.json and the model
  input the site shows (``figures/<slug>/input.jpg``). Nothing is recomputed and no model is
  loaded, so the figure shows exactly the numbers of the pages. A site is untrusted input (it
  travels as an artifact or a zip): results.json is read as a regular file of bounded size, the
  record and model description are checked against the build cache's schema and against each
  other (grids of the model's patch grid, a scale for every map), the input image must be a
  regular file inside the site at the model's input size, and any problem is one message naming
  the file and the key.
- a **manifest**: the model runs on that one image (no detector: the figure has no objects), with
  the manifest's settings, and the record is made as a build makes it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import ValidationError

from reportgen.config import ExportOptions, SettingsError, load_manifest, slugify
from reportgen.config.schema import AttentionSettings, OutputSettings
from reportgen.errors import ReportgenError
from reportgen.files import NotRegularFile, open_regular
from reportgen.methods import METHODS

#: Largest results.json read back (a site of thousands of images at a large grid).
MAX_RESULTS_BYTES = 512 * 1024 * 1024
#: How many ids an "unknown image" message lists before "and N more".
LISTED_IDS = 40


class ExportError(ReportgenError):
    """The image cannot be exported: an unknown id, a failed image, or a site that does not fit."""


@dataclasses.dataclass(frozen=True)
class Exportable:
    """What the figure is drawn from.

    Attributes:
        record: the image's record (what its page and results.json show).
        run: results.json's top level without the images (model, settings).
        view: the model's view of the image (model-input size).
    """

    record: dict[str, Any]
    run: dict[str, Any]
    view: Image.Image


def export(source: Path, options: ExportOptions) -> Path:
    """Write the figure of image ``options.image`` of ``source`` (a site folder, a results.json or
    a manifest) and return the file written (``options.output``, else ``<slug>.<format>``).

    Raises:
        ReportgenError: an unknown image, a failed image, a site or manifest that cannot be read.
    """
    from reportgen.site.export import export_figure, export_maps, save_figure

    if not source.exists():
        raise ExportError(f"{source}: no such file or folder; give a site folder, its results.json or a manifest")
    data = read_site(source, options.image) if _is_site(source) else compute(source, options.image, options.device)
    record = data.record
    title = record["title"] if isinstance(record.get("title"), str) and record["title"] else options.image
    figure = export_figure(title, data.view, export_maps(record, data.run), data.run, np.asarray(record["content"]["weights"]))
    output = options.output or Path(f"{slugify(options.image)}.{options.format}")
    buffer = io.BytesIO()
    save_figure(figure, buffer, options.format, options.dpi)
    _write_replacing(output, buffer.getvalue())
    return output


def _is_site(source: Path) -> bool:
    return source.is_dir() or source.suffix.lower() == ".json"


def _write_replacing(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, then a rename)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise ExportError(f"{path}: cannot write the figure: {err.strerror or err}") from None


def _unknown(where: Path, image: str, ids: list[str], what: str) -> ExportError:
    shown = ", ".join(repr(i) for i in ids[:LISTED_IDS])
    more = f" and {len(ids) - LISTED_IDS} more" if len(ids) > LISTED_IDS else ""
    return ExportError(f"{where}: no image with id {image!r} in this {what}; its images are: {shown}{more}.")


# --- from a manifest ------------------------------------------------------------------------------


def compute(manifest_path: Path, image: str, device: str) -> Exportable:
    """Run the model over one image of a manifest and make its record as a build does."""
    from reportgen.compute import Computation
    from reportgen.experiments import ImageFailure
    from reportgen.site.records import image_record, model_run_record, run_record
    from reportgen.site.scales import ScaleSetting

    manifest = load_manifest(manifest_path)
    entry = next((e for e in manifest.images if e.id == image), None)
    if entry is None:
        raise _unknown(manifest_path, image, [e.id for e in manifest.images], "manifest")
    # The figure has no objects: a multi image is explained as a single one (no detector loads).
    entry = dataclasses.replace(entry, kind="single")
    computation = Computation(manifest, device, batch_size=1)
    (outcome,) = list(computation.results([entry]))  # the whole generator: the model stage ends cleanly
    if isinstance(outcome, ImageFailure):
        raise ExportError(f"{manifest_path}: image {image!r}: {outcome.message}")
    record = image_record(outcome, {}, ScaleSetting.of(manifest.output))
    run = run_record(manifest, model_run_record(computation.model_run), [record])
    return Exportable(record=record, run=run, view=outcome.view)


# --- from a site ----------------------------------------------------------------------------------


def read_site(source: Path, image: str) -> Exportable:
    """The record of ``image`` in a site's results.json (``source``: the site folder or the file),
    with the model input the site shows, every part checked before it is used.

    Raises:
        ExportError: naming the file and the key that does not fit.
    """
    from reportgen.cache.schema import ModelRun, Record
    from reportgen.site.pages import FORMAT_VERSION

    path = source / "results.json" if source.is_dir() else source
    site = path.parent
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object at the top level")
    if data.get("format") != FORMAT_VERSION:
        raise ExportError(f"{path}: format: {_short(data.get('format'))} is not {FORMAT_VERSION}, the results.json "
                          "format this reportgen reads; rebuild the site, or export from its manifest")
    images = data.get("images")
    if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
        raise ExportError(f"{path}: images: expected a list of objects")
    ids = [i.get("id") for i in images if isinstance(i.get("id"), str)]
    found = [(n, i) for n, i in enumerate(images) if i.get("id") == image]
    if not found:
        raise _unknown(path, image, ids, "site")
    index, record = found[0]
    where = f"{path}: images[{index}] (id {image!r})"
    if record.get("error") is not None:
        raise ExportError(f"{where}: this image failed when the site was built ({_short(record.get('error'), 200)}); "
                          "it has no maps to export")
    try:
        run = ModelRun.model_validate({key: data.get(key) for key in ("model", "capture", "versions")})
    except ValidationError as err:
        raise ExportError(f"{path}: {_problem(err)}") from None
    try:
        checked = Record.model_validate(record)
    except ValidationError as err:
        raise ExportError(f"{where}.{_problem(err)}") from None
    settings = _check_settings(path, data.get("settings"))
    _check_maps(where, record, settings, tuple(run.model.grid))
    view = _read_view(site, where, checked.figures.get("input"), f"figures/{checked.slug}/input.jpg", tuple(run.model.input_size))
    top = {key: data[key] for key in ("title", "model", "capture", "versions", "settings") if key in data}
    return Exportable(record=record, run={**top, "settings": settings}, view=view)


def _read_json(path: Path) -> Any:
    try:
        fd, info = open_regular(path)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file; give a site folder (with results.json), its results.json or a manifest") from None
    except IsADirectoryError:
        raise ExportError(f"{path}: is a folder, not a results.json") from None
    except NotRegularFile as err:
        raise ExportError(f"{path}: is {err.kind}, not a regular file") from None
    except OSError as err:
        raise ExportError(f"{path}: cannot be read ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as file:
        if info.st_size > MAX_RESULTS_BYTES:
            raise ExportError(f"{path}: is larger than {MAX_RESULTS_BYTES // (1024 * 1024)} MiB, the limit for a results.json")
        raw = file.read(MAX_RESULTS_BYTES + 1)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ExportError(f"{path}: is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except ValueError as err:
        raise ExportError(f"{path}: {err}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number results.json holds (it writes null)")


def _check_settings(path: Path, settings: Any) -> dict[str, Any]:
    """The settings the figure reads (methods, colour map, opacity, scale), checked by the
    manifest's own rules."""
    if not isinstance(settings, dict):
        raise ExportError(f"{path}: settings: expected an object")
    methods = settings.get("methods")
    if not isinstance(methods, list) or not methods or len(set(map(str, methods))) != len(methods) or not all(
        isinstance(m, str) and m in METHODS for m in methods
    ):
        raise ExportError(f"{path}: settings.methods: expected a list of distinct method names ({', '.join(METHODS)})")
    # scale_percentile is null where the scale does not use one
    values = {key: settings.get(key) for key in ("cmap", "alpha", "scale", "scale_percentile") if key in settings}
    if values.get("scale_percentile") is None:
        values.pop("scale_percentile", None)
    try:
        output = OutputSettings(**values)
    except ValidationError as err:
        raise ExportError(f"{path}: settings{str(SettingsError.of('output', err, OutputSettings))[len('output'):]}") from None
    from reportgen.site.export import target_settings

    try:
        target_settings(settings)
    except ValidationError as err:
        raise ExportError(f"{path}: settings{str(SettingsError.of('attention', err, AttentionSettings))[len('attention'):]}") from None
    return {**settings, "methods": list(methods), "cmap": output.cmap, "alpha": output.alpha, "scale": output.scale,
            "scale_percentile": output.scale_percentile if settings.get("scale_percentile") is not None else None}


def _check_maps(where: str, record: dict[str, Any], settings: dict[str, Any], grid: tuple[int, int]) -> None:
    """Every map the methods make is there, on the model's patch grid, with numbers and a scale."""
    from reportgen.site.export import _grid, map_names

    rows, cols = grid
    for method in settings["methods"]:
        for name in map_names(record, settings, method):
            try:
                values = _grid(record, name)
            except (KeyError, TypeError):
                raise ExportError(f"{where}: the map {name!r} of the method {method!r} is missing") from None
            _check_grid(f"{where}: map {name!r}", values, rows, cols)
            scale = (record["scales"]["maps"] or {}).get(name)
            if scale is None or scale.get("top") is None:
                raise ExportError(f"{where}.scales.maps.{name}: missing (every map has a colour scale with a top value)")
            if name in (record.get("maps") or {}) and record["maps"][name].get("method") != method:
                raise ExportError(f"{where}.maps.{name}.method: is not {method!r}")
    _check_grid(f"{where}.content.weights", record["content"]["weights"], rows, cols)
    if np.any((np.asarray(record["content"]["weights"], dtype=np.float64) < 0) | (np.asarray(record["content"]["weights"]) > 1)):
        raise ExportError(f"{where}.content.weights: expected fractions from 0 to 1")


def _check_grid(where: str, values: Any, rows: int, cols: int) -> None:
    if not (isinstance(values, list) and len(values) == rows and all(isinstance(r, list) and len(r) == cols for r in values)):
        raise ExportError(f"{where}: is not {rows}x{cols}, the model's patch grid")
    if any(v is None for r in values for v in r):
        raise ExportError(f"{where}: holds null where a number must be")


def _read_view(site: Path, where: str, named: Any, expected: str, size: tuple[int, int]) -> Image.Image:
    """The model input the site shows, at the model's input size, from a regular file inside the site."""
    from reportgen.cache.status import old_file

    if named != expected:
        raise ExportError(f"{where}.figures.input: is not {expected!r}, the model input of this image")
    try:
        path = old_file(site, expected)
    except ValueError as err:
        raise ExportError(f"{where}.figures.input: {err}") from None
    if path is None:
        raise ExportError(f"{site / expected}: missing; the site is incomplete (rebuild it, or export from its manifest)")
    try:
        with Image.open(path) as image:
            if image.format != "JPEG" or image.size != size:
                raise ExportError(f"{path}: expected a {size[0]}x{size[1]} JPEG, the model's input, found "
                                  f"a {image.size[0]}x{image.size[1]} {image.format}")
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise ExportError(f"{path}: cannot be read as an image ({err})") from None


def _problem(err: ValidationError) -> str:
    """The first problem of a validation error as ``key.path: message`` (no input values)."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    where = "".join(c if c.isprintable() else "?" for c in where)
    return (where if len(where) <= 120 else where[:117] + "...") + f": {first['msg']}"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
