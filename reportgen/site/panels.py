"""One image's panels as a matplotlib Figure, for notebooks (:meth:`reportgen.api.Explanation.figure`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reportgen.site.figures import overlay

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from reportgen.experiments import ImageResult


def panel_figure(result: ImageResult, cmap: str, alpha: float, column_inches: float = 3.0) -> Figure:
    """The model input, then every map of every method over it, in one row.

    Each map is blended over the model input exactly as the site's overlays are (scaled to its own
    maximum, letterbox padding in greys); its title names the map and its normalised entropy over
    the image's patches (undefined for an all-zero map).
    """
    from matplotlib.figure import Figure  # object API: no backend switched, no pyplot state

    maps = result.maps
    columns = 1 + len(maps)
    width, height = result.view.size
    figure = Figure(figsize=(column_inches * columns, column_inches * height / width + 0.6), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    axes[0].imshow(result.view)
    axes[0].set_title("model input", fontsize=9)
    for ax, (name, grid) in zip(axes[1:], maps.items()):
        ax.imshow(overlay(result.view, grid, cmap, alpha, result.geometry.content_box()))
        h = result.entropy[name].normalised
        ax.set_title(f"{name} (entropy {'undefined' if h is None else f'{h:.2f}'})", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    figure.suptitle(f"{result.entry.title}: each map scaled to its own maximum", fontsize=10)
    return figure
