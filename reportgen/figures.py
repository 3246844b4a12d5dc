"""Figures: attention overlays, token maps, object boxes, similarity heatmaps.

Overlays are composited with numpy and Pillow (colour-map lookup + alpha blend), which costs a few
milliseconds; matplotlib/seaborn are used only where axes and labels carry meaning. Photographs
and overlays on them are JPEG (PNG compression of a photo costs 15-70 ms, JPEG under 1 ms);
maps with sharp edges (patch grids, token maps, heatmaps) are PNG. Every writer takes plain
arrays, with fixed encoder settings and no timestamps, so identical inputs give identical bytes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Figures are built with matplotlib's object API (Figure, not pyplot), so no backend is switched
# and no global figure state is touched in the user's process.

THUMB_SIDE = 320
PNG_OPTIONS = {"optimize": False, "compress_level": 1}
JPEG_OPTIONS = {"quality": 90, "optimize": False, "progressive": False, "subsampling": "4:2:0"}
# Distinct, colour-blind-safe box colours (Okabe-Ito).
BOX_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#FFFFFF"]


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", **PNG_OPTIONS)


def save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", **JPEG_OPTIONS)


@lru_cache(maxsize=8)
def colour_lut(cmap: str) -> np.ndarray:
    """``[256, 3]`` uint8 RGB lookup table of a matplotlib colour map (read-only, shared)."""
    lut = (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    lut.flags.writeable = False
    return lut


def colourise(unit: np.ndarray, cmap: str) -> np.ndarray:
    """``[..., 3]`` uint8 RGB colours of values in [0, 1] under a colour map."""
    return colour_lut(cmap)[np.clip((unit * 255).round(), 0, 255).astype(np.uint8)]


def heat_to_unit(heat: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to [0, 1] by its maximum (zero stays zero; an all-zero map stays 0)."""
    top = float(np.max(heat)) if heat.size else 0.0
    return np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat, dtype=np.float64)


def overlay(view: Image.Image, heat: np.ndarray, cmap: str, alpha: float) -> Image.Image:
    """Blend a patch-grid map over the model's view of the image.

    Args:
        view: the RGB image the model saw (model-input size).
        heat: ``[rows, cols]`` non-negative map, scaled to its maximum for display.
        cmap: matplotlib colour-map name.
        alpha: opacity of the colour layer, in (0, 1].
    """
    unit = Image.fromarray(heat_to_unit(heat).astype(np.float32), mode="F")
    # Bilinear upsampling of the patch grid to pixels, as the seed did with cv2.resize.
    up = np.asarray(unit.resize(view.size, Image.Resampling.BILINEAR), dtype=np.float32)
    colours = colourise(up, cmap)
    base = np.asarray(view, dtype=np.float32)
    blended = (1.0 - alpha) * base + alpha * colours.astype(np.float32)
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


def write_overlay(view: Image.Image, heat: np.ndarray, cmap: str, alpha: float, path: Path) -> None:
    save_jpeg(overlay(view, heat, cmap, alpha), path)


def write_grid(heat: np.ndarray, cmap: str, path: Path) -> None:
    """A patch-grid map as a tiny colour PNG (one pixel per patch), for the browser to scale and
    lay over the image: the layer/head explorer needs dozens per image, and this costs ~0.1 ms."""
    save_png(Image.fromarray(colourise(heat_to_unit(heat), cmap), "RGB"), path)


def write_thumbnail(image: Image.Image, path: Path, side: int = THUMB_SIDE) -> None:
    thumb = image.copy()
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    save_jpeg(thumb, path)


def write_colourbar(cmap: str, path: Path, width: int = 256, height: int = 12) -> None:
    row = colour_lut(cmap)[np.linspace(0, 255, width).round().astype(int)]
    save_png(Image.fromarray(np.repeat(row[None], height, axis=0), "RGB"), path)


def _figure(**kwargs):
    # Imported here: matplotlib.figure is only needed for the similarity heatmaps.
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def write_token_map(attention: np.ndarray, num_prefix_tokens: int, cmap: str, path: Path, min_side: int = 400) -> None:
    """Token-to-token attention ``[N, N]`` (rows: queries, columns: keys), one block per token.

    Drawn with numpy/Pillow (a full matplotlib figure costs ~15x more); scaled to its maximum, with
    white lines after the prefix tokens. The page's caption and colour bar explain the axes.
    """
    n = attention.shape[0]
    colours = colourise(heat_to_unit(attention), cmap)  # a new array: safe to draw on
    scale = max(1, -(-min_side // n))
    if num_prefix_tokens:
        colours[num_prefix_tokens, :] = colours[:, num_prefix_tokens] = 255
    image = Image.fromarray(colours, "RGB")
    save_png(image.resize((n * scale, n * scale), Image.Resampling.NEAREST) if scale > 1 else image, path)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def write_boxes(image: Image.Image, boxes: list[tuple[str, tuple[float, float, float, float], float | None]], path: Path) -> None:
    """The original image with labelled boxes (label and, for detections, the score)."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 250))
    font = _font(max(12, round(max(canvas.size) / 40)))
    for i, (label, box, score) in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        draw.rectangle(box, outline=colour, width=width)
        text = label if score is None else f"{label} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        y = box[1] - (bottom - top) - 2 * width if box[1] - (bottom - top) - 2 * width >= 0 else box[1]
        draw.rectangle((box[0], y, box[0] + (right - left) + 2 * width, y + (bottom - top) + 2 * width), fill=colour)
        draw.text((box[0] + width, y + width - (top - box[1])), text, fill="black", font=font)
    save_jpeg(canvas, path)


def write_similarity_heatmaps(labels: list[str], plain: np.ndarray, rollout: np.ndarray, path: Path) -> None:
    """Plain, rollout-weighted and difference cosine-similarity heatmaps side by side (seaborn).

    No colour bars and a fixed layout (instead of tight_layout): together they cost more than the
    heatmaps. The cells carry their values and the panel titles state each colour scale.
    """
    import seaborn as sns

    k = len(labels)
    labels = [label.replace("$", r"\$") for label in labels]  # user text: "$5" is a price, not mathtext
    bound = max(float(np.abs(rollout - plain).max()), 1e-6)
    panels = [
        ("plain (−1 to 1)", plain, "viridis", -1.0, 1.0),
        ("rollout-weighted (−1 to 1)", rollout, "viridis", -1.0, 1.0),
        (f"rollout − plain (±{bound:.2f})", rollout - plain, "RdBu_r", -bound, bound),
    ]
    cell = 0.45
    label_width = 0.08 * max(len(label) for label in labels) + 0.3  # inches of tick-label text
    panel = cell * k
    width = 3 * (panel + label_width) + 0.4
    height = panel + label_width + 0.5
    fig = _figure(figsize=(width, height))
    for i, (title, matrix, cmap, vmin, vmax) in enumerate(panels):
        left = (label_width + i * (panel + label_width)) / width
        ax = fig.add_axes((left, label_width / height, panel / width, panel / height))
        sns.heatmap(
            matrix, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, annot=k <= 8, fmt=".2f", square=True,
            xticklabels=labels, yticklabels=labels, cbar=False, annot_kws={"fontsize": 7},
        )
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    _save_figure(fig, path)


def write_image_figures(
    result,
    original: Image.Image,
    view: Image.Image,
    folder: Path,
    prefix: str,
    cmap: str,
    alpha: float,
    num_prefix_tokens: int,
) -> dict:
    """Write every figure of one :class:`~reportgen.experiments.ImageResult`.

    Args:
        result: the image's results.
        original: the upright original image.
        view: the model's view of it (model-input size).
        folder: where to write the PNGs.
        prefix: the relative URL of ``folder`` from the site root.
        cmap / alpha: overlay colour map and opacity.
        num_prefix_tokens: prefix tokens at the start of the token map.

    Returns:
        Relative paths by figure name (``heads`` is a list, one per head).
    """

    def rel(name: str) -> str:
        return f"{prefix}/{name}"

    figures: dict = {}
    write_thumbnail(original, folder / "thumb.jpg")
    figures["thumbnail"] = rel("thumb.jpg")
    write_thumbnail(original, folder / "original.jpg", side=768)
    figures["original"] = rel("original.jpg")
    save_jpeg(view, folder / "input.jpg")
    figures["input"] = rel("input.jpg")
    a, r = result.attention, result.rollout
    for name, heat in (("cls_mean", a.mean), ("cls_max", a.max), ("rollout", r.rollout)):
        file = name.replace("_", "-") + ".jpg"
        write_overlay(view, heat, cmap, alpha, folder / file)
        figures[name] = rel(file)
    write_token_map(a.token_attention, num_prefix_tokens, cmap, folder / "tokens.png")
    figures["tokens"] = rel("tokens.png")
    # Explorer: every layer's CLS attention per head and mean over heads, and the rollout up to it,
    # as tiny patch-grid PNGs the page lays over the input image (the last layer's heads are also
    # the per-head panel).
    layers, heads = r.cls_by_layer.shape[:2]
    for layer, (per_head, rolled) in enumerate(zip(r.cls_by_layer, r.rollout_by_layer)):
        for h, heat in enumerate(per_head):
            write_grid(heat, cmap, folder / "explorer" / f"l{layer}-h{h}.png")
        write_grid(per_head.mean(axis=0), cmap, folder / "explorer" / f"l{layer}-mean.png")
        write_grid(rolled, cmap, folder / "explorer" / f"l{layer}-rollout.png")
    figures["heads"] = [rel(f"explorer/l{layers - 1}-h{h}.png") for h in range(heads)]
    figures["explorer"] = {
        "prefix": rel("explorer/"),
        "layers": int(layers),
        "heads": int(heads),
        "mean": [rel(f"explorer/l{layer}-mean.png") for layer in range(layers)],
        "rollout": [rel(f"explorer/l{layer}-rollout.png") for layer in range(layers)],
    }
    objects = result.objects
    if objects is not None and objects.objects:
        write_boxes(original, [(o.label, o.box, o.score) for o in objects.objects], folder / "objects.jpg")
        figures["objects"] = rel("objects.jpg")
        if len(objects.objects) > 1:
            write_similarity_heatmaps(objects.labels, objects.plain_similarity, objects.rollout_similarity, folder / "similarity.png")
            figures["similarity"] = rel("similarity.png")
    return figures
