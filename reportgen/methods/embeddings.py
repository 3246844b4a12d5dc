"""Object embeddings from patch tokens, and their cosine similarities.

Pure maths on numpy arrays: no model, no I/O. Patches are indexed row by row over a
``rows x cols`` grid of ``patch_h x patch_w`` pixel cells in model-input coordinates.
"""

from __future__ import annotations

import numpy as np


def patch_coverage(box: tuple[float, float, float, float], grid: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch's area inside ``box``.

    Args:
        box: ``(x0, y0, x1, y1)`` in model-input pixels.
        grid: ``(rows, cols)``.
        patch: ``(patch_h, patch_w)`` in pixels.

    Returns:
        float64 ``[rows, cols]`` in ``[0, 1]``.
    """
    rows, cols = grid
    ph, pw = patch
    x0, y0, x1, y1 = box

    def overlap(lo: float, hi: float, count: int, size: int) -> np.ndarray:
        starts = np.arange(count, dtype=np.float64) * size
        return np.clip(np.minimum(hi, starts + size) - np.maximum(lo, starts), 0.0, None) / size

    return np.outer(overlap(y0, y1, rows, ph), overlap(x0, x1, cols, pw))


def pooled_embedding(tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of patch tokens.

    Args:
        tokens: ``[P, C]`` patch tokens.
        weights: ``[P]`` non-negative weights (need not sum to 1; must not all be zero).
    """
    weights = np.ravel(weights).astype(np.float64)
    total = weights.sum()
    if total <= 0:
        raise ValueError("pooling weights are all zero")
    return (weights / total) @ tokens.astype(np.float64)


def rollout_weights(coverage: np.ndarray, rollout_patches: np.ndarray) -> np.ndarray:
    """The query's rollout attention inside the box (scaled by patch coverage), normalised to sum to 1."""
    weights = np.ravel(coverage) * np.ravel(rollout_patches)
    total = weights.sum()
    # A box whose patches all have zero rollout falls back to coverage weights rather than NaN.
    return weights / total if total > 0 else np.ravel(coverage) / np.ravel(coverage).sum()


def cosine_similarity_matrix(embeddings: np.ndarray) -> np.ndarray:
    """``[K, K]`` cosine similarities of ``[K, C]`` embeddings; symmetric, in ``[-1, 1]``."""
    e = embeddings.astype(np.float64)
    # Scale each row by its largest |value| first, so tiny or huge rows neither under- nor overflow.
    peak = np.abs(e).max(axis=1, keepdims=True) if e.size else np.ones((e.shape[0], 1))
    e = e / np.where(peak > 0, peak, 1.0)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = e / np.where(norms > 0, norms, 1.0)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    sim = (sim + sim.T) / 2.0  # exact symmetry despite float rounding
    np.fill_diagonal(sim, np.where(norms[:, 0] > 0, 1.0, 0.0))
    return sim


def number_duplicates(labels: list[str]) -> list[str]:
    """Number labels that occur more than once: ``dog, cat, dog`` -> ``dog #1, cat, dog #2``."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    seen: dict[str, int] = {}
    named = []
    for label in labels:
        if counts[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            named.append(f"{label} #{seen[label]}")
        else:
            named.append(label)
    return named
