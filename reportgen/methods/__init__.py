"""The maths of the maps: pure functions on arrays, and the map methods built from them.

A map method is a plug-in: a module here (see :mod:`reportgen.methods.base` for the contract) and
one :class:`MethodSpec` line in :data:`METHODS`. The spec holds what the rest of reportgen must know
without running the method (or importing torch): its maps and the names of their figures, and
how it fills the explorer. This package imports nothing from the config or the site.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

#: How rollout fuses the heads of a layer (the settings accept exactly these).
HEAD_FUSIONS = ("mean", "max", "min")

# The rules of the token-norm and concentration statistics (the pages and results.json state them).
#: High-norm outliers lie more than this many robust standard deviations above their layer's median ...
OUTLIER_SIGMAS = 6.0
#: ... and at more than this multiple of that median (a narrow layer's mild bumps are not outliers).
OUTLIER_RATIO = 2.0
#: A map whose largest patch holds more than this share of its mass on the image gets a note ...
DOMINANT_SHARE = 0.1
#: ... if that is also more than this many times a uniform map's share (small grids are exempt).
DOMINANT_RATIO = 10.0

#: Largest patch grid side (rows and columns) whose patch-to-patch attention (the patch explorer's)
#: is kept at every layer; beyond it only the last layer's (24 x 24 patches at 12 layers: 16 MB of
#: float32 per image).
PATCH_LAYERS_GRID = 24


def patch_layers(depth: int, grid: tuple[int, int]) -> int:
    """How many layers (the last ones) of patch-to-patch attention are kept for a model of
    ``depth`` layers over a ``grid`` of patches: all of them up to :data:`PATCH_LAYERS_GRID`, else 1."""
    return depth if max(grid) <= PATCH_LAYERS_GRID else 1


@dataclass(frozen=True)
class Query:
    """Whose attention the maps show: the row of the attention (or rollout) matrix they read.

    Attributes:
        key: what ``results.json`` and the build cache say (``model.query``).
        name: the query in a sentence ("how strongly *the CLS token* attends ...").
        short: the query before the word "attention" ("*CLS* attention of head 3").
        why: why this query, for a reader who expects the CLS token ("" for the CLS token).
    """

    key: str
    name: str
    short: str
    why: str = ""


#: The CLS token's row: what a model that reads its output from the class token shows.
CLS_QUERY = Query("cls", "the CLS token", "CLS")
#: A model that pools the mean of its patch tokens (global average pooling; with or without a
#: class token or registers) reads the mean of the patch tokens' rows; row 0 would be a single
#: token's (the top-left patch's, or an unused class token's).
PATCH_MEAN_QUERY = Query(
    "mean of patch queries", "the mean of the patch queries", "patch-mean",
    why="the model pools the mean of its patch tokens rather than a CLS token",
)

#: Every query by its key (the cache reads keys back from disk).
QUERIES = {query.key: query for query in (CLS_QUERY, PATCH_MEAN_QUERY)}


@dataclass(frozen=True)
class MethodSpec:
    """What is known of a method before it runs.

    Attributes:
        name: the name the manifest, the command line and the API use.
        module: the module that implements it; it defines ``create(settings) -> MapMethod``.
        maps: ``(map name, figure stem)`` of each map it draws over the image, in page order;
            map names start with the method's name (``attention/mean``).
        explorer: the explorer columns it adds per layer: ``"heads+mean"`` (one per head, then the
            mean over heads) or ``"one"``.
        targeted: its maps explain a target (a class or a label-free score), which every record
            of them names.
    """

    name: str
    module: str
    maps: tuple[tuple[str, str], ...]
    explorer: str
    targeted: bool = False


#: Every method, by name, in the order pages and results show them.
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "attention",
            "reportgen.methods.attention",
            maps=(("attention/mean", "cls-mean"), ("attention/max", "cls-max")),
            explorer="heads+mean",
        ),
        MethodSpec("rollout", "reportgen.methods.rollout", maps=(("rollout", "rollout"),), explorer="one"),
        MethodSpec(
            "relevance", "reportgen.methods.relevance", maps=(("relevance", "relevance"),), explorer="one", targeted=True
        ),
        MethodSpec(
            "grad-rollout",
            "reportgen.methods.grad_rollout",
            maps=(("grad-rollout", "grad-rollout"),),
            explorer="one",
            targeted=True,
        ),
        MethodSpec("gradcam", "reportgen.methods.gradcam", maps=(("gradcam", "gradcam"),), explorer="one", targeted=True),
    )
}

#: What a build runs when the manifest and the command line name no methods.
DEFAULT_METHODS = ("attention", "rollout")


def figure_key(stem: str) -> str:
    """The name pages and records give the figure file ``stem`` (``cls-mean`` -> ``cls_mean``)."""
    return stem.replace("-", "_")


def method_maps(name: str, targets: int = 1, objects: int = 0) -> list[tuple[str, str]]:
    """``(map name, figure stem)`` of every map method ``name`` draws when it explains ``targets``
    class (or label-free) targets and ``objects`` object targets per image: its spec's maps for
    the first target, then, for a targeted method, each of them again for target ``k`` = 2, 3, ...
    as ``{map}/target-k`` (figure ``{stem}-t{k}``) and for object ``j`` = 1, 2, ... as
    ``{map}/object-j`` (figure ``{stem}-o{j}``)."""
    spec = METHODS[name]
    if not spec.targeted:
        return list(spec.maps)
    return [
        *spec.maps,
        *((f"{m}/target-{k}", f"{stem}-t{k}") for k in range(2, targets + 1) for m, stem in spec.maps),
        *((f"{m}/object-{j}", f"{stem}-o{j}") for j in range(1, objects + 1) for m, stem in spec.maps),
    ]


def sectioned_methods(names) -> set[str]:
    """Of the methods ``names``, those whose maps an experiment section of the page shows:
    ``attention`` (experiment 1) and ``rollout`` next to ``attention`` (experiment 2). Every other
    map goes to the page's generic panel."""
    names = set(names)
    if "attention" not in names:
        return set()
    return {"attention"} | ({"rollout"} & names)


def create_methods(names: tuple[str, ...] | list[str], settings) -> list:
    """The methods called ``names`` (already validated), made with ``settings`` (the attention
    settings: head fusion, discard ratio and start layer for rollout). Imports their modules, and
    so torch."""
    return [importlib.import_module(METHODS[name].module).create(settings) for name in names]
