"""``rollout``: attention rollout from the query (Abnar & Zuidema 2020).

Heads fused (mean, max or min), optionally the lowest fraction of each layer discarded, the
identity added for the residual and rows renormalised, ``(A + I) / (1 + s)`` with ``s`` the fused
row's sum, multiplied layer by layer from the start layer on (the layers before it count as the
identity, as Chefer et al. 2021 start theirs). That is ``0.5·A + 0.5·I`` only when the fused rows
sum to 1 (mean fusion, nothing discarded); the provenance says which it is. The reducer keeps each
layer's ``[B, N, N]`` factor as the layer runs (not its per-head matrices) and, after the pass, the
query's row of the rollout after each layer (the CLS token's, or the mean of the patch queries'
rows: see :attr:`~reportgen.methods.base.TokenLayout.query`), built from the left with
vector-matrix products (:func:`~reportgen.methods.maths.query_rows`): the N x N x N products of
the rollout matrices themselves are never formed.
"""

from __future__ import annotations

import torch

from reportgen.methods import METHODS
from reportgen.methods.base import FULL_ATTENTION, ForwardPass, MethodMaps, TokenLayout
from reportgen.methods.maths import query_rows, rollout_factor


class _Rollout:
    def __init__(self, depth: int, layout: TokenLayout, head_fusion: str, discard_ratio: float, start_layer: int):
        # The runner's caller checks the setting against the model with a message for the user.
        assert 1 <= start_layer <= depth, (start_layer, depth)
        self.layout = layout
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.start = start_layer - 1  # 0-based index of the first layer multiplied
        # The layers before the start count as the identity (None).
        self.factors: list[torch.Tensor | None] = [None] * depth

    def update(self, index: int, attn: torch.Tensor) -> None:
        if index >= self.start:
            self.factors[index] = rollout_factor(attn, self.head_fusion, self.discard_ratio)

    def kept(self) -> dict[str, torch.Tensor]:
        rows = query_rows(self.factors, self.layout.query_row).cpu()  # [B, L, N]
        self.factors = [None] * len(self.factors)  # the factors are not needed past the batch
        return {"query_by_layer": rows}


class RolloutMethod:
    """Attention rollout (see the module docstring).

    Args:
        head_fusion: ``mean``, ``max`` or ``min`` over heads.
        discard_ratio: fraction of each fused layer's lowest entries dropped, in ``[0, 1)``.
        start_layer: the first layer multiplied (1-based; 1 = all layers), at most the model's depth.
    """

    spec = METHODS["rollout"]
    needs = frozenset({FULL_ATTENTION})

    def __init__(self, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 1):
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.start_layer = start_layer

    def reducer(self, depth: int, layout: TokenLayout) -> _Rollout:
        return _Rollout(depth, layout, self.head_fusion, self.discard_ratio, self.start_layer)

    def provenance(self, query: str, depth: int) -> str:
        """What the map is (from ``query``, through ``depth`` layers), saying how much of each row
        the residual step gives the identity."""
        discard = f", lowest {self.discard_ratio:g} of each layer discarded" if self.discard_ratio else ""
        layers = (
            "all layers" if self.start_layer == 1
            else f"layers {self.start_layer} to {depth} (start layer {self.start_layer}, the layers before it the identity)"
        )
        return (
            f"attention rollout from {query} (Abnar & Zuidema 2020): heads fused by {self.head_fusion}"
            f"{discard}, {residual_wording(self.head_fusion, self.discard_ratio)}, multiplied through {layers}"
        )

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        rows = forward.kept["rollout"]["query_by_layer"]  # [L, N]
        by_layer = layout.to_grid(rows)  # [L, rows, cols]
        return MethodMaps(
            maps={"rollout": by_layer[-1]},
            layers=by_layer[:, None],
            extras={},
            provenance=self.provenance(layout.query.name, by_layer.shape[0]),
            prefix={"rollout": rows[-1, : layout.num_prefix_tokens].double().numpy()},
        )


def residual_wording(head_fusion: str, discard_ratio: float) -> str:
    """The residual step (:func:`~reportgen.methods.maths.residual_attention`) in words.

    A fused row summing to ``s`` becomes ``(A + I) / (1 + s)``: attention ``s / (1 + s)`` of the
    row, identity ``1 / (1 + s)``. Half and half only when ``s = 1``: the mean of the heads' rows
    (each sums to 1) with nothing discarded. The max over heads sums to at least 1 and the min to
    at most 1, and discarding only lowers ``s``.
    """
    if head_fusion == "mean" and not discard_ratio:
        return "0.5·A + 0.5·I (the fused rows sum to 1: half attention, half identity)"
    if head_fusion == "max" and not discard_ratio:
        share = "≥ 1 for max: attention gets s/(1 + s) ≥ half of each row, the identity the rest"
    elif head_fusion == "max":
        share = "attention gets s/(1 + s) of each row, the identity 1/(1 + s), s above or below 1 after the discard"
    else:
        share = f"≤ 1 {'for min' if head_fusion == 'min' else 'after the discard'}: the identity gets 1/(1 + s) ≥ half of each row"
    return f"(A + I)/(1 + s) per row, s being the fused row's sum ({share})"


def create(settings) -> RolloutMethod:
    """The method with the attention settings' head fusion, discard ratio and start layer."""
    return RolloutMethod(settings.head_fusion, settings.discard_ratio, settings.rollout_start_layer)
