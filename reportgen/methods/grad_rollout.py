"""``grad-rollout``: gradient attention rollout, the method of vit-explain's ``grad_rollout``.

Per layer, the mean over heads of ``A ⊙ ∂target/∂A`` clamped at 0, the lowest ``discard_ratio``
of it dropped (the attention settings' ratio; never the CLS-to-CLS entry), ``(a + I) / 2`` with
rows renormalised, multiplied through every layer in forward order (``joint = a_l · joint``). The
map is the query's row over the patches. Unlike vit-explain's code, the gradients are paired with
their own layer (it zips them in reverse order) and rows are normalised with ``keepdim`` (its
``a.sum(-1)`` broadcasts over the wrong axis).
"""

from __future__ import annotations

from functools import partial

from reportgen.methods import METHODS
from reportgen.methods.base import GRADIENTS, TARGET, ForwardPass, MethodMaps, TokenLayout
from reportgen.methods.maths import grad_rollout_step
from reportgen.methods.relevance import WeightedLayers, query_maps


class GradRolloutMethod:
    """Gradient attention rollout (see the module docstring).

    Args:
        discard_ratio: fraction of each layer's lowest entries dropped, in ``[0, 1)``.
    """

    spec = METHODS["grad-rollout"]
    needs = frozenset({GRADIENTS, TARGET})

    def __init__(self, discard_ratio: float = 0.0):
        self.discard_ratio = discard_ratio

    def reducer(self, depth: int, layout: TokenLayout) -> WeightedLayers:
        step = partial(grad_rollout_step, discard_ratio=self.discard_ratio)
        return WeightedLayers(depth, layout, clamp_each_head=False, step=step)

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        assert forward.target is not None, "grad-rollout needs a target"
        discard = f", lowest {self.discard_ratio:g} of each layer discarded" if self.discard_ratio else ""
        provenance = (
            f"gradient attention rollout of the map's target, row of {layout.query.name}: "
            f"per layer the head mean of (A ⊙ ∂target/∂A) clamped at 0{discard}, (a + I)/2 with rows "
            "renormalised, multiplied through all layers"
        )
        return query_maps("grad-rollout", forward, layout, provenance)


def create(settings) -> GradRolloutMethod:
    """The method with the attention settings' discard ratio."""
    return GradRolloutMethod(settings.discard_ratio)
