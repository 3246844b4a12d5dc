"""Colours of the object-similarity tables: each cell's background and text colour, as data.

A cosine similarity lies in [-1, 1], so the scale diverges from white at 0: blue below, red
above (ColorBrewer's RdBu anchors, interpolated linearly in sRGB). The browser paints the cells
(a CSS custom property per cell), so a table costs no image and its values stay text. The text on
a cell is black or white, whichever contrasts more with it: by WCAG 2's luminance, one of the two
always reaches a contrast of 4.58:1 (above the 4.5:1 of level AA) whatever the background.

Numbers only: no HTML here (the templates hold the markup).
"""

from __future__ import annotations

from collections.abc import Sequence

#: The scale's anchors: (position from -1 to 1, sRGB colour); ColorBrewer RdBu, blue for -1.
ANCHORS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (-1.0, (33, 102, 172)),
    (-0.5, (146, 197, 222)),
    (0.0, (247, 247, 247)),
    (0.5, (244, 165, 130)),
    (1.0, (178, 24, 43)),
)

BLACK, WHITE = (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)

#: Smallest bound of a scale: a table of zeros (a difference of equal tables) is drawn all white.
MIN_BOUND = 1e-6


def scale_colour(position: float) -> tuple[float, float, float]:
    """The sRGB colour (0-255 per channel, unrounded) at ``position`` in [-1, 1] (clipped)."""
    position = min(max(position, -1.0), 1.0)
    for (x0, c0), (x1, c1) in zip(ANCHORS, ANCHORS[1:]):
        if position <= x1:
            t = (position - x0) / (x1 - x0)
            return tuple(a + t * (b - a) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return tuple(float(c) for c in ANCHORS[-1][1])  # type: ignore[return-value]


def luminance(rgb: Sequence[float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour given in 0-255."""
    linear = [(c / 12.92) if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (v / 255.0 for v in rgb)]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG 2 contrast ratio of two colours (1 to 21)."""
    return _ratio(luminance(a), luminance(b))


_WHITE_LUMINANCE, _BLACK_LUMINANCE = luminance(WHITE), luminance(BLACK)


def _light(fill: float) -> bool:
    """Whether white text contrasts more than black with a colour of luminance ``fill``
    (:func:`contrast` of each, from the colour's luminance computed once)."""
    return _ratio(fill, _WHITE_LUMINANCE) > _ratio(fill, _BLACK_LUMINANCE)


def _ratio(la: float, lb: float) -> float:
    la, lb = sorted((la, lb), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _css(rgb: Sequence[float]) -> str:
    # One decimal: a value that differs in its last float bits between machines moves a channel
    # by far less than 0.1, so the page's text stays the same.
    return "rgb(" + " ".join(f"{c:.1f}" for c in rgb) + ")"


def heat_table(matrix: Sequence[Sequence[float | None]], bound: float | None = None) -> dict:
    """The colours of a table of values drawn from ``-bound`` (blue) to ``bound`` (red).

    Args:
        matrix: rows of values (None: a cell with no value, left uncoloured).
        bound: the value drawn at either end of the scale; None: the largest absolute value in
            the table (at least :data:`MIN_BOUND`).

    Returns:
        ``{"bound", "cells": rows of {"fill": CSS colour or None, "light": white text}, "stops": the
        scale's colours and their positions in percent from -bound to bound, for a legend}``.
    """
    if bound is None:
        bound = max([abs(v) for row in matrix for v in row if v is not None], default=0.0)
    bound = max(float(bound), MIN_BOUND)
    cells = []
    for row in matrix:
        out = []
        for value in row:
            if value is None:
                out.append({"fill": None, "light": False})
                continue
            fill = scale_colour(float(value) / bound)
            out.append({"fill": _css(fill), "light": _light(luminance(fill))})
        cells.append(out)
    stops = [{"colour": _css(colour), "percent": (x + 1) * 50} for x, colour in ANCHORS]
    return {"bound": bound, "cells": cells, "stops": stops}
