"""Attention maths: head fusion, rollout, entropy and agreement measures.

Pure functions on tensors / arrays: no hooks, no I/O, no plotting. Shapes follow timm's convention,
``B`` batch, ``H`` heads, ``N`` tokens (prefix tokens first, then the patch grid row by row), ``P``
patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from reportgen.methods import HEAD_FUSIONS, OUTLIER_RATIO, OUTLIER_SIGMAS


def fuse_heads(attn: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Fuse the head axis of an attention tensor.

    Args:
        attn: ``[..., H, N, N]`` attention probabilities.
        how: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Returns:
        ``[..., N, N]``.
    """
    if how == "mean":
        return attn.mean(dim=-3)
    if how == "max":
        return attn.amax(dim=-3)
    if how == "min":
        return attn.amin(dim=-3)
    raise ValueError(f"unknown head fusion {how!r} (expected one of {', '.join(HEAD_FUSIONS)})")


def discard_lowest(attn: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each ``[N, N]`` map, as vit-explain does before the residual step.

    The entry (0, 0) of each map (the CLS token's attention to itself; for a model without prefix
    tokens, the first patch's) is never discarded, matching vit-explain,
    so every row keeps some mass once the identity is added.

    Args:
        attn: ``[..., N, N]`` head-fused attention.
        ratio: fraction in ``[0, 1)`` of entries to zero per map (the settings'
            ``attention.discard_ratio`` rule guarantees it).
    """
    assert 0.0 <= ratio < 1.0, ratio
    if ratio == 0.0:
        return attn
    *lead, n, _ = attn.shape
    flat = attn.reshape(-1, n * n)
    count = int(flat.shape[-1] * ratio)
    if count == 0:
        return attn
    lowest = flat.topk(count, dim=-1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, lowest, True)
    drop[:, 0] = False
    flat = flat.masked_fill(drop, 0.0)
    return flat.reshape(*lead, n, n)


def residual_attention(fused: torch.Tensor) -> torch.Tensor:
    """Add the identity for the residual connection and renormalise rows (Abnar & Zuidema's
    ``0.5*A + 0.5*I`` then row normalisation).

    A row of ``fused`` summing to ``s`` becomes ``(A + I) / (1 + s)``: the identity gets
    ``1 / (1 + s)`` of it. That is half only when ``s = 1``; max fusion (``s >= 1``) gives the
    identity less, min fusion or a discard (``s <= 1``) more.

    Args:
        fused: ``[..., N, N]`` head-fused attention (rows need not sum to 1, e.g. after max fusion).
    """
    n = fused.shape[-1]
    eye = torch.eye(n, dtype=fused.dtype, device=fused.device)
    a = 0.5 * fused + 0.5 * eye
    # keepdim matters: the widely copied vit-explain code omits it and so does not normalise rows.
    return a / a.sum(dim=-1, keepdim=True)


def rollout_factor(layer_attn: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """One layer's factor of attention rollout: heads fused, the lowest ``discard_ratio`` dropped,
    the residual step (:func:`residual_attention`). ``[B, H, N, N]`` -> ``[B, N, N]``, rows sum to 1."""
    return residual_attention(discard_lowest(fuse_heads(layer_attn, head_fusion), discard_ratio))


def rollout_step(
    joint: torch.Tensor | None,
    layer_attn: torch.Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Advance attention rollout by one layer (Abnar & Zuidema 2020, ``compute_joint_attention``).

    Args:
        joint: ``[B, N, N]`` rollout through the previous layers, or None before the first layer.
        layer_attn: ``[B, H, N, N]`` this layer's attention probabilities.
        head_fusion: how heads are fused (see :func:`fuse_heads`).
        discard_ratio: fraction of lowest fused attentions dropped before the residual step.

    Returns:
        ``[B, N, N]`` rollout through this layer: ``A_l @ joint``; rows sum to 1.
    """
    a = rollout_factor(layer_attn, head_fusion, discard_ratio)
    return a if joint is None else a @ joint


def query_rows(factors: Sequence[torch.Tensor | None], query_row: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The query's row of the product ``F_l ⋯ F_2 F_1`` after every layer ``l``, from per-layer
    ``[B, N, N]`` factors in forward order (None: the identity).

    Row ``l`` is ``q F_l F_(l-1) ⋯ F_1``, so it is built from the left with vector-matrix products:
    ``L²/2`` of them cost ``O(L² N²)`` per image, where forming the products ``F_l ⋯ F_1`` as
    matrices costs ``O(L N³)`` (at 1370 tokens, some 200 times more).

    Args:
        factors: per layer ``[B, N, N]``, or None for a layer that counts as the identity.
        query_row: ``[..., N, N]`` -> ``[..., N]``, the query's row of a matrix
            (:meth:`~reportgen.methods.base.TokenLayout.query_row`); linear in the matrix.

    Returns:
        ``[B, L, N]``.
    """
    present = [f for f in factors if f is not None]
    assert present, "at least one layer must be a factor"
    identity_row = query_row(torch.eye(present[0].shape[-1], dtype=present[0].dtype, device=present[0].device))
    rows = []
    for last in range(len(factors)):
        row = None
        for factor in reversed(factors[: last + 1]):
            if factor is None:
                continue
            row = query_row(factor) if row is None else torch.einsum("bn,bnm->bm", row, factor)
        rows.append(identity_row.expand(present[0].shape[0], -1) if row is None else row)
    return torch.stack(rows, dim=1)


def rollout(
    attentions: list[torch.Tensor] | torch.Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 1,
) -> torch.Tensor:
    """Attention rollout through a whole stack of layers.

    Args:
        attentions: per layer ``[B, H, N, N]``, first layer first.
        start_layer: the first layer multiplied, 1-based; the layers before it count as the
            identity (Chefer et al. 2021 start their rollout at a chosen layer). 1: all layers.

    Returns:
        ``[B, N, N]``, rows sum to 1.
    """
    assert start_layer >= 1, start_layer
    joint = None
    for layer_attn in list(attentions)[start_layer - 1 :]:
        joint = rollout_step(joint, layer_attn, head_fusion, discard_ratio)
    if joint is None:
        raise ValueError(f"rollout needs at least one layer from layer {start_layer} on")
    return joint


def positive_gradient_attention(attn: torch.Tensor, grad: torch.Tensor, clamp_each_head: bool) -> torch.Tensor:
    """The head mean of ``grad * attn`` with its negative part removed.

    Chefer et al. (2021, Eq. 5) clamp each head's product at 0 before the mean
    (``clamp_each_head``); vit-explain's ``grad_rollout`` clamps the mean. They differ wherever
    heads disagree in sign.

    Args:
        attn: ``[..., H, N, N]`` attention probabilities.
        grad: ``[..., H, N, N]`` gradient of the target with respect to ``attn``.

    Returns:
        ``[..., N, N]``, non-negative.
    """
    product = grad * attn
    if clamp_each_head:
        return product.clamp_min(0).mean(dim=-3)
    return product.mean(dim=-3).clamp_min(0)


def relevance_factor(weighted: torch.Tensor) -> torch.Tensor:
    """One block's factor of Chefer et al.'s relevance for self-attention: ``R + Ā · R = (I + Ā) R``.

    Args:
        weighted: ``[B, N, N]`` this block's :func:`positive_gradient_attention` (``Ā``).

    Returns:
        ``[B, N, N]`` ``I + Ā``; with ``R = I`` before the first block, ``R`` after block ``l`` is
        the product of the factors of blocks ``l`` down to 1. Rows are not normalised.
    """
    eye = torch.eye(weighted.shape[-1], dtype=weighted.dtype, device=weighted.device)
    return weighted + eye


def grad_rollout_factor(weighted: torch.Tensor, discard_ratio: float = 0.0) -> torch.Tensor:
    """One layer's factor of gradient attention rollout: the gradient-weighted, head-fused attention
    (:func:`positive_gradient_attention`, mean clamped) with the lowest ``discard_ratio`` dropped,
    ``(a + I) / 2`` with rows renormalised; the rollout is the product of the factors in forward
    order (``joint = a_l · joint``).

    Args:
        weighted: ``[B, N, N]`` this layer's ``mean_h(A * grad(A))`` clamped at 0.
    """
    return residual_attention(discard_lowest(weighted, discard_ratio))


def gradcam(tokens: torch.Tensor, grad: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on a transformer block's tokens, over the patches.

    Channel ``c``'s weight is the mean over the patch tokens of the target's gradient in that
    channel (the tokens stand in for a CNN's spatial positions); the map is the ReLU of the
    weighted sum of the channels at each patch. Prefix tokens (CLS, distillation, registers) are
    no image position, so they enter neither the weights nor the map.

    Args:
        tokens: ``[..., N, C]`` a block's tokens.
        grad: ``[..., N, C]`` the gradient of the target with respect to ``tokens``.
        num_prefix_tokens: tokens before the patches.

    Returns:
        ``[..., P]`` over the patch tokens, non-negative.
    """
    patches = tokens[..., num_prefix_tokens:, :]
    weights = grad[..., num_prefix_tokens:, :].mean(dim=-2, keepdim=True)  # [..., 1, C]
    return (weights * patches).sum(dim=-1).clamp_min(0)


def normalise(weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Scale non-negative weights to sum to 1 along ``dim`` (all-zero rows stay zero)."""
    total = weights.sum(dim=dim, keepdim=True)
    positive = total > 0
    # Divide by the true total (however small); only all-zero rows are left as zeros.
    return torch.where(positive, weights / torch.where(positive, total, torch.ones_like(total)), torch.zeros_like(weights))


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats of distributions along ``dim`` (``0 log 0 = 0``).

    ``p`` is renormalised first, so a query's row restricted to the patches (which does not sum to 1
    once the prefix tokens are dropped) is treated as a distribution over the patch grid. Negative
    weights count as 0. A row with no positive weight is no distribution: its entropy is NaN, not
    0, which would read as all the mass on one outcome.
    """
    weights = p.clamp_min(0)
    q = normalise(weights, dim=dim)
    logs = torch.where(q > 0, q.log(), torch.zeros_like(q))
    h = -(q * logs).sum(dim=dim)
    defined = (weights > 0).any(dim=dim)
    return torch.where(defined, h, torch.full_like(h, math.nan))


def normalised_entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy divided by ``log(n)``: 0 for a one-hot distribution, 1 for a uniform one; NaN where
    :func:`entropy` is (no positive weight). With one outcome it is 0 (there is nothing to spread)."""
    return normalised(entropy(p, dim=dim), p.shape[dim])


def normalised(h: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`normalised_entropy` from the entropy ``h`` of distributions over ``n`` outcomes."""
    return h / math.log(n) if n > 1 else torch.where(torch.isnan(h), h, torch.zeros_like(h))


def content_values(grid: np.ndarray, content: np.ndarray) -> np.ndarray:
    """A map over the patches that hold image, each weighted by the fraction of it that is image.

    Args:
        grid: ``[rows, cols]`` map over the patch grid.
        content: ``[rows, cols]`` fraction of each patch covered by the image (0 for letterbox
            padding, 1 inside the image, in between on its border).

    Returns:
        ``[P']`` flat, the patches with any image only: the values every map statistic is taken over
        (``[..., P']`` for a stack of maps ``[..., rows, cols]``).
    """
    grid, content = np.asarray(grid, dtype=np.float64), np.asarray(content, dtype=np.float64)
    inside = content > 0
    return (grid * content)[..., inside]


def padding_share(grid: np.ndarray, content: np.ndarray) -> float | None:
    """Share of a non-negative map's mass on letterbox padding (the part of each patch that is not
    image); None for a map without mass."""
    grid, content = np.asarray(grid, dtype=np.float64), np.asarray(content, dtype=np.float64)
    total = float(grid.sum())
    return float((grid * (1.0 - content)).sum()) / total if total > 0 else None


#: The MAD of a normal distribution times this is its standard deviation.
MAD_TO_SIGMA = 1.4826


def norm_outlier_threshold(norms: np.ndarray, sigmas: float = OUTLIER_SIGMAS, ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """Per row (layer), the norm above which a token is a high-norm outlier: the larger of
    ``median + sigmas * 1.4826 * MAD`` and ``ratio * median`` of that row's values (MAD: the
    median absolute deviation).

    Median and MAD ignore the outliers themselves, unlike mean and standard deviation, which the
    few artefact tokens of Darcet et al. 2024 (norms several times the rest) would inflate.

    Args:
        norms: ``[L, P]`` token norms per layer.

    Returns:
        ``[L]`` thresholds.
    """
    norms = np.asarray(norms, dtype=np.float64)
    median = np.median(norms, axis=-1)
    mad = np.median(np.abs(norms - median[..., None]), axis=-1)
    return np.maximum(median + sigmas * MAD_TO_SIGMA * mad, ratio * median)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties given their average rank (as Spearman's rho needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    if not len(values):
        return ranks
    sorted_values = values[order]
    # A run of equal values at sorted positions i..j shares the rank (i + j) / 2 + 1 (NaN equals nothing).
    new = np.concatenate(([True], sorted_values[1:] != sorted_values[:-1]))
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(values)) - 1
    ranks[order] = ((starts + ends) / 2.0 + 1.0)[np.cumsum(new) - 1]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally long vectors (NaN if either is constant)."""
    ra, rb = rank(np.ravel(a)), rank(np.ravel(b))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def top_membership(values: np.ndarray, k: int) -> np.ndarray:
    """How much each entry belongs to the top ``k`` of ``values``, with ties shared.

    Entries above the ``k``-th largest value belong fully (1); the ``t`` entries equal to it share
    the ``m`` places left, ``m / t`` each; the rest 0. The memberships sum to ``k``, and each is the
    probability that the entry is in the top ``k`` when ties are broken uniformly at random.
    """
    values = np.ravel(values)
    kth = np.sort(values)[::-1][k - 1]
    above = values > kth
    tied = values == kth
    return np.where(above, 1.0, np.where(tied, (k - int(above.sum())) / int(tied.sum()), 0.0))


def top_fraction_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.1) -> float:
    """Share of the top ``fraction`` of entries of ``a`` that are also in the top of ``b``.

    ``k = ceil(fraction * n)`` entries on each side. Ties at the ``k``-th value are not broken by
    position (which would favour the first patches, the top-left, and make two flat maps agree
    perfectly): the result is the expected overlap when each map's ties are broken uniformly at
    random, ``sum(m_a * m_b) / k`` with the memberships of :func:`top_membership`. Without ties at
    the ``k``-th value it is the plain ``|top_a ∩ top_b| / k``; for two constant maps it is ``k / n``.
    """
    a, b = np.ravel(a), np.ravel(b)
    k = max(1, math.ceil(fraction * len(a)))
    return float((top_membership(a, k) * top_membership(b, k)).sum() / k)
