"""``relevance``: generic attention relevance (Chefer, Gur & Wolf, ICCV 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers").

For self-attention: ``R = I``; for each block in forward order, ``Ā`` is the mean over heads of
``(∂target/∂A ⊙ A)`` with each head's product clamped at 0, and ``R = R + Ā · R``. The map is the
query's row of ``R`` over the patches (the CLS token's, or the mean of the patch queries' rows for
a model without one), not row-normalised. The target is the image's :class:`~reportgen.methods.base.Target`:
the top-1 class's logit, or for a headless model the label-free one.

The reducer keeps one ``[B, N, N]`` ``Ā`` per layer as the gradients arrive (last layer first) and
multiplies them in forward order at the end; the explorer shows the query's row of ``R`` after
each block.
"""

from __future__ import annotations

import torch

from reportgen.methods import METHODS
from reportgen.methods.base import GRADIENTS, TARGET, ForwardPass, MethodMaps, TokenLayout
from reportgen.methods.maths import positive_gradient_attention, relevance_step


class WeightedLayers:
    """Keeps each layer's gradient-weighted attention and folds the layers in forward order.

    Args:
        depth: layers.
        layout: whose row to keep.
        clamp_each_head: see :func:`~reportgen.methods.maths.positive_gradient_attention`.
        step: ``step(joint or None, weighted) -> joint``, one layer in forward order.
    """

    def __init__(self, depth: int, layout: TokenLayout, clamp_each_head: bool, step):
        self.layout = layout
        self.clamp_each_head = clamp_each_head
        self.step = step
        self.weighted: list[torch.Tensor | None] = [None] * depth

    def update(self, index: int, attn: torch.Tensor, grad: torch.Tensor) -> None:
        dtype = torch.promote_types(attn.dtype, torch.float32)  # at least float32, float64 kept
        self.weighted[index] = positive_gradient_attention(attn.to(dtype), grad.to(dtype), self.clamp_each_head).cpu()

    def kept(self) -> dict[str, torch.Tensor]:
        assert all(w is not None for w in self.weighted), "a layer's gradient was not seen"
        joint, rows = None, []
        for weighted in self.weighted:
            joint = self.step(joint, weighted)
            rows.append(self.layout.query_row(joint))
        return {"query_by_layer": torch.stack(rows, dim=1)}  # [B, L, N]


def query_maps(name: str, forward: ForwardPass, layout: TokenLayout, provenance: str, prefix: bool = True) -> MethodMaps:
    """The maps of a method whose reducer kept ``query_by_layer`` ([L, N] per image); with
    ``prefix``, the row's values on the prefix tokens too (when the row is a distribution)."""
    rows = forward.kept[name]["query_by_layer"]
    by_layer = layout.to_grid(rows)  # [L, rows, cols]
    return MethodMaps(
        maps={name: by_layer[-1]},
        layers=by_layer[:, None],
        extras={},
        provenance=provenance,
        prefix={name: rows[-1, : layout.num_prefix_tokens].double().numpy()} if prefix else {},
        target=forward.target,
    )


class RelevanceMethod:
    """Generic attention relevance (see the module docstring)."""

    spec = METHODS["relevance"]
    needs = frozenset({GRADIENTS, TARGET})

    def reducer(self, depth: int, layout: TokenLayout) -> WeightedLayers:
        return WeightedLayers(depth, layout, clamp_each_head=True, step=relevance_step)

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        assert forward.target is not None, "relevance needs a target"
        provenance = (
            f"generic attention relevance (Chefer, Gur & Wolf 2021) of the map's target, "
            f"row of {layout.query.name}: R = I, then R + Ā·R per block in forward order, Ā the head mean "
            "of (∂target/∂A ⊙ A) clamped at 0 per head; not row-normalised"
        )
        # R starts as the identity, so the query's own entry holds that 1, not relevance: no
        # share on the prefix tokens is given.
        return query_maps("relevance", forward, layout, provenance, prefix=False)


def create(settings) -> RelevanceMethod:
    """The method (it has no settings)."""
    return RelevanceMethod()
