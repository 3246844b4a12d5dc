"""Results as the site stores them: plain records (dicts of numbers, strings and lists).

The only place results are serialised. An image's record is what its page renders from, what
results.json holds and what the build cache keeps, so every number on a page is the number in
results.json. Numpy only: a rebuild that reuses every image never imports torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reportgen.methods import (
    DOMINANT_RATIO, DOMINANT_SHARE, OUTLIER_RATIO, OUTLIER_SIGMAS, figure_key, method_maps, sectioned_methods,
)
from reportgen.methods.evaluation import SANITY_THRESHOLD
from reportgen.site.scales import Scale, ScaleSetting, result_scales

if TYPE_CHECKING:  # results come from the model stage; the site only reads their fields
    from reportgen.compute import ModelRun
    from reportgen.config import ImageEntry, Manifest
    from reportgen.experiments import Evaluation, ImageResult, ObjectsResult, TokenNorms

# Significant digits kept in results.json. Relative rather than absolute precision: rollout values
# around 0.002 would keep only 3-4 digits at 6 decimals, too few to check them at a relative 1e-6.
# Rounding to 7 significant digits errs by at most 5e-7 relative (float32 holds about 7.2).
SIGNIFICANT_DIGITS = 7


def plain(value: Any) -> Any:
    """Convert results to JSON-safe values: arrays to nested lists, floats rounded to
    :data:`SIGNIFICANT_DIGITS`, NaN and infinities to None; integers stay integers."""
    # Floats first: most values are. A dataclass is read field by field (no deep copy, as asdict makes).
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else significant(f)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return significant_array(value).tolist() if value.dtype.kind == "f" else plain(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    return value


def record_text(record: dict[str, Any]) -> str:
    """An image record's JSON text, as results.json and the status file both hold it (encoded
    once per build: a record's few thousand floats are most of the cost of writing either)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def significant(value: float) -> float:
    """``value`` rounded to :data:`SIGNIFICANT_DIGITS` significant digits (JSON then writes the
    shortest text that reads back as that float, so the output is deterministic and compact)."""
    return float(f"{value:.{SIGNIFICANT_DIGITS - 1}e}")


#: Beyond this power of ten a scale is not exact in float64 (10**22 is the largest that is).
_EXACT_POWER = 22


def significant_array(values: np.ndarray) -> np.ndarray:
    """:func:`significant` of every element of a float array (NaN and infinities as None, in an
    object array), without a Python call per element.

    Each value is scaled by a power of ten to 7 digits before the point, rounded to an integer
    ``n`` and scaled back by dividing (or multiplying) ``n`` by the exact power of ten, so the
    result is the float nearest the decimal ``n × 10^-k``, as :func:`significant` gives. Scaling
    rounds, so a value whose scaled form lies within a hair of a rounding tie could round the
    other way: such values, and those whose power of ten is not exact in float64, go through
    :func:`significant` one by one."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    out = np.where(finite, x, 0.0)  # zeros keep their sign, as in the decimal text
    nonzero = finite & (x != 0)
    exponent = np.zeros(x.shape, dtype=np.int64)
    exponent[nonzero] = np.floor(np.log10(np.abs(x[nonzero]))).astype(np.int64)
    k = SIGNIFICANT_DIGITS - 1 - exponent  # digits after the point
    exact = nonzero & (np.abs(k) <= _EXACT_POWER)
    down, up = exact & (k >= 0), exact & (k < 0)
    scaled = np.zeros_like(x)
    scaled[down] = x[down] * 10.0 ** k[down]
    scaled[up] = x[up] / 10.0 ** -k[up]
    out[down] = np.round(scaled[down]) / 10.0 ** k[down]
    out[up] = np.round(scaled[up]) * 10.0 ** -k[up]
    near_tie = exact & (np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6)
    for index in zip(*np.nonzero((nonzero & ~exact) | near_tie)):
        out[index] = significant(float(x[index]))
    if finite.all():
        return out
    result = out.astype(object)
    result[~finite] = None
    return result


def page_name(slug: str) -> str:
    """The file (and relative URL) of an image's page."""
    return f"{slug}.html"


def _entry_record(entry: ImageEntry, **fields: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "slug": entry.slug,
        "page": page_name(entry.slug),
        "source_name": entry.path.name,
        "title": entry.title,
        "caption": entry.caption,
        "kind": entry.kind,
        "error": None,
        "size": None,
        "figures": {},
        "content": None,
        "concentration": None,
        "dominant_layers": None,
        "layer_entropy": None,
        "norms": None,
        "attention": None,
        "rollout": None,
        "objects": None,
        "scales": None,
        **fields,
    }


def failure_record(entry: ImageEntry, message: str) -> dict[str, Any]:
    """The record of an image that could not be processed: its card shows ``message``."""
    return _entry_record(entry, error=message)


def image_record(result: ImageResult, figures: dict[str, Any], scale: ScaleSetting) -> dict[str, Any]:
    """The record of one image that worked, with its :func:`~reportgen.site.figures.figure_index`
    and the colour scales its figures were drawn with under ``scale``."""
    scales = result_scales(result, scale)
    record = _entry_record(
        result.entry,
        size=list(result.size),
        figures=figures,
        content={
            "fraction": plain(result.content.fraction),
            "weights": plain(result.content.weights),
            "padding_share": plain(result.padding_share),
        },
        # Sorted, as a record read back from the status file is: pages list the maps in this order.
        concentration=plain(dict(sorted(result.concentration.items()))),
        dominant_layers={
            name: [{"layer": layer, "share": plain(share)} for layer, share in peaks]
            for name, peaks in sorted(result.dominant_layers.items())
        },
        norms=_norms_record(result.norms) if result.norms is not None else None,
        # Per method, the normalised entropy of its explorer map at each layer (the index's figure).
        layer_entropy={name: plain(values) for name, values in sorted(result.layer_entropy.items())},
        scales={
            "maps": {name: _scale_record(s) for name, s in scales.maps.items()},
            "tokens": None if scales.tokens is None else _scale_record(scales.tokens),
            "explorer": {name: _scale_record(s) for name, s in scales.explorer.items()},
        },
    )
    if result.attention is not None:
        a = result.attention
        record["attention"] = {
            "head_entropy": plain(a.head_entropy),
            "mean_entropy": plain(a.mean_entropy),
            "max_entropy": plain(a.max_entropy),
            "token_entropy": plain(a.token_entropy),
            "token_count": int(a.token_attention.shape[0]),
            "prefix_mass": plain(a.prefix_mass),
            "box_mass": plain(a.box_mass),
            "cls_mean": plain(a.mean),
            "cls_max": plain(a.max),
            "cls_heads": plain(a.heads),
        }
    if result.rollout is not None:
        r = result.rollout
        record["rollout"] = {
            "raw_entropy": plain(r.raw_entropy),
            "rollout_entropy": plain(r.rollout_entropy),
            "entropy_change": plain(r.rollout_entropy.normalised - r.raw_entropy.normalised)
            if r.rollout_entropy.defined and r.raw_entropy.defined
            else None,
            "spearman": plain(r.spearman),
            "top_overlap": plain(r.top_overlap),
            "provenance": result.methods["rollout"].provenance,
            "raw": plain(r.raw),
            "rollout": plain(r.rollout),
        }
    if result.objects is not None:
        record["objects"] = _objects_record(result.objects)
    others = _unsectioned_maps(result)
    if others:
        record["maps"] = others
    if result.predictions is not None:
        record["predictions"] = plain(result.predictions)  # [{index, name, probability}], best first
    if result.evaluation is not None:
        record["evaluation"] = _evaluation_record(result.evaluation)
    return record


def _evaluation_record(e: Evaluation) -> dict[str, Any]:
    """The evaluation of an image's maps: curves, their areas, the random baseline, boxes, agreement."""
    curves = e.curves
    return _sorted_keys({
        "maps": list(curves.maps),  # the page's order (the mappings below are sorted, as the cache reads them back)
        "baseline": e.baseline,
        "steps": len(curves.fractions) - 1,
        "random_orders": int(len(e.random["deletion"].aucs)),
        "target": curves.target,
        "reference_score": plain(curves.reference),
        "forwards": curves.forwards,
        "fractions": plain(curves.fractions),
        "curves": plain(curves.maps),  # {map: {deletion, negative, insertion: [steps + 1]}}
        "auc": plain(e.auc),
        "beats_random": {name: {kind: e.beats_random(name, kind) for kind in kinds} for name, kinds in e.auc.items()},
        "random": _random_record(e.random),  # scored with the image's target, targets[0]
        # Every target some map is scored with (the image's first), and each map's index among them.
        "targets": [
            {"kind": t.kind, "description": t.description, "label": t.label, "class_index": t.class_index,
             "object_label": t.object_label, "reference_score": plain(t.reference), "random": _random_record(random)}
            for t, random in zip(curves.targets, e.randoms)
        ],
        "scored_with": dict(curves.scored_with),
        "localisation": [
            {"label": b.label, "input_box": plain(b.input_box), "area_share": plain(b.area_share), "hit": dict(b.hit),
             "mass": plain(b.mass)}
            for b in e.localisation
        ],
        "agreement": [plain(a) for a in e.agreement],  # {a, b, spearman, top_overlap}
        "sanity": None if e.sanity is None else {
            "blocks": list(e.sanity.blocks),  # the block re-initialised at each step, last first
            "spearman": plain(e.sanity.spearman),  # per map, one per step
            "flagged": e.sanity.flagged,
            "threshold": SANITY_THRESHOLD,
        },
    })


def _sanity_setting(sanity: bool | tuple[str, ...]) -> bool | list[str]:
    return sanity if isinstance(sanity, bool) else list(sanity)


def _random_record(random: dict) -> dict[str, Any]:
    """The random orders of one target: per kind, the mean and spread per step and each order's area."""
    return {
        kind: {"mean": plain(r.mean), "std": plain(r.std), "aucs": plain(r.aucs), "auc_mean": plain(r.auc_mean),
               "auc_std": plain(r.auc_std)}
        for kind, r in random.items()
    }


def _sorted_keys(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, as a record read back from the status file has them."""
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def _scale_record(scale: Scale) -> dict[str, Any]:
    """``{"kind", "top", "above"}``: the value drawn at the top colour and the patches above it."""
    return {"kind": scale.kind, "top": plain(scale.top), "above": scale.above}


def _unsectioned_maps(result: ImageResult) -> dict[str, Any]:
    """Every map no experiment section shows (a method other than ``attention`` and ``rollout``,
    or ``rollout`` without ``attention``): shown in the page's generic panel."""
    shown = sectioned_methods(result.methods)
    maps = {}
    for name, output in result.methods.items():
        if name in shown:
            continue
        for map_name, stem in method_maps(name, result.target_count, result.object_target_count):
            maps[map_name] = {
                "method": name,
                "provenance": output.provenance,
                "entropy": plain(result.entropy[map_name]),
                "grid": plain(output.maps[map_name]),
                "figure": figure_key(stem),
            }
            if output.target is not None:
                maps[map_name]["target"] = plain(output.target_of(map_name))  # {kind, description, score, class_index, class_name, object_label, reason}
    return maps


def _norms_record(n: TokenNorms) -> dict[str, Any]:
    return {
        "patches": plain(n.patches),
        "prefix": plain(n.prefix),
        "threshold": plain(n.threshold),
        "outliers": [np.argwhere(layer).tolist() for layer in n.outliers],  # [row, col] per layer
    }


def _objects_record(o: ObjectsResult) -> dict[str, Any]:
    rolled = o.rollout_similarity
    return {
        "source": o.source,
        "labels": o.labels,
        "objects": [
            {
                "label": obj.label,
                "base_label": obj.base_label,
                "box": plain(obj.box),
                "input_box": plain(obj.input_box),
                "visible": plain(obj.visible),
                "score": plain(obj.score),
            }
            for obj in o.objects
        ],
        "skipped": [{"label": label, "reason": reason} for label, reason in o.skipped],
        "mean_plain_similarity": plain(_mean_off_diagonal(o.plain_similarity)),
        "mean_rollout_similarity": None if rolled is None else plain(_mean_off_diagonal(rolled)),
        "plain_similarity": plain(o.plain_similarity),
        "rollout_similarity": None if rolled is None else plain(rolled),
        "difference": None if rolled is None else plain(o.difference),
        "detector_unavailable": o.detector_unavailable,
    }


def _mean_off_diagonal(matrix: np.ndarray) -> float | None:
    k = matrix.shape[0]
    return float(matrix[np.triu_indices(k, k=1)].mean()) if k > 1 else None


def model_run_record(run: ModelRun) -> dict[str, Any]:
    """The model, how attention was captured, and versions: cached with the images they produced."""
    loaded, config = run.model, run.model.data_config
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
            # whose attention the maps show: a key of reportgen.methods.QUERIES
            "query": loaded.layout.query.key,
            "depth": loaded.depth,
            "heads": loaded.heads,
            "data_config": plain(
                {k: config.get(k) for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
            ),
        },
        "capture": plain(run.capture)
        if run.capture
        else {"method": "not run (no image could be read)", "layers": [], "fused_attention": 0},
        "versions": dict(run.versions),
    }


def generated_at() -> str:
    """Build time for the footer: SOURCE_DATE_EPOCH when set, for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def run_record(manifest: Manifest, model_run: dict | None, records: list[dict]) -> dict[str, Any]:
    """Everything about the run a reader (or script) needs to interpret the numbers.

    ``records`` are the site's image records: what the detector did is read from them, so it
    describes the pages as they are, cached or not.
    """
    if model_run is None:  # every image failed on the first build: nothing was run
        from reportgen import __version__

        model_run = {"model": None, "capture": None, "versions": {"reportgen": __version__}}
    return {
        "title": manifest.output.title,
        "generated": generated_at(),
        **model_run,
        "detector": _detector_run(manifest, records),
        "settings": {
            "methods": list(manifest.methods),
            "head_fusion": manifest.attention.head_fusion,
            "discard_ratio": manifest.attention.discard_ratio,
            "rollout_start_layer": manifest.attention.rollout_start_layer,
            # As written (indices or names, or top-k); each map's target gives the index and name it resolved to.
            **({"target_classes": manifest.attention.target_classes.as_written()}
               if manifest.attention.target_classes is not None else {}),
            **({"object_targets": True} if manifest.attention.object_targets else {}),
            "detector": manifest.detector.name,
            "detector_threshold": manifest.detector.threshold,
            "cmap": manifest.output.cmap,
            "alpha": manifest.output.alpha,
            "scale": manifest.output.scale,
            "scale_percentile": ScaleSetting.of(manifest.output).used_percentile,
            # Only when on, so a build without the evaluation keeps its results.json.
            **({"evaluate": {"baseline": manifest.evaluate.baseline, "random_orders": manifest.evaluate.random_orders,
                             # true (every image) or the ids of the images checked; left out when off
                             **({"sanity": _sanity_setting(manifest.evaluate.sanity)} if manifest.evaluate.sanity else {})}}
               if manifest.evaluate.enabled else {}),
        },
        # The fixed rules behind the token-norm and concentration statistics.
        "rules": {
            "outlier_sigmas": OUTLIER_SIGMAS,
            "outlier_ratio": OUTLIER_RATIO,
            "dominant_share": DOMINANT_SHARE,
            "dominant_ratio": DOMINANT_RATIO,
        },
    }


def _detector_run(manifest: Manifest, records: list[dict]) -> dict | None:
    """The detector asked for, and whether it was ``used``, ``not needed`` (every ``multi`` image
    has boxes in the manifest) or ``not available`` (with the reason, published with the site,
    since its readers never see the build's warning); None with ``--detector none``."""
    if manifest.detector.name is None:
        return None
    found = [r["objects"] for r in records if r.get("objects") and r["objects"]["source"] != "manifest"]
    reasons = [o["detector_unavailable"] for o in found if o.get("detector_unavailable")]
    return {
        "name": manifest.detector.name,
        "threshold": manifest.detector.threshold,
        "status": "not available" if reasons else "used" if found else "not needed",
        "reason": reasons[0] if reasons else None,
        "images_without_objects": len(reasons),
    }
