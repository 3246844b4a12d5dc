"""Print-ready figures of one image (``reportgen export``): its model input and every map, each
with a colour bar labelled with values, the method and the target in the caption.

Drawn from an image's record (:mod:`reportgen.site.records`, as results.json holds it) and the
model's view of the image, so a site's stored data and a fresh computation give the same figure.
The files are byte-reproducible: no dates in the metadata, a fixed salt for SVG's element ids,
and matplotlib's object API (no pyplot state, no backend switched).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from reportgen.config import AttentionSettings
from reportgen.methods import QUERIES, method_maps
from reportgen.site.figures import overlay
from reportgen.site.scales import ordinal

#: Inches per panel (the figure is this wide per column), and at most this many columns.
PANEL_INCHES = 2.4
MAX_COLUMNS = 4
#: Metadata that every writer gets: no dates (matplotlib adds one by default to SVG and PDF) and a
#: fixed producer instead of the software version.
METADATA = {
    "svg": {"Date": None, "Creator": "reportgen"},
    "pdf": {"CreationDate": None, "ModDate": None, "Creator": "reportgen", "Producer": "reportgen"},
    "png": {"Software": None},
}
#: Salt of the ids of SVG elements (clip paths, images): without it matplotlib draws a random one.
SVG_HASH_SALT = "reportgen"
#: The caption's lines: characters per inch of width, and inches per line (6.5 pt, spaced 1.3).
CAPTION_CHARS_PER_INCH = 19
TITLE_CHARS_PER_INCH = 12
CAPTION_LINE_INCHES = 6.5 * 1.3 / 72


@dataclass(frozen=True)
class ExportMap:
    """One map panel.

    Attributes:
        name: the map's name (``attention/mean``, ``rollout`` ...).
        method: the method that made it.
        grid: ``[rows, cols]`` the map over the patches.
        description: what it shows, in one sentence (its provenance).
        target: what it explains, in words; None for maps without a target.
        kind / top / above: its colour scale (``map``, ``shared``, ``percentile``), the value drawn
            at the top colour, and how many patches lie above it (percentile only).
        entropy: its normalised entropy over the image's patches (None: all zero).
    """

    name: str
    method: str
    grid: np.ndarray
    description: str
    target: str | None
    kind: str
    top: float
    above: int | None
    entropy: float | None


def _target_words(target: dict[str, Any]) -> str:
    if target["kind"] == "class":
        name = f" ({target['class_name']})" if target.get("class_name") else ""
        reason = f", {target['reason']}" if target.get("reason") else ""
        return f"class {target['class_index']}{name}{reason}, logit {target['score']:.3f}"
    if target["kind"] == "object":
        return f"the object “{target.get('object_label')}”, cosine similarity {target['score']:.3f}"
    return f"the label-free target (the embedding's inner product with itself), value {target['score']:.3f}"


def map_names(record: dict[str, Any], settings: dict[str, Any], method: str) -> list[str]:
    """The maps ``method`` made for an image, in page order: its own, then, for a method that
    explains a target, those of each further class and each object the settings asked for."""
    attention = target_settings(settings)
    objects = record.get("objects") or {}
    count = len(objects.get("objects") or []) if attention.object_targets else 0
    return [name for name, _stem in method_maps(method, attention.target_count, count)]


def target_settings(settings: dict[str, Any]) -> AttentionSettings:
    """The settings' target classes and object targets, by the manifest's own rules.

    Raises:
        SettingsError: (a ``ValueError``) naming the setting that does not fit.
    """
    return AttentionSettings(
        target_classes=settings.get("target_classes"), object_targets=settings.get("object_targets", False)
    )


def _grid(record: dict[str, Any], name: str) -> list:
    """A map's grid in an image's record: the experiment sections hold attention and rollout
    (when both ran), ``maps`` every other map."""
    if name == "attention/mean" and record.get("attention"):
        return record["attention"]["cls_mean"]
    if name == "attention/max" and record.get("attention"):
        return record["attention"]["cls_max"]
    if name == "rollout" and record.get("rollout"):
        return record["rollout"]["rollout"]
    return record["maps"][name]["grid"]


def _description(record: dict[str, Any], run: dict[str, Any], name: str) -> str:
    query = QUERIES[run["model"]["query"]]
    if name == "attention/mean":
        return f"{query.short} attention of the last layer (layer {run['model']['depth']}), mean over heads"
    if name == "attention/max":
        return f"{query.short} attention of the last layer (layer {run['model']['depth']}), maximum over heads"
    if name == "rollout" and record.get("rollout"):
        return record["rollout"]["provenance"]
    return record["maps"][name]["provenance"]


def export_maps(record: dict[str, Any], run: dict[str, Any]) -> list[ExportMap]:
    """The map panels of an image's record, in page order (``run`` is results.json's top level:
    the model and the settings)."""
    maps = []
    for method in run["settings"]["methods"]:
        for name in map_names(record, run["settings"], method):
            entry = (record.get("maps") or {}).get(name)
            scale = record["scales"]["maps"][name]
            entropy = entry["entropy"] if entry else _section_entropy(record, name)
            maps.append(ExportMap(
                name=name,
                method=method,
                grid=np.asarray(_grid(record, name), dtype=np.float64),
                description=_description(record, run, name),
                target=_target_words(entry["target"]) if entry and entry.get("target") else None,
                kind=scale["kind"],
                top=float(scale["top"]),
                above=scale["above"],
                entropy=entropy["normalised"],
            ))
    return maps


def _section_entropy(record: dict[str, Any], name: str) -> dict[str, Any]:
    if name == "attention/mean":
        return record["attention"]["mean_entropy"]
    if name == "attention/max":
        return record["attention"]["max_entropy"]
    return record["rollout"]["rollout_entropy"]


def content_box(weights: np.ndarray, patch: tuple[int, int]) -> tuple[float, float, float, float]:
    """The part of the model input that is image (input pixels), from each patch's image fraction.

    A content box is a rectangle, so each patch's fraction is its column's covered width times its
    row's covered height (both as fractions of the patch). The image fills the input along one
    side (the longer one: its columns, or rows, include whole ones), so a column's width is its
    largest fraction divided by the largest fraction of all, and the edges are where those
    fractions begin and end (exact unless the image is narrower than two patches on a side, where
    the fraction gives its width but not where in the patch it lies).
    """
    ph, pw = patch
    along_x, along_y = weights.max(axis=0), weights.max(axis=1)  # [cols], [rows]
    top = float(weights.max())
    if top > 0:
        # The side with more covered patches is the one the image spans: there the largest
        # fraction is 1, and the other side's shares were scaled by the largest of that side.
        if np.count_nonzero(along_x) >= np.count_nonzero(along_y):
            along_x = along_x / top
        else:
            along_y = along_y / top
    def edges(cover: np.ndarray, side: int) -> tuple[float, float]:
        inside = np.flatnonzero(cover > 1e-6)
        if inside.size == 0:
            return 0.0, 0.0
        first, last = int(inside[0]), int(inside[-1])
        # Content edges are whole pixels: round away the 7 significant digits results.json keeps.
        return round((first + 1 - float(cover[first])) * side), round((last + float(cover[last])) * side)

    x0, x1 = edges(along_x, pw)
    y0, y1 = edges(along_y, ph)
    return float(x0), float(y0), float(x1), float(y1)


def _scale_words(m: ExportMap, percentile: float | None) -> str:
    if m.kind == "percentile":
        return f"colour 0 to its {ordinal(percentile)} percentile ({m.above} patches above, at the top colour)"
    if m.kind == "shared":
        return "colour 0 to the image's shared maximum"
    return "colour 0 to the map's maximum"


def export_figure(
    title: str,
    view: Image.Image,
    maps: list[ExportMap],
    run: dict[str, Any],
    weights: np.ndarray,
):
    """The figure: the model input, then each map over it with its colour bar, and a caption
    naming the model, each map's method and what it explains.

    Args:
        title: the image's title.
        view: the model's view of the image (model-input size, padding included).
        maps: the map panels (:func:`export_maps`).
        run: results.json's top level (model, settings).
        weights: ``[rows, cols]`` the image fraction of each patch (``content.weights``).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    settings, model = run["settings"], run["model"]
    panels = 1 + len(maps)
    columns = min(MAX_COLUMNS, panels)
    rows = -(-panels // columns)
    aspect = view.height / view.width
    caption = _caption(title, maps, run, weights)
    chars = int(CAPTION_CHARS_PER_INCH * (PANEL_INCHES * columns - 0.3))
    lines = sum(len(textwrap.wrap(paragraph, width=chars)) for paragraph in caption)
    panel_height = PANEL_INCHES * aspect + 0.85  # image, two lines of title, the colour bar and its ticks
    caption_height = CAPTION_LINE_INCHES * lines + 0.2
    width, height = PANEL_INCHES * columns, panel_height * rows + caption_height + 0.35
    figure = Figure(figsize=(width, height), dpi=100)
    # One line: a long title is cut (the caption below gives it whole).
    shown = textwrap.shorten(title, width=int(TITLE_CHARS_PER_INCH * width), placeholder=" …")
    figure.suptitle(shown, fontsize=10, y=1 - 0.12 / height, va="top", parse_math=False)  # user text: "$5" is a price
    box = content_box(np.asarray(weights, dtype=np.float64), tuple(model["patch_size"]))
    cmap = colormaps[settings["cmap"]]
    image_w, image_h = PANEL_INCHES - 0.3, (PANEL_INCHES - 0.3) * aspect
    for index in range(panels):
        row, column = divmod(index, columns)
        left = column * PANEL_INCHES + 0.15
        top = height - 0.35 - row * panel_height - 0.4  # below the suptitle and the panel's title
        ax = figure.add_axes((left / width, (top - image_h) / height, image_w / width, image_h / height))
        ax.set_axis_off()
        if index == 0:
            ax.imshow(np.asarray(view), interpolation="none")
            ax.set_title(f"model input, {view.width}×{view.height} px", fontsize=7, parse_math=False)
            continue
        m = maps[index - 1]
        ax.imshow(np.asarray(overlay(view, m.grid, settings["cmap"], settings["alpha"], box, m.top)), interpolation="none")
        entropy = "undefined" if m.entropy is None else f"{m.entropy:.3f}"
        ax.set_title(f"{m.name}\nnormalised entropy {entropy}", fontsize=7, parse_math=False)
        bar = figure.add_axes((left / width, (top - image_h - 0.2) / height, image_w / width, 0.09 / height))
        mappable = ScalarMappable(Normalize(0.0, m.top if m.top > 0 else 1.0), cmap)
        colourbar = figure.colorbar(mappable, cax=bar, orientation="horizontal",
                                    extend="max" if m.kind == "percentile" and m.above else "neither")
        colourbar.set_ticks([0.0, m.top / 2, m.top], labels=["0", f"{m.top / 2:.3g}", f"{m.top:.3g}"])
        colourbar.ax.tick_params(labelsize=6, length=2, pad=1)
        ends = colourbar.ax.get_xticklabels()
        ends[0].set_horizontalalignment("left")  # inside the panel's width, not over its neighbour's
        ends[-1].set_horizontalalignment("right")
        colourbar.outline.set_linewidth(0.4)
    text = "\n".join(line for paragraph in caption for line in textwrap.wrap(paragraph, width=chars))
    figure.text(0.1 / width, (caption_height - 0.05) / height, text, fontsize=6.5, va="top", ha="left", linespacing=1.3,
                parse_math=False)
    return figure


def _caption(title: str, maps: list[ExportMap], run: dict[str, Any], weights: np.ndarray) -> list[str]:
    """The caption's paragraphs: the model and its input, then per map its method, what it shows,
    what it explains and its colour scale."""
    model, settings = run["model"], run["settings"]
    percentile = settings.get("scale_percentile")
    paragraphs = [
        f"{title}, seen by {model['name']} ({model['input_size'][0]}×{model['input_size'][1]} input, "
        f"{model['grid'][0]}×{model['grid'][1]} patches of {model['patch_size'][0]} px, {model['depth']} layers). "
        f"Maps are overlaid on the model input at opacity {settings['alpha']} with the {settings['cmap']} colour map"
        + ("; letterbox padding is drawn in greys." if float(np.min(weights)) < 1 else ".")
    ]
    for m in maps:
        target = f" Explains {m.target}." if m.target else ""
        paragraphs.append(f"{m.name} (method {m.method}): {m.description}.{target} {_scale_words(m, percentile).capitalize()}.")
    return paragraphs


def save_figure(figure, file: BinaryIO, format: str, dpi: int) -> None:
    """Write ``figure`` as ``format`` at ``dpi``, with the same bytes every time."""
    import matplotlib

    # The salt is read from the global rcParams while the SVG is written; rc_context restores it.
    with matplotlib.rc_context({"svg.hashsalt": SVG_HASH_SALT}):
        figure.savefig(file, format=format, dpi=dpi, metadata=METADATA[format])
