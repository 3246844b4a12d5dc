"""Experiment 3 pooled over the whole manifest, from the per-image similarity tables.

Read from the image records, the one form both freshly computed and cached images have. Numpy
only: a rebuild that reuses every image from the cache recomputes this without torch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairSummary:
    """Across the manifest, one unordered pair of labels seen in the same image.

    Attributes:
        labels: the two base labels, sorted.
        count: object pairs with these labels.
        plain / rollout: mean cosine similarity.
        lowered: fraction of those pairs where rollout weighting lowered the similarity.
    """

    labels: tuple[str, str]
    count: int
    plain: float
    rollout: float
    lowered: float


ObjectTable = tuple[list[str], np.ndarray, np.ndarray]
"""One image's objects: (base labels, plain similarity ``[K, K]``, rollout similarity ``[K, K]``)."""


def object_tables(records: list[dict]) -> list[ObjectTable]:
    """The table of every image record with objects and rollout-weighted similarities."""
    tables = []
    for record in records:
        objects = record.get("objects")
        if objects and objects["objects"] and objects["rollout_similarity"] is not None:
            tables.append(
                (
                    [o["base_label"] for o in objects["objects"]],
                    np.asarray(objects["plain_similarity"], dtype=np.float64),
                    np.asarray(objects["rollout_similarity"], dtype=np.float64),
                )
            )
    return tables


def summarise_pairs(tables: list[ObjectTable]) -> list[PairSummary]:
    """Pool experiment 3 over all images, per unordered pair of labels."""
    pairs: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for labels, plain, rolled in tables:
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                key = tuple(sorted((labels[i], labels[j])))
                pairs[key].append((float(plain[i, j]), float(rolled[i, j])))
    summary = []
    for key in sorted(pairs):
        values = np.array(pairs[key])
        summary.append(
            PairSummary(
                labels=key,
                count=len(values),
                plain=float(values[:, 0].mean()),
                rollout=float(values[:, 1].mean()),
                lowered=float((values[:, 1] < values[:, 0]).mean()),
            )
        )
    return summary


def fraction_lowered(tables: list[ObjectTable]) -> tuple[int, int]:
    """(object pairs where rollout weighting lowered the similarity, all object pairs)."""
    lowered = total = 0
    for labels, plain, rolled in tables:
        upper = np.triu_indices(len(labels), k=1)
        diff = rolled[upper] - plain[upper]
        lowered += int((diff < 0).sum())
        total += int(diff.size)
    return lowered, total
