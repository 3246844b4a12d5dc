"""``rollout``: attention rollout from the query (Abnar & Zuidema 2020).

Heads fused (mean, max or min), optionally the lowest fraction of each layer discarded,
``0.5·A + 0.5·I`` for the residual with rows renormalised, multiplied layer by layer from the
start layer on (the layers before it count as the identity, as Chefer et al. 2021 start theirs).
The reducer advances the rollout as each layer runs and keeps only the query's row per layer (the
CLS token's, or the mean of the patch queries' rows: see
:attr:`~reportgen.methods.base.TokenLayout.query`).
"""

from __future__ import annotations

import torch

from reportgen.methods import METHODS
from reportgen.methods.base import FULL_ATTENTION, ForwardPass, MethodMaps, TokenLayout
from reportgen.methods.maths import rollout_step


class _Rollout:
    def __init__(self, depth: int, layout: TokenLayout, head_fusion: str, discard_ratio: float, start_layer: int):
        # The runner's caller checks the setting against the model with a message for the user.
        assert 1 <= start_layer <= depth, (start_layer, depth)
        self.layout = layout
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.start = start_layer - 1  # 0-based index of the first layer multiplied
        self.rows: list[torch.Tensor | None] = [None] * depth
        self._joint: torch.Tensor | None = None

    def update(self, index: int, attn: torch.Tensor) -> None:
        if index < self.start:
            # The rollout is still the identity: its query row, without an N x N matrix.
            eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
            self.rows[index] = self.layout.query_row(eye).expand(attn.shape[0], -1).cpu()
            return
        self._joint = rollout_step(self._joint, attn, self.head_fusion, self.discard_ratio)
        # query_row copies: a view would keep the whole [B, N, N] product alive.
        self.rows[index] = self.layout.query_row(self._joint).cpu()

    def kept(self) -> dict[str, torch.Tensor]:
        return {"query_by_layer": torch.stack(self.rows, dim=1)}  # [B, L, N]


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

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        by_layer = layout.to_grid(forward.kept["rollout"]["query_by_layer"])  # [L, rows, cols]
        depth = by_layer.shape[0]
        discard = f", lowest {self.discard_ratio:g} of each layer discarded" if self.discard_ratio else ""
        layers = (
            "all layers" if self.start_layer == 1
            else f"layers {self.start_layer} to {depth} (start layer {self.start_layer}, the layers before it the identity)"
        )
        return MethodMaps(
            maps={"rollout": by_layer[-1]},
            layers=by_layer[:, None],
            extras={},
            provenance=(
                f"attention rollout from {layout.query.name} (Abnar & Zuidema 2020): heads fused by {self.head_fusion}"
                f"{discard}, 0.5·A + 0.5·I with rows renormalised, multiplied through {layers}"
            ),
        )


def create(settings) -> RolloutMethod:
    """The method with the attention settings' head fusion, discard ratio and start layer."""
    return RolloutMethod(settings.head_fusion, settings.discard_ratio, settings.rollout_start_layer)
