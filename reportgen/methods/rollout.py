"""``rollout``: attention rollout from the CLS token (Abnar & Zuidema 2020).

Heads fused (mean, max or min), optionally the lowest fraction of each layer discarded,
``0.5·A + 0.5·I`` for the residual with rows renormalised, multiplied layer by layer. The reducer
advances the rollout as each layer runs and keeps only its CLS row per layer.
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

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        rows = forward.kept["rollout"]["cls_by_layer"]  # [L, N]
        by_layer = layout.to_grid(rows)  # [L, rows, cols]
        discard = f", lowest {self.discard_ratio:g} of each layer discarded" if self.discard_ratio else ""
        return MethodMaps(
            maps={"rollout": by_layer[-1]},
            layers=by_layer[:, None],
            extras={},
            provenance=(
                f"attention rollout from the CLS token (Abnar & Zuidema 2020): heads fused by {self.head_fusion}"
                f"{discard}, 0.5·A + 0.5·I with rows renormalised, multiplied through all layers"
            ),
            prefix={"rollout": rows[-1, : layout.num_prefix_tokens].double().numpy()},
        )


def create(settings) -> RolloutMethod:
    """The method with the attention settings' head fusion and discard ratio."""
    return RolloutMethod(settings.head_fusion, settings.discard_ratio)
