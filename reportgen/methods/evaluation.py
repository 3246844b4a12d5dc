"""How far a map reflects what the model uses: the maths of the evaluation (pure numpy, no model).

- **Perturbation curves.** A map orders the patches that hold image (padding is never a
  candidate): most relevant first (*deletion*, Chefer et al.'s "positive" perturbation) or least
  relevant first (*negative*). Step ``s`` of ``S`` removes the first ``round(s / S * K)`` of the
  ``K`` content patches (:func:`step_counts`). Ties in the map are broken by patch index, row by
  row, in both directions (:func:`removal_order`), so an order never depends on the sort's whims.
  *Insertion* (Petsiuk et al., BMVC 2018, the RISE paper) starts from the image blurred and puts
  the original patches back in deletion order. The random baseline uses seeded random orders
  (:func:`random_orders`); a reversed random order is as random as the order itself, so the same
  curves are the baseline for deletion and negative.
- **Area under a curve** (:func:`curve_auc`): the trapezoid rule over the fraction of content
  patches removed (or inserted), from 0 to 1, of the scores normalised to the unperturbed input.
- **Localisation** in a box (:func:`pointing_hit`, :func:`mass_in_box`): the pointing game of
  Zhang et al. (ECCV 2016) with their 15-pixel tolerance, in model-input pixels; and the share of
  the map's mass on the image that lies inside the box.
- **Agreement** between two maps: Spearman's rank correlation and the top-10% overlap of
  :mod:`reportgen.methods.maths`, over the patches that hold image.
- **Sanity check** (Adebayo et al., NeurIPS 2018, cascading model randomisation; the model stage's
  :mod:`reportgen.model.sanity`): each map's rank correlation with its original after each step;
  one still above :data:`SANITY_THRESHOLD` with every block re-initialised is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Steps of a perturbation curve: 10, one per 10% of the content patches.
STEPS = 10

#: The pointing game's tolerance in model-input pixels (Zhang et al. 2016, and the literature since).
POINTING_TOLERANCE = 15.0

#: The seed of the random baseline's orders: the same orders on every build.
RANDOM_SEED = 0

#: The sanity check flags a map whose rank correlation with its original is still above this once
#: every block of the model has been re-initialised.
SANITY_THRESHOLD = 0.5

#: The curves of every map: removing most relevant first, least relevant first, inserting most relevant first.
CURVE_KINDS = ("deletion", "negative", "insertion")


def content_patches(content: np.ndarray) -> np.ndarray:
    """Flat indices (row by row) of the patches that hold any image (``content`` ``[rows, cols]``
    is each patch's image fraction)."""
    return np.flatnonzero(np.ravel(content) > 0)


def removal_order(grid: np.ndarray, content: np.ndarray, most_relevant_first: bool = True) -> np.ndarray:
    """The content patches (flat indices) in the order a curve removes them.

    Args:
        grid: ``[rows, cols]`` the map.
        content: ``[rows, cols]`` each patch's image fraction (0: padding, never removed).
        most_relevant_first: True for deletion and insertion, False for the negative curve.

    Returns:
        ``[K]`` flat patch indices; patches of equal value in patch-index order (row by row)
        whichever the direction.
    """
    candidates = content_patches(content)
    values = np.ravel(np.asarray(grid, dtype=np.float64))[candidates]
    key = -values if most_relevant_first else values
    return candidates[np.argsort(key, kind="stable")]  # stable: ties keep their index order


def step_counts(k: int, steps: int = STEPS) -> np.ndarray:
    """``[steps + 1]`` how many of ``k`` patches are removed after each step: ``round(s / steps * k)``,
    halves rounded up (integer arithmetic, so exact)."""
    s = np.arange(steps + 1)
    return (2 * s * k + steps) // (2 * steps)


def removal_masks(order: np.ndarray, counts: np.ndarray, patches: int) -> np.ndarray:
    """``[len(counts), patches]`` True where a patch has been removed after each step."""
    ranks = np.full(patches, np.iinfo(np.int64).max)
    ranks[order] = np.arange(len(order))
    return ranks[None, :] < np.asarray(counts)[:, None]


def random_orders(candidates: np.ndarray, count: int, seed: int = RANDOM_SEED) -> np.ndarray:
    """``[count, K]`` random orders of the content patches ``candidates``, the same for the same
    seed and patches (numpy's own generator: the global random state is not touched)."""
    generator = np.random.default_rng(seed)
    return np.stack([generator.permutation(candidates) for _ in range(count)]) if count else np.zeros((0, len(candidates)), dtype=np.int64)


def curve_auc(fractions: np.ndarray, scores: np.ndarray) -> float:
    """Area under ``scores`` over ``fractions`` (from 0 to 1) by the trapezoid rule."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2.0)


def expanded_box(box: tuple[float, float, float, float], tolerance: float = POINTING_TOLERANCE) -> tuple[float, float, float, float]:
    """``box`` grown by ``tolerance`` pixels on every side."""
    x0, y0, x1, y1 = box
    return x0 - tolerance, y0 - tolerance, x1 + tolerance, y1 + tolerance


def map_peak(grid: np.ndarray, content: np.ndarray, patch: tuple[int, int]) -> tuple[float, float] | None:
    """The ``(x, y)`` model-input pixel at the centre of the map's largest patch among those that
    hold image (the first, row by row, among equals); None for a map that is flat over the image
    (all zero, say), which points nowhere."""
    candidates = content_patches(content)
    values = np.ravel(np.asarray(grid, dtype=np.float64))[candidates]
    if not len(values) or values.max() == values.min():
        return None
    flat = int(candidates[int(np.argmax(values))])
    cols = np.shape(grid)[1]
    row, col = divmod(flat, cols)
    return (col + 0.5) * patch[1], (row + 0.5) * patch[0]


def pointing_hit(
    grid: np.ndarray, content: np.ndarray, patch: tuple[int, int], box: tuple[float, float, float, float],
    tolerance: float = POINTING_TOLERANCE,
) -> bool | None:
    """The pointing game: whether the map's peak (:func:`map_peak`) lies within ``tolerance`` pixels
    of ``box`` (both in model-input pixels); None for a flat map, which has no peak."""
    peak = map_peak(grid, content, patch)
    if peak is None:
        return None
    x, y = peak
    x0, y0, x1, y1 = expanded_box(box, tolerance)
    return bool(x0 <= x <= x1 and y0 <= y <= y1)


def mass_in_box(grid: np.ndarray, content: np.ndarray, coverage: np.ndarray) -> float | None:
    """Share of the map's mass on the image that lies inside a box (``coverage``: each patch's
    fraction inside it); None for a map without mass on the image."""
    grid = np.asarray(grid, dtype=np.float64)
    total = float((grid * content).sum())
    return float((grid * coverage).sum()) / total if total > 0 else None


@dataclass(frozen=True)
class ScoredTarget:
    """What some of an image's curves are scored with.

    Attributes:
        kind: ``class`` (a classifier's softmax probability), ``label-free`` (a headless model's
            embedding against the unperturbed input's) or ``object`` (the image embedding's cosine
            similarity with an object's, as the object's maps explain).
        description: what it is, in words.
        label: a short name for tables ("class 3 (tabby)", "object 'car'", "label-free").
        reference: its value on the unperturbed input (what the scores are divided by).
        random: ``deletion`` and ``insertion``, ``[R, S + 1]``: the scores of each random order.
        class_index: the class (``class`` only).
        object_label: the object's label (``object`` only).
    """

    kind: str
    description: str
    label: str
    reference: float
    random: dict[str, np.ndarray]
    class_index: int | None = None
    object_label: str | None = None


@dataclass(frozen=True)
class Curves:
    """One image's perturbation curves, as the model scored them.

    Every score is a target on the perturbed input divided by its value on the unperturbed input
    (so step 0 of deletion is 1). Each map is scored with its own target: the class of a
    ``{map}/target-k`` map, the object of a ``{map}/object-j`` map, the image's target (the first)
    for every other map.

    Attributes:
        fractions: ``[S + 1]`` the fraction of the content patches removed (inserted) after each step.
        maps: per map name, per kind of :data:`CURVE_KINDS`, ``[S + 1]`` scores.
        targets: every target some curve is scored with; the image's first.
        scored_with: per map name, its target's index in :attr:`targets`.
        forwards: the forward passes it took (perturbed inputs and the unperturbed one).
    """

    fractions: np.ndarray
    maps: dict[str, dict[str, np.ndarray]]
    targets: tuple[ScoredTarget, ...]
    scored_with: dict[str, int]
    forwards: int

    @property
    def random(self) -> dict[str, np.ndarray]:
        """The random orders' curves scored with the image's target."""
        return self.targets[0].random

    @property
    def target(self) -> str:
        """The image's target, in words."""
        return self.targets[0].description

    @property
    def reference(self) -> float:
        """The image's target on the unperturbed input."""
        return self.targets[0].reference

    def auc(self, name: str, kind: str) -> float:
        """The area under map ``name``'s curve ``kind``."""
        return curve_auc(self.fractions, self.maps[name][kind])

    def random_aucs(self, kind: str, target: int = 0) -> np.ndarray:
        """``[R]`` the area under each random order's curve (``negative``: the deletion curves),
        scored with target ``target``."""
        curves = self.targets[target].random["deletion" if kind == "negative" else kind]
        return np.array([curve_auc(self.fractions, curve) for curve in curves])


def beats_random(kind: str, auc: float, random_mean: float) -> bool:
    """Whether a map's curve is better than the random orders' mean: a lower area for deletion
    (the score falls faster), a higher one for the negative and insertion curves."""
    return auc < random_mean if kind == "deletion" else auc > random_mean
