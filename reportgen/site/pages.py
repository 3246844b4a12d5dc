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
from pathlib import Path
from typing import Any

import jinja2

from reportgen import outdir
from reportgen.methods import CLS_QUERY, PATCH_LAYERS_GRID, QUERIES
from reportgen.site.comparison import comparison_grid
from reportgen.site.heat import heat_table
from reportgen.site.leaderboard import leaderboard
from reportgen.site.records import plain, record_text
from reportgen.site.scales import ordinal
from reportgen.site.summary import fraction_lowered, object_tables, summarise_pairs


FORMAT_VERSION = 3


def template_dir() -> Path:
    """Where the templates are: ``templates/`` beside this module, in a source tree and installed alike."""
    return Path(__file__).resolve().parent / "templates"


#: How an undefined entropy (of an all-zero map) is shown; the index's sort script knows it.
UNDEFINED = "\u2013"


def _fmt(value: Any, digits: int = 3, missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, int) or digits == 0:
        return f"{round(value):d}"
    return f"{value:.{digits}f}"


class _Environment(jinja2.Environment):
    """Jinja's environment, with ``record.key`` on a plain dict looked up as its key first.

    Jinja tries ``getattr(record, "key")`` before ``record["key"]``, so every such lookup on a
    record would raise and catch an AttributeError, and pages make many. A name that is no
    attribute of a dict can only resolve to its key, so the result is the same."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)


_DICT_ATTRIBUTES = frozenset(dir(dict))


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The template environment, made once per process: compiled templates are kept between
    builds (``--watch``), and a template edited on disk is recompiled (Jinja's auto-reload)."""
    env = _Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        autoescape=True,  # titles, captions and labels are user text: always escaped
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        # Jinja's optimiser folds constant expressions when a template is compiled, which costs
        # compile time in every new process and gains nothing measurable in rendering.
        optimized=False,
    )
    env.filters["fmt"] = _fmt
    env.globals["UNDEFINED"] = UNDEFINED
    env.globals["PATCH_LAYERS_GRID"] = PATCH_LAYERS_GRID
    env.globals["comparison_grid"] = comparison_grid
    env.globals["heat_table"] = heat_table
    env.filters["ordinal"] = ordinal
    return env


def results_json(results: dict[str, Any], image_texts: list[str] | None = None) -> str:
    """``results.json``'s text: one top-level key per line and one image per line, so a diff
    between two builds shows which images changed. Each line comes from Python's C JSON encoder
    (indented output would use the pure-Python one, several times slower for a few MB).
    ``image_texts``: the images' :func:`~reportgen.site.records.record_text`, when already encoded."""

    def dump(value: Any) -> str:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)

    lines = []
    for key in sorted(results):
        if key == "images" and results[key]:
            texts = image_texts if image_texts is not None else [record_text(image) for image in results[key]]
            assert len(texts) == len(results[key]), "one encoded record per image"
            lines.append(f"{dump(key)}: [\n" + ",\n".join(texts) + "\n]")
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
    colourbar: str,
    layer_entropy: str | None = None,
    leaderboard_figure: str | None = None,
    record_texts: list[str] | None = None,
) -> None:
    """Render index, one page per image and results.json into ``out`` (which already has figures).

    Args:
        out: the (staging) output folder.
        run: run metadata (model, capture, settings, versions, title, generated).
        records: one image record per image, in manifest order (see :mod:`reportgen.site.records`).
        colourbar: relative path of the colour-bar image.
        layer_entropy: relative path of the index's entropy-per-layer figure (None: no image has
            one, so the index has no such figure).
        leaderboard_figure: relative path of the index's leaderboard figure (None: no image was
            evaluated).
        record_texts: the records' :func:`~reportgen.site.records.record_text`, aligned with
            ``records``, when the caller has them (else they are encoded here).
    """
    # Every file goes through reportgen.outdir, which refuses anything outside ``out``.
    assets = {
        "css": _hashed_asset(template_dir() / "style.css", out, "style"),
        "js": _hashed_asset(template_dir() / "report.js", out, "report"),
        "colourbar": colourbar,
    }
    tables = object_tables(records)
    pairs, lowered = summarise_pairs(tables), fraction_lowered(tables)
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
    board = leaderboard(records)
    if board is not None:  # only with the evaluation: a build without it keeps its results.json
        results["leaderboard"] = board
    env = environment()
    # Whose attention the maps show, in words (no model ran when every image failed to load).
    query = QUERIES[run["model"]["query"]] if run.get("model") else CLS_QUERY
    common = {"run": run, "assets": assets, "query": query}
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
        layer_entropy=layer_entropy,
        leaderboard=board,
        leaderboard_figure=leaderboard_figure,
    )
    outdir.write_text(out, "index.html", index_html)
    outdir.write_text(out, "results.json", results_json(results, record_texts))
    outdir.write_text(out, ".nojekyll", "")
