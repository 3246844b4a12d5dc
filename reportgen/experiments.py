"""The experiments, turning one image's forward pass into plain results.

1. Attention on the image (with the ``attention`` method): last-layer attention of the query (the
   CLS token, or the mean of the patch queries for a model without one) over the patch
   grid per head, its mean and max over heads, the token-to-token map, and their entropies.
2. Raw last-layer attention vs attention rollout (with both methods), and how far they agree.
3. Object embeddings pooled from patch tokens, plain and (with ``rollout``) rollout-weighted, and
   their cosine similarities.

With ``evaluate``, :func:`evaluation` adds how far each map reflects what the model uses: the
perturbation curves the model stage scored (:mod:`reportgen.model.perturbation`), their areas
against a random baseline, localisation in the boxes and agreement between every pair of maps.

Every map of every configured method also gets its entropy and the share of its mass on letterbox
padding. Every statistic of a map (entropy, rank agreement, top-10% overlap, mass in a box) is taken
over the patches that hold image, each weighted by the fraction of it that is image
(:class:`Content`), so padding neither dilutes nor inflates it. Results are dataclasses of numpy
arrays, floats and images; later stages (figures, site, the API) never see tensors. Grids are
``[rows, cols]`` arrays over the model input's patch grid (padding included: the maps are what the
model gave).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from reportgen.config import ImageEntry, ObjectBox
from reportgen.imaging import Geometry
from reportgen.methods import DOMINANT_RATIO, DOMINANT_SHARE, sectioned_methods
from reportgen.methods.base import ForwardPass, MapMethod, MethodMaps, Prediction, Target, TokenLayout
from reportgen.methods.evaluation import SANITY_THRESHOLD, CURVE_KINDS, Curves, mass_in_box, pointing_hit
from reportgen.methods.embeddings import (
    cosine_similarity_matrix,
    number_duplicates,
    patch_coverage,
    pooled_embedding,
    rollout_weights,
)
from reportgen.methods.maths import (
    content_values,
    entropy,
    norm_outlier_threshold,
    normalised,
    padding_share,
    spearman,
    top_fraction_overlap,
)

TOP_FRACTION = 0.1


@dataclass(frozen=True)
class Entropy:
    """Entropy of one attention distribution: in nats, and divided by log(number of outcomes).

    Both are None for a map with no positive weight (all zero): it is no distribution, and an
    entropy of 0 would claim all its mass is on one patch.
    """

    nats: float | None
    normalised: float | None

    @classmethod
    def of(cls, p: torch.Tensor | np.ndarray) -> Entropy:
        return cls.of_rows(np.asarray(p, dtype=np.float64).reshape(1, -1))[0]

    @classmethod
    def of_rows(cls, rows: np.ndarray) -> tuple[Entropy, ...]:
        """The entropy of each row of ``[K, n]`` (one pass over the stack: a map's few hundred
        values cost less to reduce than a call per map and per statistic)."""
        t = torch.as_tensor(np.asarray(rows, dtype=np.float64))
        nats = entropy(t)
        return tuple(map(cls.from_values, nats.tolist(), normalised(nats, t.shape[-1]).tolist()))

    @classmethod
    def from_values(cls, nats: torch.Tensor | float, normalised: torch.Tensor | float) -> Entropy:
        """From computed values, NaN (undefined) becoming None."""
        return cls(nats=_defined(nats), normalised=_defined(normalised))

    @property
    def defined(self) -> bool:
        return self.normalised is not None


def _defined(value: torch.Tensor | float) -> float | None:
    f = float(value)
    return None if np.isnan(f) else f


@dataclass(frozen=True)
class Content:
    """Which patches of the model input hold image rather than letterbox padding.

    Attributes:
        weights: ``[rows, cols]`` fraction of each patch covered by the image, in ``[0, 1]``.
    """

    weights: np.ndarray

    @classmethod
    def of(cls, geometry: Geometry, layout: TokenLayout) -> Content:
        return cls(patch_coverage(geometry.content_box(), layout.grid, layout.patch_size))

    @property
    def fraction(self) -> float:
        """Share of the patch grid's area that is image."""
        return float(self.weights.mean())

    def values(self, grid: np.ndarray) -> np.ndarray:
        """``grid`` over the patches with image, each weighted by its image fraction (flat)."""
        return content_values(grid, self.weights)

    @property
    def dominant_share(self) -> float:
        """The share of a map's mass on the image above which one patch dominates it:
        ``DOMINANT_SHARE``, or ``DOMINANT_RATIO`` times a uniform map's share if that is more."""
        return max(DOMINANT_SHARE, DOMINANT_RATIO / float(self.weights.sum()))

    def padding_share(self, grid: np.ndarray) -> float | None:
        """Share of ``grid``'s mass on padding (None for a map without mass)."""
        return padding_share(grid, self.weights)


@dataclass(frozen=True)
class TokenNorms:
    """The L2 norms of the patch tokens entering each block, and the high-norm outliers.

    Attributes:
        patches: ``[L, rows, cols]`` norm of each patch token per layer.
        prefix: ``[L, num_prefix_tokens]`` norm of each prefix token per layer.
        threshold: ``[L]`` per layer, the norm above which a patch token is an outlier (see
            :func:`~reportgen.methods.maths.norm_outlier_threshold`).
        outliers: ``[L, rows, cols]`` True where a patch token's norm is above its layer's threshold.
    """

    patches: np.ndarray
    prefix: np.ndarray
    threshold: np.ndarray
    outliers: np.ndarray

    @classmethod
    def of(cls, norms: torch.Tensor, layout: TokenLayout) -> TokenNorms:
        values = norms.double().numpy()  # [L, N]
        patches = values[:, layout.num_prefix_tokens :]
        threshold = norm_outlier_threshold(patches)
        return cls(
            patches=patches.reshape(-1, *layout.grid),
            prefix=values[:, : layout.num_prefix_tokens],
            threshold=threshold,
            outliers=(patches > threshold[:, None]).reshape(-1, *layout.grid),
        )

    @property
    def last_outliers(self) -> np.ndarray:
        """``[rows, cols]`` the outliers among the tokens the last layer attends over (its input)."""
        return self.outliers[-1]


@dataclass(frozen=True)
class Concentration:
    """Where a map's mass sits besides the image: one patch, high-norm tokens, prefix tokens.

    Over the image: each patch weighted by the fraction of it that is image, as every map statistic.

    Attributes:
        peak: (row, col) of the map's largest patch (the first, in row order, among equals).
        peak_share: that patch's share of the map's mass on the image.
        peak_is_outlier: the peak is a high-norm outlier among the tokens the last layer reads.
        outlier_share: share of the map's mass on the image that lies on those outlier tokens.
        prefix_share: per kind of prefix token (``cls``, ``register``, ...), its share of the
            map's whole mass (prefix tokens and patches); empty for a map over the patches only.
        note: the peak is an outlier token or holds more than :attr:`Content.dominant_share` of
            the mass on the image.
    """

    peak: tuple[int, int]
    peak_share: float | None
    peak_is_outlier: bool
    outlier_share: float | None
    prefix_share: dict[str, float]
    note: bool


def concentration(
    grid: np.ndarray, content: Content, prefix: np.ndarray | None, outliers: np.ndarray | None, layout: TokenLayout
) -> Concentration:
    """The :class:`Concentration` of one map (``prefix``: its values on the prefix tokens, or None)."""
    weighted = grid * content.weights
    total = float(weighted.sum())
    flat = int(np.argmax(weighted))
    peak = (flat // grid.shape[1], flat % grid.shape[1])
    peak_share = float(weighted.max()) / total if total > 0 else None
    peak_is_outlier = bool(outliers is not None and outliers[peak])
    outlier_share = float(weighted[outliers].sum()) / total if outliers is not None and total > 0 else None
    prefix_share: dict[str, float] = {}
    if prefix is not None and len(prefix):
        whole = float(grid.sum()) + float(prefix.sum())  # the whole row: prefix tokens and every patch
        for kind, value in zip(layout.kinds(), prefix):
            prefix_share[kind] = prefix_share.get(kind, 0.0) + (float(value) / whole if whole > 0 else 0.0)
    dominant = peak_share is not None and peak_share > content.dominant_share
    return Concentration(peak, peak_share, peak_is_outlier, outlier_share, prefix_share, peak_is_outlier or dominant)


def dominant_layers(outputs: dict[str, MethodMaps], content: Content) -> dict[str, tuple[tuple[int, float], ...]]:
    """Per method, ``(layer from 1, largest patch's share)`` of each layer whose explorer map (the
    last column: the mean over heads, or the method's one map) has a patch holding more than
    :attr:`Content.dominant_share` of its mass on the image."""
    found = {}
    for name, output in outputs.items():
        summary = output.layers[:, -1] * content.weights  # [L, rows, cols]
        totals = summary.sum(axis=(1, 2))
        shares = np.divide(summary.max(axis=(1, 2)), totals, out=np.zeros_like(totals), where=totals > 0)
        found[name] = tuple((layer + 1, float(share)) for layer, share in enumerate(shares) if share > content.dominant_share)
    return found


def layer_entropy(outputs: dict[str, MethodMaps], content: Content) -> dict[str, tuple[float | None, ...]]:
    """Per method, the normalised entropy over the image's patches of its explorer map at each
    layer (the last column: the mean over heads, or the method's one map); None where that map
    is all zero (rollout before its start layer: the identity's row has nothing on the patches)."""
    return {
        name: tuple(e.normalised for e in Entropy.of_rows(content.values(output.layers[:, -1])))
        for name, output in outputs.items()
    }


@dataclass(frozen=True)
class BoxMass:
    """How much of the head-mean query attention falls inside an object's box.

    Attributes:
        label: the object's label.
        mass: share of the attention on the image (padding excluded) that is inside the box.
        area_share: the box's share of the image area the model sees (padding excluded).
    """

    label: str
    mass: float
    area_share: float


@dataclass(frozen=True)
class AttentionResult:
    """Experiment 1. The query's rows are restricted to the patches (prefix tokens dropped), not renormalised.

    Attributes:
        heads: ``[H, rows, cols]`` last-layer attention of the query per head.
        mean: ``[rows, cols]`` mean over heads.
        max: ``[rows, cols]`` max over heads.
        token_attention: ``[N, N]`` last-layer token-to-token attention, mean over heads.
        head_entropy: per head, of the query's attention over patches.
        mean_entropy: of the head-mean map.
        max_entropy: of the head-max map (normalised to a distribution first).
        token_entropy: mean over query tokens of each row's entropy (over all N tokens; None if
            any row is all zero).
        prefix_mass: share of the head-mean query attention that goes to prefix tokens, not patches.
        box_mass: for each object given, the attention inside its box vs its area.
    """

    heads: np.ndarray
    mean: np.ndarray
    max: np.ndarray
    token_attention: np.ndarray
    head_entropy: tuple[Entropy, ...]
    mean_entropy: Entropy
    max_entropy: Entropy
    token_entropy: Entropy
    prefix_mass: float
    box_mass: tuple[BoxMass, ...]


@dataclass(frozen=True)
class RolloutResult:
    """Experiment 2: raw last-layer query attention (head mean) vs rollout, both over the patches.

    Attributes:
        raw: ``[rows, cols]`` last-layer attention of the query, mean over heads.
        rollout: ``[rows, cols]`` the query's row of the rollout.
        raw_entropy / rollout_entropy: entropies of the two maps over the patches.
        spearman: rank correlation of the two maps over patches.
        top_overlap: share of the raw map's top-10% patches that are also in the rollout's top 10%
            (the expected share when ties are broken at random, see
            :func:`~reportgen.methods.maths.top_fraction_overlap`).
    """

    raw: np.ndarray
    rollout: np.ndarray
    raw_entropy: Entropy
    rollout_entropy: Entropy
    spearman: float
    top_overlap: float


@dataclass(frozen=True)
class ObjectEmbedding:
    """One object of experiment 3.

    Attributes:
        label: display label, numbered when repeated in the image (``dog #2``).
        base_label: the label as given by the manifest or detector.
        box: ``(x0, y0, x1, y1)`` in original-image pixels.
        input_box: the box in model-input pixels, clipped to the input.
        visible: fraction of the box's area inside the model input.
        score: detector confidence, or None for manifest boxes.
        plain: ``[C]`` coverage-weighted mean of the final patch tokens in the box.
        rollout: ``[C]`` the same tokens weighted by the query's rollout attention inside the box (None
            without the ``rollout`` method).
    """

    label: str
    base_label: str
    box: tuple[float, float, float, float]
    input_box: tuple[float, float, float, float]
    visible: float
    score: float | None
    plain: np.ndarray
    rollout: np.ndarray | None


@dataclass(frozen=True)
class ObjectsResult:
    """Experiment 3 for one image.

    Attributes:
        source: ``"manifest"`` or the detector's name.
        objects: objects that fall (at least partly) inside the model input.
        skipped: ``(label, reason)`` for objects that could not be used.
        plain_similarity / rollout_similarity: ``[K, K]`` cosine similarities (rollout: None
            without the ``rollout`` method).
        difference: rollout minus plain.
        detector_unavailable: why the detector that should have found the objects could not be
            loaded (then there are none), or None.
    """

    source: str
    objects: tuple[ObjectEmbedding, ...]
    skipped: tuple[tuple[str, str], ...]
    plain_similarity: np.ndarray
    rollout_similarity: np.ndarray | None
    detector_unavailable: str | None = None

    @property
    def difference(self) -> np.ndarray | None:
        return None if self.rollout_similarity is None else self.rollout_similarity - self.plain_similarity

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.objects]


@dataclass(frozen=True)
class BoxLocalisation:
    """How each map localises one box (in model-input pixels).

    Attributes:
        label: the object's label (numbered when repeated).
        input_box: the box in model-input pixels, clipped to the input.
        area_share: the box's share of the image area the model sees (padding excluded).
        hit: per map name, whether its largest patch on the image lies within
            :data:`~reportgen.methods.evaluation.POINTING_TOLERANCE` pixels of the box (None for a
            map that is flat over the image, which has no largest patch).
        mass: per map name, the share of its mass on the image inside the box (None without mass).
    """

    label: str
    input_box: tuple[float, float, float, float]
    area_share: float
    hit: dict[str, bool | None]
    mass: dict[str, float | None]


@dataclass(frozen=True)
class Agreement:
    """How far two maps agree over the image's patches.

    Attributes:
        a / b: the two maps' names, in page order.
        spearman: rank correlation (NaN when either map is constant).
        top_overlap: share of ``a``'s top-10% patches also in ``b``'s (ties shared).
    """

    a: str
    b: str
    spearman: float
    top_overlap: float


@dataclass(frozen=True)
class RandomBaseline:
    """The random orders' curves of one kind, summarised.

    Attributes:
        mean / std: ``[S + 1]`` the mean and standard deviation over the orders at each step.
        aucs: ``[R]`` each order's area under its curve.
    """

    mean: np.ndarray
    std: np.ndarray
    aucs: np.ndarray

    @property
    def auc_mean(self) -> float:
        return float(self.aucs.mean()) if self.aucs.size else float("nan")

    @property
    def auc_std(self) -> float:
        return float(self.aucs.std()) if self.aucs.size else float("nan")


@dataclass(frozen=True)
class Sanity:
    """The cascading model-randomisation check of one image's maps.

    Attributes:
        blocks: at each step, the block (numbered from 1) re-initialised then, last block first;
            every block after it stays re-initialised.
        spearman: per map name, ``[steps]`` its rank correlation over the image's patches with the
            original map after each step (NaN where either map is constant).
    """

    blocks: tuple[int, ...]
    spearman: dict[str, np.ndarray]

    @property
    def flagged(self) -> dict[str, bool]:
        """Per map, whether it still correlates above :data:`SANITY_THRESHOLD` with every block
        re-initialised: it does not depend on what the model learnt."""
        return {name: bool(values[-1] > SANITY_THRESHOLD) for name, values in self.spearman.items()}


def sanity(result: ImageResult, steps: list[tuple[int, dict[str, np.ndarray]]]) -> Sanity:
    """The :class:`Sanity` of ``result``'s maps from each step's ``(block index, maps)``."""
    content = result.content
    return Sanity(
        blocks=tuple(index + 1 for index, _ in steps),
        spearman={
            name: np.array([spearman(content.values(grid), content.values(maps[name])) for _, maps in steps])
            for name, grid in result.maps.items()
        },
    )


@dataclass(frozen=True)
class Evaluation:
    """How far each map of one image reflects what the model uses.

    Attributes:
        baseline: what replaced a removed patch (``mean``, ``blur``, ``zero``).
        curves: the perturbation curves the model scored (each map with its own target).
        auc: per map name, per kind of curve, the area under it.
        randoms: per target of ``curves.targets`` (the image's first), per kind of curve, the
            random orders' :class:`RandomBaseline` scored with it (``negative`` has the deletion
            curves: a reversed random order is as random).
        localisation: per box of the image, how each map localises it.
        agreement: every pair of maps, in page order.
        sanity: the model-randomisation check (with ``evaluate.sanity``), else None.
    """

    baseline: str
    curves: Curves
    auc: dict[str, dict[str, float]]
    randoms: tuple[dict[str, RandomBaseline], ...]
    localisation: tuple[BoxLocalisation, ...]
    agreement: tuple[Agreement, ...]
    sanity: Sanity | None = None

    @property
    def random(self) -> dict[str, RandomBaseline]:
        """The random orders scored with the image's target."""
        return self.randoms[0]

    def beats_random(self, name: str, kind: str) -> bool:
        """Whether map ``name``'s curve ``kind`` is better than the mean of the random orders
        scored with the map's own target."""
        from reportgen.methods.evaluation import beats_random

        return beats_random(kind, self.auc[name][kind], self.randoms[self.curves.scored_with[name]][kind].auc_mean)


@dataclass(frozen=True)
class ImageResult:
    """Everything the report shows for one image.

    Attributes:
        entry: the manifest entry (boxes in the original image's pixels).
        size: the original image's (width, height): the file's, upright, before any downscaling
            on decoding (``original`` may be smaller); boxes are in these pixels.
        geometry: how the image became the model input.
        original: the upright original image, as decoded (at most ``MAX_SIDE`` on its longest side).
        view: the model's view of it (model-input size, padding included).
        methods: per configured method, in order, its maps.
        content: which patches hold image rather than padding.
        entropy: per map name, the entropy of the map over the image's patches.
        padding_share: per map name, the share of its mass on letterbox padding (None without mass).
        concentration: per map name, its peak and its mass on outlier and prefix tokens.
        dominant_layers: per method, the layers (from 1) whose explorer map (the mean over heads,
            or the method's one map) has one patch holding more than
            :attr:`Content.dominant_share` of its mass on the image, with that share.
        norms: the token norms per layer and their high-norm outliers (None when not captured).
        attention: experiment 1 (with the ``attention`` method), else None.
        rollout: experiment 2 (with ``attention`` and ``rollout``), else None.
        objects: experiment 3 (``multi`` images), else None.
        predictions: a classifier's top-5 predictions with their softmax probabilities (with a
            method that explains a target), else None.
        target_count: how many class (or label-free) targets each method that explains one has
            maps for (see :func:`~reportgen.methods.method_maps`).
        object_target_count: how many objects it has maps for.
        layer_entropy: per method, the normalised entropy of its explorer map at each layer
            (:func:`layer_entropy`).
        evaluation: how far each map reflects what the model uses (with ``evaluate``), else None.
    """

    entry: ImageEntry
    size: tuple[int, int]
    geometry: Geometry
    original: Image.Image
    view: Image.Image
    methods: dict[str, MethodMaps]
    content: Content
    entropy: dict[str, Entropy]
    padding_share: dict[str, float | None]
    concentration: dict[str, Concentration]
    dominant_layers: dict[str, tuple[tuple[int, float], ...]]
    norms: TokenNorms | None
    attention: AttentionResult | None
    rollout: RolloutResult | None
    objects: ObjectsResult | None
    predictions: tuple[Prediction, ...] | None = None
    target_count: int = 1
    object_target_count: int = 0
    layer_entropy: dict[str, tuple[float | None, ...]] = field(default_factory=dict)
    evaluation: Evaluation | None = None

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """Every map of every method, by name (``attention/mean``, ``rollout``, ...)."""
        return _all_maps(self.methods)

    @property
    def targets(self) -> dict[str, Target]:
        """Per map name, what it explains (maps of the methods that explain a target only)."""
        return {name: out.target_of(name) for out in self.methods.values() if out.target is not None for name in out.maps}


@dataclass(frozen=True)
class ImageFailure:
    """An image that could not be explained, and why (one sentence for its card)."""

    entry: ImageEntry
    message: str


@dataclass(frozen=True)
class SeenObject:
    """An object the model sees: its label (numbered where labels repeat), its box in the original
    image's pixels, that box in model-input pixels, the share of it the model sees, and ``[rows,
    cols]`` the fraction of each patch inside it."""

    label: str
    box: ObjectBox
    input_box: tuple[float, float, float, float]
    visible: float
    coverage: np.ndarray


@dataclass(frozen=True)
class Objects:
    """The objects of a ``multi`` image: boxes in the original image's pixels, where they came from
    (``manifest`` or the detector's name) and why the detector could not be loaded (or None)."""

    boxes: tuple[ObjectBox, ...]
    source: str
    detector_unavailable: str | None = None


def explain(
    entry: ImageEntry,
    forward: ForwardPass,
    methods: list[MapMethod],
    layout: TokenLayout,
    geometry: Geometry,
    original: Image.Image,
    view: Image.Image,
    objects: Objects | None,
) -> ImageResult:
    """Run the methods' maps and the experiments on one image's forward pass."""
    outputs = {method.spec.name: maps_for_every_target(method, forward, layout) for method in methods}
    maps = _all_maps(outputs)
    content = Content.of(geometry, layout)
    entropies = dict(zip(maps, Entropy.of_rows(content.values(np.stack(list(maps.values())))))) if maps else {}
    attention = outputs.get("attention")
    compared = "rollout" in sectioned_methods(outputs)
    norms = TokenNorms.of(forward.token_norms, layout) if forward.token_norms is not None else None
    outliers = norms.last_outliers if norms is not None else None
    prefixes = {name: values for output in outputs.values() for name, values in output.prefix.items()}
    return ImageResult(
        entry=entry,
        size=geometry.source,
        geometry=geometry,
        original=original,
        view=view,
        methods=outputs,
        content=content,
        entropy=entropies,
        padding_share={name: content.padding_share(grid) for name, grid in maps.items()},
        concentration={name: concentration(grid, content, prefixes.get(name), outliers, layout) for name, grid in maps.items()},
        dominant_layers=dominant_layers(outputs, content),
        norms=norms,
        attention=attention_experiment(attention, forward, entropies, content, layout, geometry, entry.objects) if attention else None,
        rollout=rollout_experiment(maps["attention/mean"], maps["rollout"], entropies, content) if compared else None,
        objects=objects_experiment(forward, maps.get("rollout"), layout, geometry, objects) if objects else None,
        predictions=forward.predictions,
        target_count=1 + sum(t.kind != "object" for t, _kept in forward.other_targets),
        object_target_count=sum(t.kind == "object" for t, _kept in forward.other_targets),
        layer_entropy=layer_entropy(outputs, content),
    )


def maps_for_every_target(method: MapMethod, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
    """The maps of ``method`` for every target of the image: the first target's as the method
    makes them, then each further target's maps named as :func:`~reportgen.methods.method_maps`
    says (the explorer's layers stay the first target's)."""
    first = method.maps(forward, layout)
    if not method.spec.targeted or not forward.other_targets:
        return first
    maps, prefix = dict(first.maps), dict(first.prefix)
    targets = {name: first.target for name in first.maps}
    counts = {"target": 1, "object": 0}
    for target, kept in forward.other_targets:
        kind = "object" if target.kind == "object" else "target"
        counts[kind] += 1
        other = method.maps(dataclasses.replace(forward, kept={**forward.kept, **kept}, target=target), layout)
        for name, grid in other.maps.items():
            maps[f"{name}/{kind}-{counts[kind]}"] = grid
            targets[f"{name}/{kind}-{counts[kind]}"] = target
        prefix.update({f"{name}/{kind}-{counts[kind]}": values for name, values in other.prefix.items()})
    return dataclasses.replace(first, maps=maps, prefix=prefix, targets=targets)


def evaluation(
    result: ImageResult, curves: Curves, baseline: str, layout: TokenLayout, checked: Sanity | None = None
) -> Evaluation:
    """The :class:`Evaluation` of one image from its maps (every map, each scored with its own
    target), the curves the model scored and (if run) the sanity check."""
    maps, content = result.maps, result.content
    randoms = []
    for target in range(len(curves.targets)):
        random = {}
        for kind in CURVE_KINDS:
            rows = curves.targets[target].random["deletion" if kind == "negative" else kind]
            random[kind] = RandomBaseline(
                mean=rows.mean(axis=0) if len(rows) else np.full(len(curves.fractions), np.nan),
                std=rows.std(axis=0) if len(rows) else np.full(len(curves.fractions), np.nan),
                aucs=curves.random_aucs(kind, target),
            )
        randoms.append(random)
    names = list(maps)
    agreement = tuple(
        Agreement(a, b, spearman(content.values(maps[a]), content.values(maps[b])),
                  top_fraction_overlap(content.values(maps[a]), content.values(maps[b]), TOP_FRACTION))
        for i, a in enumerate(names) for b in names[i + 1 :]
    )
    localisation = []
    for label, input_box in _input_boxes(result):
        coverage = patch_coverage(input_box, layout.grid, layout.patch_size)
        localisation.append(
            BoxLocalisation(
                label=label,
                input_box=input_box,
                area_share=_box_fraction(input_box, result.geometry),
                hit={name: pointing_hit(grid, content.weights, layout.patch_size, input_box) for name, grid in maps.items()},
                mass={name: mass_in_box(grid, content.weights, coverage) for name, grid in maps.items()},
            )
        )
    return Evaluation(
        baseline=baseline,
        curves=curves,
        auc={name: {kind: curves.auc(name, kind) for kind in CURVE_KINDS} for name in curves.maps},
        randoms=tuple(randoms),
        localisation=tuple(localisation),
        agreement=agreement,
        sanity=checked,
    )


def _input_boxes(result: ImageResult) -> list[tuple[str, tuple[float, float, float, float]]]:
    """The image's boxes in model-input pixels: its objects' (the manifest's or a detector's), else
    the manifest's boxes of a ``single`` image; boxes cropped away are left out."""
    if result.objects is not None:
        return [(o.label, o.input_box) for o in result.objects.objects]
    boxes = result.entry.objects
    mapped = [(label, result.geometry.map_box(box.as_tuple())[0]) for label, box in zip(number_duplicates([b.label for b in boxes]), boxes)]
    return [(label, box) for label, box in mapped if box is not None]


def _all_maps(outputs: dict[str, MethodMaps]) -> dict[str, np.ndarray]:
    return {name: grid for output in outputs.values() for name, grid in output.maps.items()}


def _box_fraction(input_box: tuple[float, float, float, float], geometry: Geometry) -> float:
    x0, y0, x1, y1 = geometry.content_box()
    content = (x1 - x0) * (y1 - y0)
    return (input_box[2] - input_box[0]) * (input_box[3] - input_box[1]) / content


def attention_experiment(
    attention: MethodMaps,
    forward: ForwardPass,
    entropies: dict[str, Entropy],
    content: Content,
    layout: TokenLayout,
    geometry: Geometry,
    boxes: tuple[ObjectBox, ...] = (),
) -> AttentionResult:
    """Experiment 1 from the ``attention`` method's maps."""
    mean, peak, heads = attention.maps["attention/mean"], attention.maps["attention/max"], attention.extras["heads"]
    box_mass = []
    for label, box in zip(number_duplicates([b.label for b in boxes]), boxes):
        input_box, _ = geometry.map_box(box.as_tuple())
        if input_box is None:
            continue
        coverage = patch_coverage(input_box, layout.grid, layout.patch_size)
        box_mass.append(
            BoxMass(
                label=label,
                mass=float((coverage * mean).sum() / (content.weights * mean).sum()),
                area_share=_box_fraction(input_box, geometry),
            )
        )
    token = torch.from_numpy(attention.extras["token_attention"])
    token_nats = entropy(token)
    return AttentionResult(
        heads=heads,
        mean=mean,
        max=peak,
        token_attention=attention.extras["token_attention"],
        head_entropy=Entropy.of_rows(content.values(heads)),
        mean_entropy=entropies["attention/mean"],
        max_entropy=entropies["attention/max"],
        token_entropy=Entropy.from_values(token_nats.mean(), normalised(token_nats, token.shape[-1]).mean()),
        prefix_mass=float(forward.query_rows[-1].mean(dim=0)[: layout.num_prefix_tokens].sum()),
        box_mass=tuple(box_mass),
    )


def rollout_experiment(raw: np.ndarray, rolled: np.ndarray, entropies: dict[str, Entropy], content: Content) -> RolloutResult:
    """Experiment 2: the last-layer head-mean query attention against the rollout, over the image."""
    return RolloutResult(
        raw=raw,
        rollout=rolled,
        raw_entropy=entropies["attention/mean"],
        rollout_entropy=entropies["rollout"],
        spearman=spearman(content.values(raw), content.values(rolled)),
        top_overlap=top_fraction_overlap(content.values(raw), content.values(rolled), TOP_FRACTION),
    )


def seen_objects(objects: Objects, geometry: Geometry, layout: TokenLayout) -> tuple[list[SeenObject], list[tuple[str, str]]]:
    """The objects the model sees, in order, with their patch coverage, and ``(label, reason)`` of
    those it does not (labels numbered where they repeat)."""
    seen, skipped = [], []
    for label, box in zip(number_duplicates([b.label for b in objects.boxes]), objects.boxes):
        input_box, visible = geometry.map_box(box.as_tuple())
        if input_box is None:
            skipped.append((label, "outside the part of the image the model sees (cropped away)"))
            continue
        coverage = patch_coverage(input_box, layout.grid, layout.patch_size)
        if not coverage.any():
            # An input size that is no multiple of the patch leaves a strip no patch covers.
            skipped.append((label, "inside the strip of the model input that no patch covers"))
            continue
        seen.append(SeenObject(label, box, input_box, visible, coverage))
    return seen, skipped


def objects_experiment(
    forward: ForwardPass,
    rollout: np.ndarray | None,
    layout: TokenLayout,
    geometry: Geometry,
    objects: Objects,
) -> ObjectsResult:
    """Experiment 3: embeddings of the objects (boxes in the original image's pixels); the
    rollout-weighted ones only when ``rollout`` (the rollout map) is given."""
    patch_tokens = forward.tokens[layout.num_prefix_tokens :].double().numpy()  # [P, C]
    seen, skipped = seen_objects(objects, geometry, layout)
    embeddings = [
        ObjectEmbedding(
            label=o.label,
            base_label=o.box.label,
            box=o.box.as_tuple(),
            input_box=o.input_box,
            visible=o.visible,
            score=o.box.score,
            plain=pooled_embedding(patch_tokens, o.coverage),
            rollout=None if rollout is None else pooled_embedding(patch_tokens, rollout_weights(o.coverage, rollout)),
        )
        for o in seen
    ]
    return ObjectsResult(
        source=objects.source,
        objects=tuple(embeddings),
        skipped=tuple(skipped),
        plain_similarity=_similarities([o.plain for o in embeddings]),
        rollout_similarity=None if rollout is None else _similarities([o.rollout for o in embeddings]),
        detector_unavailable=objects.detector_unavailable,
    )


def _similarities(embeddings: list[np.ndarray]) -> np.ndarray:
    return cosine_similarity_matrix(np.stack(embeddings)) if embeddings else np.zeros((0, 0))
