"""The three experiments, turning one image's :class:`AttentionMaps` into plain results.

1. Attention on the image: last-layer CLS attention over the patch grid per head, its mean and max
   over heads, the token-to-token map, and the entropy of each distribution.
2. Raw last-layer attention vs attention rollout, and how far they agree.
3. Object embeddings pooled from patch tokens, plain and rollout-weighted, and their cosine
   similarities.

Results are dataclasses of numpy arrays and floats; later stages (figures, site) never see tensors.
Grids are ``[rows, cols]`` arrays over the model input's patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from reportgen.config import ImageEntry, ObjectBox
from reportgen.imaging import Geometry
from reportgen.methods.embeddings import (
    cosine_similarity_matrix,
    number_duplicates,
    patch_coverage,
    pooled_embedding,
    rollout_weights,
)
from reportgen.methods.maths import entropy, normalised_entropy, spearman, top_fraction_overlap

if TYPE_CHECKING:  # figure workers unpickle these results without importing the model runner
    from reportgen.model.runner import AttentionMaps

TOP_FRACTION = 0.1


@dataclass(frozen=True)
class TokenLayout:
    """How the model's tokens map onto the input.

    Attributes:
        num_prefix_tokens: CLS (+ distillation, registers) before the patches.
        grid: patch grid (rows, cols).
        patch_size: patch (h, w) in input pixels.
    """

    num_prefix_tokens: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]


@dataclass(frozen=True)
class Entropy:
    """Entropy of one attention distribution: in nats, and divided by log(number of outcomes)."""

    nats: float
    normalised: float

    @classmethod
    def of(cls, p: torch.Tensor | np.ndarray) -> Entropy:
        t = torch.as_tensor(np.asarray(p, dtype=np.float64)).flatten()
        return cls(nats=float(entropy(t)), normalised=float(normalised_entropy(t)))


@dataclass(frozen=True)
class BoxMass:
    """How much of the head-mean CLS attention falls inside an object's box.

    Attributes:
        label: the object's label.
        mass: share of the attention (normalised over patches) inside the box, in [0, 1].
        area_share: the box's share of the image area the model sees (padding excluded).
    """

    label: str
    mass: float
    area_share: float


@dataclass(frozen=True)
class AttentionResult:
    """Experiment 1. CLS rows are restricted to the patches (prefix tokens dropped), not renormalised.

    Attributes:
        heads: ``[H, rows, cols]`` last-layer CLS attention per head.
        mean: ``[rows, cols]`` mean over heads.
        max: ``[rows, cols]`` max over heads.
        token_attention: ``[N, N]`` last-layer token-to-token attention, mean over heads.
        head_entropy: per head, of the CLS attention over patches.
        mean_entropy: of the head-mean map.
        max_entropy: of the head-max map (normalised to a distribution first).
        token_entropy: mean over query tokens of each row's entropy (over all N tokens).
        prefix_mass: share of the head-mean CLS attention that goes to prefix tokens, not patches.
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
    """Experiment 2: raw last-layer CLS attention (head mean) vs rollout, both over the patches.

    Attributes:
        raw: ``[rows, cols]`` last-layer CLS attention, mean over heads.
        rollout: ``[rows, cols]`` CLS row of the rollout through all layers.
        rollout_by_layer: ``[L, rows, cols]`` CLS row of the rollout through layers 0..l.
        cls_by_layer: ``[L, H, rows, cols]`` CLS attention of every layer and head.
        raw_entropy / rollout_entropy: entropies of the two maps over the patches.
        spearman: rank correlation of the two maps over patches.
        top_overlap: share of the raw map's top-10% patches that are also in the rollout's top 10%.
    """

    raw: np.ndarray
    rollout: np.ndarray
    rollout_by_layer: np.ndarray
    cls_by_layer: np.ndarray
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
        rollout: ``[C]`` the same tokens weighted by CLS rollout attention inside the box.
    """

    label: str
    base_label: str
    box: tuple[float, float, float, float]
    input_box: tuple[float, float, float, float]
    visible: float
    score: float | None
    plain: np.ndarray
    rollout: np.ndarray


@dataclass(frozen=True)
class ObjectsResult:
    """Experiment 3 for one image.

    Attributes:
        source: ``"manifest"`` or the detector's name.
        objects: objects that fall (at least partly) inside the model input.
        skipped: ``(label, reason)`` for objects that could not be used.
        plain_similarity / rollout_similarity: ``[K, K]`` cosine similarities.
        difference: rollout minus plain.
        detector_unavailable: why the detector that should have found the objects could not be
            loaded (then there are none), or None.
    """

    source: str
    objects: tuple[ObjectEmbedding, ...]
    skipped: tuple[tuple[str, str], ...]
    plain_similarity: np.ndarray
    rollout_similarity: np.ndarray
    detector_unavailable: str | None = None

    @property
    def difference(self) -> np.ndarray:
        return self.rollout_similarity - self.plain_similarity

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.objects]


@dataclass(frozen=True)
class ImageResult:
    """Everything the report shows for one image. ``error`` set means the image failed."""

    entry: ImageEntry
    size: tuple[int, int] | None = None
    geometry: Geometry | None = None
    attention: AttentionResult | None = None
    rollout: RolloutResult | None = None
    objects: ObjectsResult | None = None
    error: str | None = None


def _grid(values: torch.Tensor, layout: TokenLayout) -> np.ndarray:
    """``[..., N]`` token values -> ``[..., rows, cols]`` over the patches (prefix dropped)."""
    patches = values[..., layout.num_prefix_tokens :]
    return patches.reshape(*patches.shape[:-1], *layout.grid).double().numpy()


def _box_fraction(input_box: tuple[float, float, float, float], geometry: Geometry) -> float:
    x0, y0, x1, y1 = geometry.content_box()
    content = (x1 - x0) * (y1 - y0)
    return (input_box[2] - input_box[0]) * (input_box[3] - input_box[1]) / content


def attention_experiment(
    maps: AttentionMaps, layout: TokenLayout, geometry: Geometry, boxes: tuple[ObjectBox, ...] = ()
) -> AttentionResult:
    """Experiment 1 from one image's attention maps."""
    last_cls = maps.cls_attention[-1]  # [H, N]
    heads = _grid(last_cls, layout)
    mean, peak = heads.mean(axis=0), heads.max(axis=0)
    box_mass = []
    for label, box in zip(number_duplicates([b.label for b in boxes]), boxes):
        input_box, _ = geometry.map_box(box.as_tuple())
        if input_box is None:
            continue
        coverage = patch_coverage(input_box, layout.grid, layout.patch_size)
        box_mass.append(
            BoxMass(
                label=label,
                mass=float((coverage * mean).sum() / mean.sum()),
                area_share=_box_fraction(input_box, geometry),
            )
        )
    token = maps.last_layer.double()
    return AttentionResult(
        heads=heads,
        mean=mean,
        max=peak,
        token_attention=token.numpy(),
        head_entropy=tuple(Entropy.of(h) for h in heads),
        mean_entropy=Entropy.of(mean),
        max_entropy=Entropy.of(peak),
        token_entropy=Entropy(
            nats=float(entropy(token).mean()), normalised=float(normalised_entropy(token).mean())
        ),
        prefix_mass=float(last_cls.mean(dim=0)[: layout.num_prefix_tokens].sum()),
        box_mass=tuple(box_mass),
    )


def rollout_experiment(maps: AttentionMaps, layout: TokenLayout) -> RolloutResult:
    """Experiment 2 from one image's attention maps."""
    raw = _grid(maps.cls_attention[-1].mean(dim=0), layout)
    by_layer = _grid(maps.rollout_cls, layout)
    final = by_layer[-1]
    return RolloutResult(
        raw=raw,
        rollout=final,
        rollout_by_layer=by_layer,
        cls_by_layer=_grid(maps.cls_attention, layout),
        raw_entropy=Entropy.of(raw),
        rollout_entropy=Entropy.of(final),
        spearman=spearman(raw, final),
        top_overlap=top_fraction_overlap(raw, final, TOP_FRACTION),
    )


def objects_experiment(
    maps: AttentionMaps,
    layout: TokenLayout,
    geometry: Geometry,
    boxes: tuple[ObjectBox, ...],
    source: str,
    detector_unavailable: str | None = None,
) -> ObjectsResult:
    """Experiment 3: embeddings of the objects in ``boxes`` (original-image pixels).

    ``detector_unavailable`` is why the detector named by ``source`` could not be loaded, when the
    image had no boxes of its own and so has none.
    """
    patch_tokens = maps.tokens[layout.num_prefix_tokens :].double().numpy()  # [P, C]
    rollout_patches = _grid(maps.rollout_cls[-1], layout)
    labels = number_duplicates([b.label for b in boxes])
    objects, skipped = [], []
    for label, box in zip(labels, boxes):
        input_box, visible = geometry.map_box(box.as_tuple())
        if input_box is None:
            skipped.append((label, "outside the part of the image the model sees (cropped away)"))
            continue
        coverage = patch_coverage(input_box, layout.grid, layout.patch_size)
        objects.append(
            ObjectEmbedding(
                label=label,
                base_label=box.label,
                box=box.as_tuple(),
                input_box=input_box,
                visible=visible,
                score=box.score,
                plain=pooled_embedding(patch_tokens, coverage),
                rollout=pooled_embedding(patch_tokens, rollout_weights(coverage, rollout_patches)),
            )
        )
    k = len(objects)
    plain = cosine_similarity_matrix(np.stack([o.plain for o in objects])) if k else np.zeros((0, 0))
    rolled = cosine_similarity_matrix(np.stack([o.rollout for o in objects])) if k else np.zeros((0, 0))
    return ObjectsResult(
        source=source,
        objects=tuple(objects),
        skipped=tuple(skipped),
        plain_similarity=plain,
        rollout_similarity=rolled,
        detector_unavailable=detector_unavailable,
    )
