"""``rollout``: attention rollout from the CLS token (Abnar & Zuidema 2020).

Heads fused (mean, max or min), optionally the lowest fraction of each layer discarded, the
identity added for the residual and rows renormalised, ``(A + I) / (1 + s)`` with ``s`` the fused
row's sum, multiplied layer by layer. That is ``0.5·A + 0.5·I`` only when the fused rows sum to 1
(mean fusion, nothing discarded); the provenance says which it is. The reducer advances the rollout
as each layer runs and keeps only its CLS row per layer.
"""

from __future__ import annotations

import torch

from reportgen.methods import METHODS
from reportgen.methods.base import FULL_ATTENTION, ForwardPass, MethodMaps, TokenLayout
from reportgen.methods.maths import rollout_step


class _Rollout:
    def __init__(self, depth: int, head_fusion: str, discard_ratio: float):
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.rows: list[torch.Tensor | None] = [None] * depth
        self._joint: torch.Tensor | None = None

    def update(self, index: int, attn: torch.Tensor) -> None:
        self._joint = rollout_step(self._joint, attn, self.head_fusion, self.discard_ratio)
        # A copy, not a view: a view would keep the whole [B, N, N] product alive.
        self.rows[index] = self._joint[:, 0, :].to("cpu", copy=True)

    def kept(self) -> dict[str, torch.Tensor]:
        return {"cls_by_layer": torch.stack(self.rows, dim=1)}  # [B, L, N]


class RolloutMethod:
    """Attention rollout (see the module docstring).

    Args:
        head_fusion: ``mean``, ``max`` or ``min`` over heads.
        discard_ratio: fraction of each fused layer's lowest entries dropped, in ``[0, 1)``.
    """

    spec = METHODS["rollout"]
    needs = frozenset({FULL_ATTENTION})

    def __init__(self, head_fusion: str = "mean", discard_ratio: float = 0.0):
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio

    def reducer(self, depth: int) -> _Rollout:
        return _Rollout(depth, self.head_fusion, self.discard_ratio)

    @property
    def provenance(self) -> str:
        """What the map is, saying how much of each row the residual step gives the identity."""
        discard = f", lowest {self.discard_ratio:g} of each layer discarded" if self.discard_ratio else ""
        return (
            f"attention rollout from the CLS token (Abnar & Zuidema 2020): heads fused by {self.head_fusion}"
            f"{discard}, {residual_wording(self.head_fusion, self.discard_ratio)}, multiplied through all layers"
        )

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        by_layer = layout.to_grid(forward.kept["rollout"]["cls_by_layer"])  # [L, rows, cols]
        return MethodMaps(
            maps={"rollout": by_layer[-1]},
            layers=by_layer[:, None],
            extras={},
            provenance=self.provenance,
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
    """The method with the attention settings' head fusion and discard ratio."""
    return RolloutMethod(settings.head_fusion, settings.discard_ratio)
