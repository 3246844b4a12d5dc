"""The layout of an image's comparison grid: rows are the methods that ran, columns the kinds of
map they draw (each method's main map, further maps of one method such as ``attention/max``, the
maps of further class targets and of objects), so that maps of the same kind line up.

Built from names only (no arrays): a page renders it from the record's map names.
"""

from __future__ import annotations

import re

from reportgen.methods import METHODS, figure_key, method_maps

_VARIANT = re.compile(r"/(target|object)-(\d+)$")
_KIND_ORDER = {"main": 0, "extra": 0, "target": 1, "object": 2}


def _column(method: str, map_name: str) -> dict:
    """The column a map belongs in: ``{"kind", "number", "map"}``."""
    variant = _VARIANT.search(map_name)
    base = map_name[: variant.start()] if variant else map_name
    first = METHODS[method].maps[0][0]
    if variant:
        kind, number = variant.group(1), int(variant.group(2))
        return {"kind": kind, "number": number, "map": None if base == first else base}
    return {"kind": "main", "number": 0, "map": None} if base == first else {"kind": "extra", "number": 0, "map": base}


def comparison_grid(methods: list[str] | tuple[str, ...], map_names) -> dict:
    """Rows and columns of the comparison grid.

    Args:
        methods: the methods that ran, in page order.
        map_names: every map the image has (e.g. the keys of its record's ``scales.maps``).

    Returns:
        ``{"columns": [{"kind", "number", "map"}], "rows": [{"method", "cells": [{"map",
        "figure"} or None per column]}]}``: ``kind`` is ``main`` (each method's first map, for a
        method that explains targets its first target's), ``extra`` (a further map of one method,
        named by ``map``), ``target`` (class target ``number``, from 2) or ``object`` (object
        ``number``, from 1); ``figure`` is the map's key in the record's ``figures``.
    """
    names = set(map_names)
    targets = max([int(m.group(2)) for n in names if (m := _VARIANT.search(n)) and m.group(1) == "target"], default=1)
    objects = max([int(m.group(2)) for n in names if (m := _VARIANT.search(n)) and m.group(1) == "object"], default=0)
    cells: dict[str, dict[tuple, dict]] = {}
    columns: dict[tuple, dict] = {}
    for method in methods:
        for map_name, stem in method_maps(method, targets, objects):
            if map_name not in names:
                continue
            column = _column(method, map_name)
            key = (_KIND_ORDER[column["kind"]], column["number"], column["kind"] == "extra", column["map"] or "")
            columns.setdefault(key, column)
            cells.setdefault(method, {})[key] = {"map": map_name, "figure": figure_key(stem)}
    order = sorted(columns)
    return {
        "columns": [columns[key] for key in order],
        "rows": [{"method": method, "cells": [cells[method].get(key) for key in order]} for method in methods if method in cells],
    }
