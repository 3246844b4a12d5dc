"""``gradcam``: Grad-CAM (Selvaraju et al., ICCV 2017, "Grad-CAM: Visual Explanations from Deep
Networks via Gradient-based Localization") on a Vision Transformer's tokens.

As pytorch-grad-cam's ViT tutorial applies it, the patch tokens play the part of a CNN's
feature-map positions: with ``T`` the ``[N, C]`` tokens a block's attention reads (the output of
its ``norm1``, the tutorial's target layer ``blocks[-1].norm1``) and ``G = ∂target/∂T``,
channel ``c``'s weight is the mean of ``G`` over the patch tokens and the map is
``ReLU(Σ_c w_c T[:, c])`` over the patches. Unlike the tutorial, every prefix token (CLS,
distillation, registers) is dropped from both, and the grid is the model's own. The map is the
last block's; the explorer shows Grad-CAM at every block.

Not the last block's output: for a model that reads its prediction from the class token nothing
after that output mixes tokens, so the target's gradient on every patch token there is exactly
zero and the map would be empty.
"""

from __future__ import annotations

import torch

from reportgen.methods import METHODS
from reportgen.methods.base import TARGET, TOKEN_GRADIENTS, ForwardPass, MethodMaps, TokenLayout
from reportgen.methods.maths import gradcam


class BlockMaps:
    """Keeps each block's Grad-CAM over the patches, ``[B, P]``, as its gradient arrives."""

    def __init__(self, depth: int, layout: TokenLayout):
        self.layout = layout
        self.maps: list[torch.Tensor | None] = [None] * depth

    def update(self, index: int, tokens: torch.Tensor, grad: torch.Tensor) -> None:
        dtype = torch.promote_types(tokens.dtype, torch.float32)  # at least float32, float64 kept
        self.maps[index] = gradcam(tokens.to(dtype), grad.to(dtype), self.layout.num_prefix_tokens).cpu()

    def kept(self) -> dict[str, torch.Tensor]:
        assert all(m is not None for m in self.maps), "a block's gradient was not seen"
        return {"by_layer": torch.stack(self.maps, dim=1)}  # [B, L, P]


class GradCamMethod:
    """Grad-CAM on each block's normalised input tokens (see the module docstring)."""

    spec = METHODS["gradcam"]
    needs = frozenset({TOKEN_GRADIENTS, TARGET})

    def reducer(self, depth: int, layout: TokenLayout) -> BlockMaps:
        return BlockMaps(depth, layout)

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        assert forward.target is not None, "gradcam needs a target"
        by_layer = forward.kept["gradcam"]["by_layer"]  # [L, P]
        grid = by_layer.reshape(by_layer.shape[0], *layout.grid).double().numpy()
        count = layout.num_prefix_tokens
        left_out = f", the {count} prefix token{'s' if count > 1 else ''} left out" if count else ""
        provenance = (
            f"Grad-CAM (Selvaraju et al. 2017) of the map's target on the tokens T the last "
            "block's attention reads (the input of its attention module): channel weights the mean over the patch tokens of ∂target/∂T, map ReLU(Σ_c w_c T_c) "
            f"per patch{left_out}"
        )
        return MethodMaps(
            maps={"gradcam": grid[-1]}, layers=grid[:, None], extras={}, provenance=provenance, target=forward.target
        )


def create(settings) -> GradCamMethod:
    """The method (it has no settings)."""
    return GradCamMethod()
