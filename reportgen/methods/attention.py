"""``attention``: the query's attention in the last layer, per head, mean and max over heads.

The query is the CLS token, or for a model without one the mean of the patch queries (see
:attr:`~reportgen.methods.base.TokenLayout.query`). Its row of the full attention matrix is
restricted to the patches (prefix tokens dropped), not renormalised. The reducer also keeps the
last layer's token-to-token map, mean over heads, and for the patch explorer each patch's row over
the patches, mean over heads (``[P, P]`` per layer: every layer up to a
:data:`~reportgen.methods.PATCH_LAYERS_GRID` grid, beyond it the last layer only, so the pass keeps at most a few tens
of MB per image and never the per-head matrices).
"""

from __future__ import annotations

import numpy as np
import torch

from reportgen.methods import METHODS, patch_layers
from reportgen.methods.base import ATTENTION_ROWS, FULL_ATTENTION, ForwardPass, MethodMaps, TokenLayout

def provenance(layout: TokenLayout) -> str:
    """How the maps are made, naming the query."""
    return f"last-layer attention of {layout.query.name} to each patch, per head, and its mean and max over heads"


class _LastLayer:
    def __init__(self, depth: int, layout: TokenLayout):
        self.depth = depth
        self.prefix = layout.num_prefix_tokens
        self.first_patch_layer = depth - patch_layers(depth, layout.grid)
        self.last: torch.Tensor | None = None
        self.patches: list[torch.Tensor] = []

    def update(self, index: int, attn: torch.Tensor) -> None:
        if index >= self.first_patch_layer:
            # The mean over heads is a new [B, P, P] tensor: the layer's matrix is not kept alive.
            self.patches.append(attn[:, :, self.prefix :, self.prefix :].float().mean(dim=1).cpu())
        if index == self.depth - 1:
            self.last = attn.mean(dim=1).cpu()

    def kept(self) -> dict[str, torch.Tensor]:
        assert self.last is not None, "the last layer was not seen"
        return {"token_attention": self.last, "patch_attention": torch.stack(self.patches, dim=1)}  # [B, L', P, P]


class AttentionMethod:
    """Last-layer attention of the query (see the module docstring)."""

    spec = METHODS["attention"]
    needs = frozenset({ATTENTION_ROWS, FULL_ATTENTION})

    def reducer(self, depth: int, layout: TokenLayout) -> _LastLayer:
        return _LastLayer(depth, layout)

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        by_layer = layout.to_grid(forward.query_rows)  # [L, H, rows, cols]
        heads = by_layer[-1]
        mean = heads.mean(axis=0)
        last_prefix = forward.query_rows[-1, :, : layout.num_prefix_tokens].double().numpy()  # [H, P]
        return MethodMaps(
            maps={"attention/mean": mean, "attention/max": heads.max(axis=0)},
            # explorer: every head of every layer, then the mean over heads
            layers=np.concatenate([by_layer, by_layer.mean(axis=1, keepdims=True)], axis=1),
            extras={
                "heads": heads,
                "token_attention": forward.kept["attention"]["token_attention"].double().numpy(),
                # [L', P, P] float32 (kept small): row q is where patch q attends, mean over heads
                "patch_attention": forward.kept["attention"]["patch_attention"].numpy(),
            },
            provenance=provenance(layout),
            prefix={"attention/mean": last_prefix.mean(axis=0), "attention/max": last_prefix.max(axis=0)},
        )


def create(settings) -> AttentionMethod:
    """The method (it has no settings)."""
    return AttentionMethod()
