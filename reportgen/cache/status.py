"""What a rebuild may reuse from the previous site, like coverage.py's html status file.

The output folder holds a status file with a format number, the reportgen version, a key of
everything that changes the numbers or figures (model identity, weights hash, input size,
rollout settings including its start layer, detector and figure settings), the model/capture description of the run, and per image
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
from typing import Any

from pydantic import ValidationError

import reportgen
from reportgen import outdir
from reportgen.cache.schema import MAX_COUNT, Entry, Evaluation, ModelRun, Record
from reportgen.config import ImageEntry, Manifest
from reportgen.hashing import file_sha256
from reportgen.methods import METHODS, figure_key, method_maps, sectioned_methods
from reportgen.methods.evaluation import CURVE_KINDS
from reportgen.model.sources import model_identity
from reportgen.site.figures import figure_files, figure_index
from reportgen.site.records import page_name, record_text
from reportgen.site.scales import ScaleSetting

log = logging.getLogger(__name__)

STATUS_FILE = ".reportgen-status.json"
STATUS_FORMAT = 13  # raised whenever what a record holds, or what its numbers mean, changes



def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def settings_key(manifest: Manifest) -> str:
    """Key of everything global that changes numbers or figures."""
    return _digest(
        {
            "format": STATUS_FORMAT,
            "reportgen": reportgen.__version__,
            "model": model_identity(manifest.model),
            "methods": list(manifest.methods),
            "attention": [
                manifest.attention.head_fusion,
                manifest.attention.discard_ratio,
                manifest.attention.rollout_start_layer,
                # Only when chosen, so a build that explains the top-1 class keeps its key.
                *([manifest.attention.target_classes.as_written()] if manifest.attention.target_classes is not None else []),
                *(["object targets"] if manifest.attention.object_targets else []),
            ],
            "detector": [manifest.detector.name, manifest.detector.threshold],
            # Not the overlays' opacity: the pages apply it, no figure holds it.
            "figures": [manifest.output.cmap, *_scale_key(manifest)],
            # Only when on, so a build without the evaluation keeps its key.
            # Which images get the sanity check is in each image's key.
            **({"evaluate": [manifest.evaluate.baseline, manifest.evaluate.random_orders]}
               if manifest.evaluate.enabled else {}),
        }
    )


def _scale_key(manifest: Manifest) -> list:
    """The colour scale; its percentile only where it is used, so changing an unused one redraws nothing."""
    setting = ScaleSetting.of(manifest.output)
    return [setting.kind] if setting.used_percentile is None else [setting.kind, setting.used_percentile]


def image_key(entry: ImageEntry, global_key: str, sanity: bool = False) -> str:
    """Key of one image's inputs: its bytes, kind, boxes and page name, and whether it gets the
    sanity check (``evaluate.sanity``), under the global key."""
    return _digest(
        {
            "global": global_key,
            "image": file_sha256(entry.path),
            "kind": entry.kind,
            "slug": entry.slug,
            "objects": [[b.label, *b.as_tuple()] for b in entry.objects],
            # Only when checked, so an image without the check keeps its key.
            **({"sanity": True} if sanity else {}),
        }
    )


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

    def to_json(self, record_texts: dict[str, str] | None = None) -> str:
        """The file's text. ``record_texts``: per slug, the entry's record as
        :func:`~reportgen.site.records.record_text` encodes it (results.json's line), so a build
        encodes each record once; the others are encoded here."""
        texts = record_texts or {}
        entries = ", ".join(
            f"{_dump(slug)}: {{\"key\": {_dump(entry['key'])}, \"record\": "
            f"{texts[slug] if slug in texts else record_text(entry['record'])}}}"
            for slug, entry in sorted(self.entries.items())
        )
        # "entries" sorts first among the top-level keys, as json.dumps(sort_keys=True) puts them.
        rest = _dump({
            "format": STATUS_FORMAT,
            "reportgen": reportgen.__version__,
            "settings_key": self.settings_key,
            "model_run": self.model_run,
        })
        return f'{{"entries": {{{entries}}}, {rest[1:]}'


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


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
            ModelRun.model_validate(model_run)
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
    status: Status, entry: ImageEntry, key: str, methods: tuple[str, ...], output: Path, staging: Path, warnings: list[str],
    targets: int = 1, object_targets: bool = False, evaluate: bool = False,
) -> dict[str, Any] | None:
    """Carry an unchanged image's figures into ``staging``; its page record, or None to recompute.
    ``targets`` is how many class (or label-free) targets the methods that explain one have maps
    for, ``object_targets`` whether they explain each object too, ``evaluate`` whether the build
    evaluates the maps (the record must hold the evaluation).

    A record whose key matches but that does not fit the schema, or whose figures are not regular
    files inside ``output``, is recomputed with one warning in ``warnings``.
    """
    cached = status.entries.get(entry.slug)
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None  # new or changed (a key of the wrong type never matches)
    where = f"{output / STATUS_FILE}: entry {entry.slug!r}"
    try:
        record = Entry.model_validate(cached).record
        figures = _check_record(
            record, entry, methods, ModelRun.model_validate(status.model_run), targets, object_targets, evaluate
        )
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


def _check_record(
    record: Record, entry: ImageEntry, methods: tuple[str, ...], run: ModelRun, targets: int = 1,
    object_targets: bool = False, evaluate: bool = False,
) -> dict[str, Any]:
    """Check what a schema cannot: names made from this entry's slug, the sections the methods
    make, and array shapes that agree with the model. Returns the figure index the record must
    have (see :func:`figure_index`).

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
    a, r = record.attention, record.rollout
    shown = sectioned_methods(methods)
    if (a is None) == ("attention" in shown):
        raise ValueError("attention does not match the methods")
    if (r is None) == ("rollout" in shown):
        raise ValueError("rollout does not match the methods")
    rows, cols = run.model.grid
    heads = run.model.heads or 0
    grids = {}
    if a is not None:
        if not 1 <= len(a.cls_heads) <= MAX_COUNT or len(a.cls_heads) != heads or len(a.head_entropy) != heads:
            raise ValueError("attention.cls_heads and attention.head_entropy do not agree with the model's heads")
        grids.update({"attention.cls_mean": a.cls_mean, "attention.cls_max": a.cls_max})
        grids.update({f"attention.cls_heads.{h}": grid for h, grid in enumerate(a.cls_heads)})
        if a.token_count != run.model.num_prefix_tokens + rows * cols:
            raise ValueError("attention.token_count does not match the model")
        if len(a.box_mass) > len(entry.objects):  # boxes cropped away have none
            raise ValueError("attention.box_mass does not match the image's boxes")
    if r is not None:
        grids.update({"rollout.raw": r.raw, "rollout.rollout": r.rollout})
    grids["content.weights"] = record.content.weights
    explained = len(record.objects.objects) if object_targets and record.objects is not None else 0
    map_names = sorted(m for name in methods for m, _ in method_maps(name, targets, explained))
    if sorted(record.content.padding_share) != map_names:
        raise ValueError("content.padding_share does not name the methods' maps")
    depth = len(run.capture.layers)
    if sorted(record.dominant_layers) != sorted(methods) or any(
        not 1 <= p.layer <= depth for peaks in record.dominant_layers.values() for p in peaks
    ):
        raise ValueError("dominant_layers does not match the methods and the model's layers")
    entropies = record.layer_entropy
    if entropies is None or sorted(entropies) != sorted(methods) or any(len(v) != depth for v in entropies.values()):
        raise ValueError("layer_entropy does not have one entry per layer for each method")
    if sorted(record.concentration) != map_names:
        raise ValueError("concentration does not name the methods' maps")
    if any(c.peak[0] >= rows or c.peak[1] >= cols for c in record.concentration.values()):
        raise ValueError("concentration.peak is outside the model's patch grid")
    if record.norms is not None:
        n, depth = record.norms, len(run.capture.layers)
        if not (len(n.patches) == len(n.prefix) == len(n.threshold) == len(n.outliers) == depth):
            raise ValueError("norms do not have one entry per layer")
        grids.update({f"norms.patches.{layer}": grid for layer, grid in enumerate(n.patches)})
        if any(len(p) != run.model.num_prefix_tokens for p in n.prefix):
            raise ValueError("norms.prefix does not match the model's prefix tokens")
        if any(r >= rows or c >= cols for layer in n.outliers for r, c in layer):
            raise ValueError("norms.outliers is outside the model's patch grid")
    if sorted(record.scales.maps) != map_names:
        raise ValueError("scales.maps does not name the methods' maps")
    if sorted(record.scales.explorer) != sorted(methods):
        raise ValueError("scales.explorer does not name the methods")
    if (record.scales.tokens is None) == ("attention" in methods):
        raise ValueError("scales.tokens does not match the methods")
    others = [(name, m, figure_key(stem)) for name in methods if name not in shown for m, stem in method_maps(name, targets, explained)]
    if sorted(record.maps or {}) != sorted(m for _, m, _ in others):
        raise ValueError("maps do not match the methods")
    for method, map_name, figure in others:
        entry_map = record.maps[map_name]
        if entry_map.figure != figure or entry_map.method != method:
            raise ValueError(f"maps.{map_name} is not what its method makes")
        if (entry_map.target is None) == METHODS[method].targeted:
            raise ValueError(f"maps.{map_name}.target does not match its method")
        _, object_map, which = map_name.rpartition("/object-")
        wanted = record.objects.objects[int(which) - 1].label if object_map else None
        if entry_map.target is not None and (entry_map.target.kind == "object" or wanted) and entry_map.target.object_label != wanted:
            raise ValueError(f"maps.{map_name}.target is not its object")
        grids[f"maps.{map_name}.grid"] = entry_map.grid
    if record.predictions is not None and not any(METHODS[name].targeted for name in methods):
        raise ValueError("predictions were made without a method that explains a target")
    for name, grid in grids.items():
        if not _is_shape(grid, rows, cols):
            raise ValueError(f"{name} is not {rows}x{cols}, the model's patch grid")
    count = 0
    if record.objects is not None:
        o = record.objects
        count = len(o.objects)
        if len(o.labels) != count:
            raise ValueError("objects.labels does not match objects.objects")
        rolled = "rollout" in methods
        for name in ("plain_similarity", "rollout_similarity", "difference"):
            matrix = getattr(o, name)
            if name != "plain_similarity" and (matrix is None) == rolled:
                raise ValueError(f"objects.{name} does not match the methods")
            if matrix is not None and not _is_shape(matrix, count, count):
                raise ValueError(f"objects.{name} is not {count}x{count}")
    if (record.evaluation is not None) != evaluate:
        raise ValueError("evaluation does not match the settings")
    if record.evaluation is not None:
        _check_evaluation(record.evaluation, map_names, len(entry.objects) + count, len(run.capture.layers))
    figures = figure_index(
        f"figures/{entry.slug}", methods, len(run.capture.layers), heads, count, record.norms is not None, targets, explained,
        evaluate, grid=(rows, cols), sanity=record.evaluation is not None and record.evaluation.sanity is not None,
    )
    if record.figures != figures:
        raise ValueError("figures are not the ones made for this image")
    return figures


def _check_evaluation(e: Evaluation, map_names: list[str], boxes: int, depth: int) -> None:
    """The evaluation's maps are the methods' maps, and every curve has one score per step."""
    points = e.steps + 1
    if sorted(e.maps) != map_names:
        raise ValueError("evaluation.maps does not name the methods' maps")
    if len(e.fractions) != points:
        raise ValueError("evaluation.fractions does not have one value per step")
    for section in ("curves", "auc", "beats_random"):
        table = getattr(e, section)
        if sorted(table) != map_names or any(sorted(kinds) != sorted(CURVE_KINDS) for kinds in table.values()):
            raise ValueError(f"evaluation.{section} does not name the methods' maps and the curves")
    if any(len(curve) != points for kinds in e.curves.values() for curve in kinds.values()):
        raise ValueError("evaluation.curves do not have one score per step")
    for random in (e.random, *(t.random for t in e.targets)):
        if sorted(random) != sorted(CURVE_KINDS) or any(
            len(r.mean) != points or len(r.std) != points or len(r.aucs) != e.random_orders for r in random.values()
        ):
            raise ValueError("evaluation.random does not match the curves and the random orders")
    if sorted(e.scored_with) != map_names or any(index >= len(e.targets) for index in e.scored_with.values()):
        raise ValueError("evaluation.scored_with does not give each map one of evaluation.targets")
    if e.targets[0].random != e.random or e.targets[0].description != e.target or e.targets[0].reference_score != e.reference_score:
        raise ValueError("evaluation.targets does not start with the image's target")
    for name, index in e.scored_with.items():
        kind = e.targets[index].kind
        if ("/object-" in name) != (kind == "object") or ("/target-" in name and kind != "class"):
            raise ValueError(f"evaluation.scored_with gives the map {name!r} a target of kind {kind!r}")
    if len(e.localisation) > boxes or any(sorted(b.hit) != map_names or sorted(b.mass) != map_names for b in e.localisation):
        raise ValueError("evaluation.localisation does not match the boxes and the maps")
    if any(a.a not in map_names or a.b not in map_names for a in e.agreement) or len(e.agreement) != len(map_names) * (len(map_names) - 1) // 2:
        raise ValueError("evaluation.agreement is not every pair of the maps")
    if e.sanity is not None and (
        sorted(e.sanity.spearman) != map_names or sorted(e.sanity.flagged) != map_names
        or e.sanity.blocks != list(range(depth, 0, -1))  # every block, the last first
        or any(len(values) != len(e.sanity.blocks) for values in e.sanity.spearman.values())
        or any(e.sanity.flagged[name] != (values[-1] is not None and values[-1] > e.sanity.threshold)
               for name, values in e.sanity.spearman.items())
    ):
        raise ValueError("evaluation.sanity does not match the maps, the model's blocks and its threshold")


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
