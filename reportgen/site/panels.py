"""One image's panels as a matplotlib Figure, for notebooks (:meth:`reportgen.api.Explanation.figure`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from reportgen.site.figures import overlay
from reportgen.site.scales import Scale, ScaleSetting, image_scales, ordinal

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from reportgen.experiments import ImageResult


def _colour(scale: Scale, setting: ScaleSetting) -> str:
    """The scale in words, as the site's captions give it."""
    if scale.kind == "percentile":
        return (f"colour 0 to its {ordinal(setting.percentile)} percentile, {scale.top:.4f}"
                f"\n({scale.above} patches above, at the top colour)")
    if scale.kind == "shared":
        return f"colour 0 to {scale.top:.4f}, shared by every map"
    return f"colour 0 to its maximum, {scale.top:.4f}"


def _explains(target) -> str:
    """What a map explains, for its panel's title: ``: class 281 (tabby)``, ``: object 'cup'``."""
    if target is None or target.kind == "label-free":
        return ""
    if target.kind == "object":
        return f": object {target.object_label!r}"
    name = f" ({target.class_name.split(',')[0]})" if target.class_name else ""
    return f": class {target.class_index}{name}"


def panel_figure(
    result: ImageResult, cmap: str, alpha: float, column_inches: float = 3.0, scale: ScaleSetting = ScaleSetting()
) -> Figure:
    """The model input, then every map of every method over it, in one row.

    Each map is blended over the model input at full size (:func:`overlay`: on the colour scale
    ``scale`` gives it, letterbox padding in greys), as the site's pages compose it; its title names the map, what it
    explains (a class or an object, for the gradient methods), its normalised entropy over the
    image's patches (undefined for an all-zero map) and its colour scale.
    """
    from matplotlib.figure import Figure  # object API: no backend switched, no pyplot state

    maps = result.maps
    scales = image_scales(maps, None, {}, scale).maps
    columns = 1 + len(maps)
    width, height = result.view.size
    figure = Figure(figsize=(column_inches * columns, column_inches * height / width + 0.6), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    axes[0].imshow(result.view)
    axes[0].set_title("model input", fontsize=9)
    for ax, (name, grid) in zip(axes[1:], maps.items()):
        ax.imshow(overlay(result.view, grid, cmap, alpha, result.geometry.content_box(), scales[name].top))
        h = result.entropy[name].normalised
        explains = _explains(result.targets.get(name))
        ax.set_title(f"{name}{explains} (entropy {'undefined' if h is None else f'{h:.2f}'})\n{_colour(scales[name], scale)}",
                     fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    headline = {"map": "each map to its own maximum", "shared": "one colour scale for every map",
                "percentile": f"each map to its own {ordinal(scale.percentile)} percentile"}[scale.kind]
    figure.suptitle(f"{result.entry.title}: {headline}", fontsize=10)
    return figure
