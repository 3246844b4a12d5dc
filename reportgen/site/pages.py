"""Writing the static site: pages from Jinja2 templates, results.json, assets.

Pages and results.json are rendered from the same plain records (dicts of numbers, strings and
lists), so every number on a page is the number in results.json; templates never see tensors.
All links are relative, nothing is fetched from elsewhere, and ``.nojekyll`` lets GitHub Pages
serve the folder as it is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np

from reportgen import outdir
from reportgen.config import ImageEntry
from reportgen.site.summary import PairSummary

if TYPE_CHECKING:  # results come from the model stage; the site only reads their fields
    from reportgen.experiments import ImageResult

FORMAT_VERSION = 1
DIGITS = 6  # decimals kept in results.json


def template_dir() -> Path:
    """Where the templates are: ``templates/`` beside this module, in a source tree and installed alike."""
    return Path(__file__).resolve().parent / "templates"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) or digits == 0:
        return f"{round(value):d}"
    return f"{value:.{digits}f}"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The template environment, made once per process: compiled templates are kept between
    builds (``--watch``), and a template edited on disk is recompiled (Jinja's auto-reload)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        autoescape=True,  # titles, captions and labels are user text: always escaped
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    return env


def plain(value: Any) -> Any:
    """Convert results to JSON-safe values: arrays to nested lists, floats rounded, NaN to None."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else round(f, DIGITS)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


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
        "attention": None,
        "rollout": None,
        "objects": None,
        **fields,
    }


def failure_record(entry: ImageEntry, message: str) -> dict[str, Any]:
    """The record of an image that could not be processed: its card shows ``message``."""
    return _entry_record(entry, error=message)


def image_record(result: ImageResult, figures: dict[str, Any]) -> dict[str, Any]:
    """The JSON record of one image, which its page also renders from."""
    record = _entry_record(
        result.entry,
        error=result.error,
        size=list(result.size) if result.size else None,
        figures=figures,
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
            "entropy_change": plain(r.rollout_entropy.normalised - r.raw_entropy.normalised),
            "spearman": plain(r.spearman),
            "top_overlap": plain(r.top_overlap),
            "raw": plain(r.raw),
            "rollout": plain(r.rollout),
        }
    if result.objects is not None:
        o = result.objects
        record["objects"] = {
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
            "mean_rollout_similarity": plain(_mean_off_diagonal(o.rollout_similarity)),
            "plain_similarity": plain(o.plain_similarity),
            "rollout_similarity": plain(o.rollout_similarity),
            "difference": plain(o.difference),
            "detector_unavailable": o.detector_unavailable,
        }
    return record


def _mean_off_diagonal(matrix: np.ndarray) -> float | None:
    k = matrix.shape[0]
    return float(matrix[np.triu_indices(k, k=1)].mean()) if k > 1 else None


def results_json(results: dict[str, Any]) -> str:
    """``results.json``'s text: one top-level key per line and one image per line, so a diff
    between two builds shows which images changed. Each line comes from Python's C JSON encoder
    (indented output would use the pure-Python one, several times slower for a few MB)."""

    def dump(value: Any) -> str:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)

    lines = []
    for key in sorted(results):
        if key == "images" and results[key]:
            lines.append(f"{dump(key)}: [\n" + ",\n".join(dump(image) for image in results[key]) + "\n]")
        else:
            lines.append(f"{dump(key)}: {dump(results[key])}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _hashed_asset(source: Path, out: Path, stem: str) -> str:
    """Copy an asset into ``out``'s assets with a content hash in its name, so browsers never show a stale one."""
    data = source.read_bytes()
    relative = f"assets/{stem}.{hashlib.sha256(data).hexdigest()[:10]}{source.suffix}"
    outdir.write_bytes(out, relative, data)
    return relative


def write_site(
    out: Path,
    run: dict[str, Any],
    records: list[dict[str, Any]],
    pairs: list[PairSummary],
    lowered: tuple[int, int],
    colourbar: str,
) -> None:
    """Render index, one page per image and results.json into ``out`` (which already has figures).

    Args:
        out: the (staging) output folder.
        run: run metadata (model, capture, settings, versions, title, generated).
        records: one :func:`image_record` per image, in manifest order.
        pairs: experiment 3 summary per pair of labels.
        lowered: (pairs where rollout lowered the similarity, all pairs).
        colourbar: relative path of the colour-bar image.
    """
    # Every file goes through reportgen.outdir, which refuses anything outside ``out``.
    assets = {
        "css": _hashed_asset(template_dir() / "style.css", out, "style"),
        "js": _hashed_asset(template_dir() / "report.js", out, "report"),
        "colourbar": colourbar,
    }
    lowered_record = {
        "lowered": lowered[0],
        "total": lowered[1],
        "fraction": plain(lowered[0] / lowered[1]) if lowered[1] else None,
    }
    results = {
        "format": FORMAT_VERSION,
        **run,
        "images": records,
        "pairs": plain(pairs),
        "rollout_lowered": lowered_record,
    }
    env = environment()
    common = {"run": run, "assets": assets}
    # Pages exist for the images that worked; prev/next step through those, in manifest order.
    ok = [(index, record) for index, record in enumerate(records) if not record["error"]]
    page_template = env.get_template("image.html")
    for position, (index, record) in enumerate(ok):
        page = page_template.render(
            **common,
            image=record,
            index=index,
            prev=ok[position - 1][1] if position > 0 else None,
            next=ok[position + 1][1] if position + 1 < len(ok) else None,
        )
        outdir.write_text(out, record["page"], page)
    index_html = env.get_template("index.html").render(
        **common,
        images=records,
        failed=len(records) - len(ok),
        pairs=results["pairs"],
        lowered=lowered_record,
    )
    outdir.write_text(out, "index.html", index_html)
    outdir.write_text(out, "results.json", results_json(results))
    outdir.write_text(out, ".nojekyll", "")
