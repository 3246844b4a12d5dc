"""What a rebuild may reuse from the previous site, like coverage.py's html status file.

The output folder holds a status file with a format number, the reportgen version, a key of
everything that changes the numbers or figures (model identity, weights hash, input size,
rollout, detector and figure settings), the model/capture description of the run, and per image
a key of its inputs (image bytes, kind, boxes, page name) with the record its page renders from.
An image whose key matches and whose figures are on disk is not recomputed; titles and captions
are not in the key, so editing them only re-renders pages. A missing, corrupt or foreign status
file is discarded (with a warning when it exists but cannot be trusted). Failed images are never
cached, so they are retried on the next build.

The file is untrusted input (a site folder travels: an artifact, a zip, a checked-out branch). Its
model description and each record it supplies are checked against a schema (types, lengths, value
ranges, array shapes that agree with the model); page and figure names are never taken from it
but made from the manifest entry's slug, and a record whose names differ from those does not fit.
A record that does not fit is recomputed, with one warning. Figures are carried over only when
they are regular files really inside the old site (no symbolic link is followed), and only the
files the record's figure index names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import reportgen
from reportgen import outdir
from reportgen.config import MAX_OBJECTS, ImageEntry, Manifest, ModelSettings
from reportgen.hashing import file_sha256
from reportgen.model.sources import IMGFOCUS_NAME, IMGFOCUS_ONNX_SHA256
from reportgen.site.figures import figure_files, figure_index
from reportgen.site.pages import page_name

log = logging.getLogger(__name__)

STATUS_FILE = ".reportgen-status.json"
STATUS_FORMAT = 2  # 2: one explorer sprite sheet per image

# Bounds of what a cached record may hold.
MAX_TEXT = 500  # labels, reasons, names and other strings (characters; the manifest's labels are shorter)
MAX_COUNT = 1 << 20  # sizes, grid sides, layers, heads, token counts
MAX_LIST = 256  # layers captured, version entries, data-config lists


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(settings: ModelSettings) -> dict[str, Any]:
    """What identifies the model's numbers without loading it (the weights file is hashed)."""
    if settings.name == IMGFOCUS_NAME:
        weights = IMGFOCUS_ONNX_SHA256
    elif settings.weights is not None and settings.weights.is_file():
        weights = file_sha256(settings.weights)
    else:
        weights = "hub" if settings.pretrained else "random"
    return {
        "name": settings.name,
        "weights": weights,
        "input_size": settings.input_size,
        "options": dict(settings.options),
    }


def settings_key(manifest: Manifest) -> str:
    """Key of everything global that changes numbers or figures."""
    return _digest(
        {
            "format": STATUS_FORMAT,
            "reportgen": reportgen.__version__,
            "model": model_identity(manifest.model),
            "attention": [manifest.attention.head_fusion, manifest.attention.discard_ratio],
            "detector": [manifest.detector.name, manifest.detector.threshold],
            "figures": [manifest.output.cmap, manifest.output.alpha],
        }
    )


def image_key(entry: ImageEntry, global_key: str) -> str:
    """Key of one image's inputs: its bytes, kind, boxes and page name, under the global key."""
    return _digest(
        {
            "global": global_key,
            "image": file_sha256(entry.path),
            "kind": entry.kind,
            "slug": entry.slug,
            "objects": [[b.label, *b.as_tuple()] for b in entry.objects],
        }
    )


# Strict types: "1" is not a number and true is not a count; JSON's NaN and Infinity are refused
# (results.json and the records write them as null), and so are strings with lone surrogates,
# which could not be written to a page.
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Number = Finite | None
Share = Annotated[float, Field(ge=0.0, le=1.0)] | None  # scores, visible shares, overlaps
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Pair = Annotated[list[Count], Field(min_length=2, max_length=2)]
Box = Annotated[list[Finite], Field(min_length=4, max_length=4)]
Matrix = list[list[Number]]  # shapes are checked against the model in _check_record


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _DataConfig(_Schema):
    input_size: Annotated[list[Count], Field(max_length=4)]
    interpolation: Text | None
    mean: Annotated[list[Number], Field(max_length=4)] | Number
    std: Annotated[list[Number], Field(max_length=4)] | Number
    crop_pct: Number
    crop_mode: Text | None


class _ModelInfo(_Schema):
    name: Text
    architecture: Text
    source: Text
    weights_file: Text | None
    weights_sha256: Text | None
    input_size: Pair
    patch_size: Pair
    grid: Pair
    num_prefix_tokens: Count
    depth: Count
    heads: Count | None
    data_config: _DataConfig


class _Capture(_Schema):
    method: Text
    layers: Annotated[list[Text], Field(max_length=MAX_LIST)]
    fused_attention: Count


class _ModelRun(_Schema):
    """``model_run``: what :func:`reportgen.compute.model_run` writes."""

    model: _ModelInfo
    capture: _Capture
    versions: Annotated[dict[Text, Text | None], Field(max_length=MAX_LIST)]


class _Entropy(_Schema):
    nats: Number
    normalised: Number


class _BoxMass(_Schema):
    label: Text
    mass: Number
    area_share: Number


class _Attention(_Schema):
    head_entropy: list[_Entropy]
    mean_entropy: _Entropy
    max_entropy: _Entropy
    token_entropy: _Entropy
    token_count: Count
    prefix_mass: Number
    box_mass: Annotated[list[_BoxMass], Field(max_length=MAX_OBJECTS)]
    cls_mean: Matrix
    cls_max: Matrix
    cls_heads: list[Matrix]


class _Rollout(_Schema):
    raw_entropy: _Entropy
    rollout_entropy: _Entropy
    entropy_change: Number
    spearman: Number
    top_overlap: Share
    raw: Matrix
    rollout: Matrix


class _Object(_Schema):
    label: Text
    base_label: Text
    box: Box
    input_box: Box
    visible: Share
    score: Share


class _Skipped(_Schema):
    label: Text
    reason: Text


class _Objects(_Schema):
    source: Text
    labels: Annotated[list[Text], Field(max_length=MAX_OBJECTS)]
    objects: Annotated[list[_Object], Field(max_length=MAX_OBJECTS)]
    skipped: Annotated[list[_Skipped], Field(max_length=MAX_OBJECTS)]
    mean_plain_similarity: Number
    mean_rollout_similarity: Number
    plain_similarity: Matrix
    rollout_similarity: Matrix
    difference: Matrix
    detector_unavailable: None  # an image whose detector could not be loaded is never cached


class _Record(_Schema):
    """A cached page record (what :func:`reportgen.site.pages.image_record` writes for an image that worked)."""

    # Replaced from the manifest entry when the record is reused, so only their type matters.
    id: str
    title: str
    caption: str
    source_name: str
    # Must be what this entry's slug gives (checked in _check_record).
    slug: Text
    page: Text
    kind: Literal["single", "multi"]
    figures: dict[str, Any]
    error: None  # failed images are never cached
    size: Pair
    attention: _Attention
    rollout: _Rollout
    objects: _Objects | None


class _Entry(_Schema):
    key: Text
    record: _Record


@dataclass
class Status:
    """The status file's content.

    Attributes:
        settings_key: :func:`settings_key` of the build that wrote it.
        model_run: model, capture and versions description of that build.
        entries: per slug, ``{"key": image key, "record": page record}``.
    """

    settings_key: str
    model_run: dict[str, Any] | None = None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": STATUS_FORMAT,
                "reportgen": reportgen.__version__,
                "settings_key": self.settings_key,
                "model_run": self.model_run,
                "entries": self.entries,
            },
            sort_keys=True,
            separators=(",", ":"),  # compact: Python's C encoder (indented JSON is ~3x slower to write)
        )


def read_status(output: Path, current_key: str, warnings: list[str]) -> Status | None:
    """The previous build's status, if it exists and can be trusted for ``current_key``.

    The file's frame and its ``model_run`` are checked here (a ``model_run`` that does not fit
    discards the whole cache, since every record is checked against it); each record is checked
    by :func:`reuse` when an image asks for it.
    """
    path = output / STATUS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != STATUS_FORMAT:
            raise ValueError(f"unknown format {_short(data.get('format') if isinstance(data, dict) else data)}")
        if data.get("reportgen") != reportgen.__version__:
            raise ValueError(f"written by reportgen {_short(data.get('reportgen'))}, this is {reportgen.__version__}")
        entries, model_run = data["entries"], data.get("model_run")
        if not isinstance(entries, dict):
            raise ValueError("malformed entries")
        if model_run is not None:
            _ModelRun.model_validate(model_run)
        elif entries:
            raise ValueError("images but no model_run")
        status = Status(settings_key=str(data["settings_key"]), model_run=model_run, entries=entries)
    except ValidationError as err:
        warnings.append(f"{path}: ignoring the build cache (model_run{_problem(err)}); everything is recomputed.")
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.append(f"{path}: ignoring the build cache ({err}); everything is recomputed.")
        return None
    if status.settings_key != current_key:
        log.info("settings changed since the last build: everything is recomputed")
        return None
    return status


def reuse(
    status: Status, entry: ImageEntry, key: str, output: Path, staging: Path, warnings: list[str]
) -> dict[str, Any] | None:
    """Carry an unchanged image's figures into ``staging``; its page record, or None to recompute.

    A record whose key matches but that does not fit the schema, or whose figures are not regular
    files inside ``output``, is recomputed with one warning in ``warnings``.
    """
    cached = status.entries.get(entry.slug)
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None  # new or changed (a key of the wrong type never matches)
    where = f"{output / STATUS_FILE}: entry {entry.slug!r}"
    try:
        figures = _check_record(_Entry.model_validate(cached).record, entry, _ModelRun.model_validate(status.model_run))
    except ValidationError as err:
        warnings.append(f"{where} does not fit the build cache's schema ({_problem(err)[1:]}); it is recomputed.")
        return None
    except ValueError as err:
        warnings.append(f"{where} does not fit this image ({err}); it is recomputed.")
        return None
    sources = []
    for relative in figure_files(figures):
        try:
            source = old_file(output, relative)
        except ValueError as err:
            warnings.append(f"{where}: {err}; the image is recomputed.")
            return None
        if source is None:
            return None  # a figure was deleted: recompute
        sources.append((source, relative))
    try:
        for source, relative in sources:
            outdir.link_or_copy(source, staging, relative)
    except OSError:
        return None
    # Names come from the slug and text that is not part of the key from the manifest as it is now.
    return {
        **cached["record"],
        "id": entry.id,
        "slug": entry.slug,
        "page": page_name(entry.slug),
        "kind": entry.kind,
        "figures": figures,
        "title": entry.title,
        "caption": entry.caption,
        "source_name": entry.path.name,
    }


def reuse_file(output: Path, staging: Path, relative: str) -> bool:
    """Carry one file of the previous site into ``staging`` (for a file that depends only on
    settings in the key); False if it is not there as a regular file inside ``output``."""
    try:
        source = old_file(output, relative)
        if source is None:
            return False
        outdir.link_or_copy(source, staging, relative)
    except (OSError, ValueError):
        return False
    return True


def old_file(output: Path, relative: str) -> Path | None:
    """``relative`` in the old site if it is there as a regular file really inside ``output``.

    Returns:
        The path, or None if there is no such file.

    Raises:
        ValueError: if it, or a folder on the way, is a symbolic link or not a regular file or
            folder: nothing outside the old site is ever carried into the new one.
    """
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{relative!r} is not a plain relative path")
    path = output
    for index, part in enumerate(parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        wanted, what = (stat.S_ISREG, "a regular file") if index == len(parts) - 1 else (stat.S_ISDIR, "a folder")
        if not wanted(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else f"not {what}"
            raise ValueError(f"{path} is {kind}, not carried over")
    real = path.resolve()
    if output.resolve() not in real.parents:
        raise ValueError(f"{path} lies outside {output}, not carried over")
    return path


def _check_record(record: _Record, entry: ImageEntry, run: _ModelRun) -> dict[str, Any]:
    """Check what a schema cannot: names made from this entry's slug and array shapes that agree
    with the model. Returns the figure index the record must have (see :func:`figure_index`).

    Raises:
        ValueError: naming the first field that does not fit (never quoting its value).
    """
    if record.slug != entry.slug:
        raise ValueError("slug is not this image's")
    if record.page != page_name(entry.slug):
        raise ValueError(f"page is not {page_name(entry.slug)!r}")
    if record.kind != entry.kind:
        raise ValueError("kind is not this image's")
    if (record.objects is None) != (entry.kind != "multi"):
        raise ValueError("objects do not match the image's kind")
    rows, cols = run.model.grid
    a, r = record.attention, record.rollout
    heads = len(a.cls_heads)
    if not 1 <= heads <= MAX_COUNT or len(a.head_entropy) != heads:
        raise ValueError("attention.cls_heads and attention.head_entropy do not agree")
    grids = {"attention.cls_mean": a.cls_mean, "attention.cls_max": a.cls_max, "rollout.raw": r.raw, "rollout.rollout": r.rollout}
    grids.update({f"attention.cls_heads.{h}": grid for h, grid in enumerate(a.cls_heads)})
    for name, grid in grids.items():
        if not _is_shape(grid, rows, cols):
            raise ValueError(f"{name} is not {rows}x{cols}, the model's patch grid")
    if a.token_count != run.model.num_prefix_tokens + rows * cols:
        raise ValueError("attention.token_count does not match the model")
    if len(a.box_mass) > len(entry.objects):  # boxes cropped away have none
        raise ValueError("attention.box_mass does not match the image's boxes")
    count = 0
    if record.objects is not None:
        o = record.objects
        count = len(o.objects)
        if len(o.labels) != count:
            raise ValueError("objects.labels does not match objects.objects")
        for name in ("plain_similarity", "rollout_similarity", "difference"):
            if not _is_shape(getattr(o, name), count, count):
                raise ValueError(f"objects.{name} is not {count}x{count}")
    figures = figure_index(f"figures/{entry.slug}", len(run.capture.layers), heads, count)
    if record.figures != figures:
        raise ValueError("figures are not the ones made for this image")
    return figures


def _is_shape(matrix: list[list[Any]], rows: int, cols: int) -> bool:
    return len(matrix) == rows and all(len(row) == cols for row in matrix)


def _problem(err: ValidationError) -> str:
    """The first problem of a validation error, as ``.field.path: message`` (no input values)."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = "".join(f".{part}" for part in first["loc"])  # may hold a dict key from the file
    where = "".join(c if c.isprintable() else "?" for c in where)
    return (where if len(where) <= 80 else where[:77] + "...") + f": {first['msg']}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
