"""Colour scales: which value of a map is drawn at the top colour of the colour map.

Every map is non-negative and drawn from 0 (the bottom colour) to a ``top`` value (the top colour);
values above ``top`` are drawn at the top colour. The setting ``output.scale`` chooses ``top``:

- ``map``: each map's own maximum. One dominant patch sets the scale and darkens everything else,
  and two maps drawn this way cannot be compared by colour.
- ``shared``: the largest value of a figure family of one image: all of an image's overlays
  (every method's maps) share one maximum, and in the explorer all the tiles of a method (every
  layer and head, or every rollout step) share one. A colour then means the same value across
  the family, so a map with half the values of another is drawn at half the colour index.
- ``percentile``: each map's own ``p``-th percentile over its patches (numpy's default linear
  interpolation between the sorted patch values), so a few outlying patches no longer set the
  scale; they are drawn at the top colour and counted. A map whose percentile is 0 (at least
  ``p`` % of its patches are 0) is drawn to its maximum instead, and its scale says so.

The scale is computed over the patches that hold image: a hot spot on letterbox padding does not
set it (padding is drawn in greys, at most at the top colour's brightness). The token-to-token map is a different
quantity, so it is never in a family: it follows ``map`` or ``percentile``, and under ``shared``
its own maximum. Pure numpy, no I/O: the figures, the records and the notebook panels all read
their scales from here, so the page names the scale the figure was drawn with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ScaleSetting:
    """``output.scale`` and ``output.scale_percentile`` (validated by the config model)."""

    kind: str = "map"
    percentile: float = 99.0

    @classmethod
    def of(cls, output) -> ScaleSetting:
        """The setting of :class:`~reportgen.config.OutputSettings`."""
        return cls(output.scale, output.scale_percentile)

    @property
    def used_percentile(self) -> float | None:
        """The percentile, where the scale uses it (None under ``map`` and ``shared``)."""
        return self.percentile if self.kind == "percentile" else None


@dataclass(frozen=True)
class Scale:
    """How one map, or one family of maps, is coloured.

    Attributes:
        kind: ``map`` (the map's own maximum), ``shared`` (its family's maximum) or
            ``percentile`` (the map's own percentile).
        top: the value drawn at the top colour (0 for an all-zero map, drawn at the bottom
            colour); None for a family whose maps each have their own (explorer tiles under
            ``map`` or ``percentile``).
        above: how many patches lie above ``top`` (drawn at the top colour); None with ``top``.
    """

    kind: str
    top: float | None
    above: int | None = 0


def _on_image(heat: np.ndarray, inside: np.ndarray | None) -> np.ndarray:
    """The values of ``heat`` (``[..., rows, cols]``) on the patches with image, flattened per map:
    ``[..., P']``."""
    heat = np.asarray(heat)
    if inside is None or inside.all() or not inside.any():
        return heat.reshape(*heat.shape[:-2], -1)
    return heat[..., inside]


def map_scale(heat: np.ndarray, setting: ScaleSetting, inside: np.ndarray | None = None) -> Scale:
    """The scale of one map on its own: its maximum over the patches with image (``inside``;
    None: every patch), or under ``percentile`` its percentile there."""
    values = _on_image(np.asarray(heat, dtype=np.float64), inside)
    peak = float(values.max()) if values.size else 0.0
    if setting.kind == "percentile" and values.size:
        top = float(np.percentile(values, setting.percentile))
        if top > 0:
            return Scale("percentile", top, int(np.count_nonzero(values > top)))
    return Scale("map", peak, 0)


def shared_scale(maps: Iterable[np.ndarray], inside: np.ndarray | None = None) -> Scale:
    """One scale for a family of maps: their largest value over the patches with image."""
    peak = max((float(np.max(v)) for m in maps if (v := _on_image(m, inside)).size), default=0.0)
    return Scale("shared", peak, 0)


def to_unit(heat: np.ndarray, top: float | np.ndarray) -> np.ndarray:
    """``heat / top`` clipped to [0, 1]; 0 wherever ``top`` is 0 (an all-zero map).

    ``top`` is a number, or an array that broadcasts against ``heat`` (one top per tile). The
    division runs in ``heat``'s own precision, so a figure drawn to its maximum is the same bytes
    whichever way its top was passed.
    """
    heat = np.asarray(heat)
    if np.ndim(top) == 0:
        top = float(top)
        return np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat, dtype=np.float64)
    top = np.asarray(top)
    unit = np.divide(heat, top, out=np.zeros(np.broadcast_shapes(heat.shape, top.shape), dtype=np.float64), where=top > 0)
    return np.clip(unit, 0.0, 1.0)


def tile_tops(explorer: Mapping[str, np.ndarray], setting: ScaleSetting, inside: np.ndarray | None = None) -> np.ndarray:
    """``[L, K]`` the top of every explorer tile, the methods' columns in order.

    Args:
        explorer: per method, its ``[L, K_m, rows, cols]`` explorer stack.
        inside: ``[rows, cols]`` True for the patches with image (None: every patch).
    """
    tops = []
    for stack in explorer.values():
        values = _on_image(stack, inside)  # [L, K_m, P']
        peak = values.max(axis=-1)  # in the maps' own precision, as to_unit divides
        if setting.kind == "shared":
            tops.append(np.full_like(peak, shared_scale([stack], inside).top))
        elif setting.kind == "percentile":
            cut = np.percentile(values.astype(np.float64), setting.percentile, axis=-1)
            tops.append(np.where(cut > 0, cut, peak).astype(peak.dtype))  # as map_scale: a zero percentile falls back
        else:
            tops.append(peak)
    return np.concatenate(tops, axis=1)


@dataclass(frozen=True)
class ImageScales:
    """The scales of one image's figures.

    Attributes:
        maps: per map name, the scale of its overlay.
        tokens: the token-to-token map's scale, or None without it.
        explorer: per method, the scale of its explorer tiles (``top`` None when each tile has
            its own: :func:`tile_tops` gives them).
    """

    maps: dict[str, Scale]
    tokens: Scale | None = None
    explorer: dict[str, Scale] = field(default_factory=dict)


def image_scales(
    maps: Mapping[str, np.ndarray],
    tokens: np.ndarray | None,
    explorer: Mapping[str, np.ndarray],
    setting: ScaleSetting,
    inside: np.ndarray | None = None,
) -> ImageScales:
    """The scales of every figure of one image under ``setting``.

    Args:
        maps: every overlay's map by name.
        tokens: the token-to-token attention matrix, or None.
        explorer: per method, its ``[L, K_m, rows, cols]`` explorer stack.
        inside: ``[rows, cols]`` True for the patches with image (None: every patch).
    """
    if setting.kind == "shared":
        family = shared_scale(maps.values(), inside)
        map_scales = {name: family for name in maps}
        tiles = {name: shared_scale([stack], inside) for name, stack in explorer.items()}
    else:
        map_scales = {name: map_scale(grid, setting, inside) for name, grid in maps.items()}
        tiles = {name: Scale(setting.kind, None, None) for name in explorer}
    alone = setting if setting.kind == "percentile" else ScaleSetting("map")
    return ImageScales(map_scales, None if tokens is None else map_scale(tokens, alone), tiles)


def result_scales(result, setting: ScaleSetting) -> ImageScales:
    """:func:`image_scales` of an :class:`~reportgen.experiments.ImageResult`."""
    tokens = result.attention.token_attention if result.attention is not None else None
    explorer = {name: output.layers for name, output in result.methods.items()}
    return image_scales(result.maps, tokens, explorer, setting, result.content.weights > 0)


def ordinal(percentile: float) -> str:
    """``99`` -> ``99th``, ``99.5`` -> ``99.5th``, ``51`` -> ``51st`` (for captions)."""
    text = f"{percentile:g}"
    if "." in text or text.endswith(("11", "12", "13")):
        return f"{text}th"
    return text + {"1": "st", "2": "nd", "3": "rd"}.get(text[-1], "th")
