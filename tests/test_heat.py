"""The similarity tables' colours: the scale's ends and middle, and text readable on every cell
(WCAG 2 contrast, computed here from the standard's formula, not with the code under test)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from reportgen.site.heat import heat_table

RGB = re.compile(r"rgb\(([\d.]+) ([\d.]+) ([\d.]+)\)")


def _rgb(css: str) -> np.ndarray:
    return np.array([float(v) for v in RGB.fullmatch(css).groups()])


def _wcag_luminance(rgb: np.ndarray) -> float:
    c = rgb / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(linear @ [0.2126, 0.7152, 0.0722])


def _ratio(a: np.ndarray, b: np.ndarray) -> float:
    la, lb = _wcag_luminance(a), _wcag_luminance(b)
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def test_scale_runs_from_blue_through_white_to_red():
    table = heat_table([[-1.0, 0.0, 1.0, -0.5, 0.5, 2.0]], 1)
    fills = [_rgb(c["fill"]) for c in table["cells"][0]]
    # ColorBrewer RdBu: its darkest blue, its white-ish middle and its darkest red; halfway points.
    assert fills[0].tolist() == [33, 102, 172] and fills[1].tolist() == [247, 247, 247]
    assert fills[2].tolist() == [178, 24, 43] and fills[5].tolist() == [178, 24, 43]  # beyond the bound: the end
    assert fills[3].tolist() == [146, 197, 222] and fills[4].tolist() == [244, 165, 130]
    # A quarter of the way from 0 to 1 is halfway between the middle and the light red.
    quarter = _rgb(heat_table([[0.25]], 1)["cells"][0][0]["fill"])
    np.testing.assert_allclose(quarter, (np.array([247, 247, 247]) + [244, 165, 130]) / 2, atol=0.051)


def test_bound_defaults_to_the_largest_absolute_value():
    table = heat_table([[0.02, -0.04], [None, 0.0]])
    assert table["bound"] == pytest.approx(0.04)
    assert _rgb(table["cells"][0][1]["fill"]).tolist() == [33, 102, 172]  # -0.04 is the blue end
    assert table["cells"][1][0] == {"fill": None, "light": False}  # no value, no colour
    zeros = heat_table([[0.0, 0.0]])
    assert all(_rgb(c["fill"]).tolist() == [247, 247, 247] for c in zeros["cells"][0])  # all white, no division by 0


def test_text_on_every_colour_of_the_scale_meets_wcag_aa():
    values = np.linspace(-1, 1, 2001)
    table = heat_table([values.tolist()], 1)
    black, white = np.zeros(3), np.full(3, 255.0)
    for value, cell in zip(values, table["cells"][0]):
        fill = _rgb(cell["fill"])
        ink = white if cell["light"] else black
        assert _ratio(fill, ink) >= 4.5, (value, cell)
        # And the better of the two inks was chosen.
        assert _ratio(fill, ink) >= _ratio(fill, black if cell["light"] else white), (value, cell)
    # The ends are dark enough for white text, the middle wants black.
    cells = table["cells"][0]
    assert cells[0]["light"] and cells[-1]["light"] and not cells[1000]["light"]
