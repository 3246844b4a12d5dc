"""Attention on the autograd graph: each layer's attention probabilities and their gradients.

timm's fused attention never materialises the attention matrix ``A``, and the capture in
:mod:`reportgen.model.capture` recomputes ``A`` from ``qkv`` outside the graph, so its gradient
would be zero. For a gradient pass, :class:`AttentionGradients` switches each attention module's
own ``fused_attn`` off (per instance; timm's global switch is left alone), so the module computes
``softmax(q kᵀ · scale)`` itself and hands it to ``attn_drop``. A forward hook on ``attn_drop`` sees
``A`` as its input, inside the graph, and registers a tensor hook on it that passes ``A`` and its
gradient to a callback as the backward pass reaches that layer (last layer first); nothing per
layer outlives the callback unless the callback keeps it.

Hooks live only inside the context manager; on exit, also when an error is raised, they are
removed and every module's ``fused_attn`` is set back to what it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reportgen.errors import CaptureError
from reportgen.model.capture import Hooks, attention_modules

GradientCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class AttentionGradients(Hooks):
    """Context manager exposing every layer's attention and its gradient.

    Example::

        with AttentionGradients(model, on_gradient) as layers, torch.enable_grad():
            layers.begin()
            target = score(model, x)             # [B]
            layers.check_complete()
            torch.autograd.grad(target.sum(), layers.first())

    Args:
        model: a timm ViT.
        on_gradient: called as ``on_gradient(layer_index, attn, grad)`` with both ``[B, H, N, N]``
            and detached, once per layer during the backward pass, last layer first.
    """

    def __init__(self, model: torch.nn.Module, on_gradient: GradientCallback):
        super().__init__()
        self._modules = attention_modules(model)
        self._on_gradient = on_gradient
        self._fused: list[tuple[torch.nn.Module, object]] = []
        self._attn: list[torch.Tensor | None] = [None] * len(self._modules)

    def _install(self) -> None:
        for index, (name, module) in enumerate(self._modules):
            if not isinstance(getattr(module, "attn_drop", None), torch.nn.Module):
                raise CaptureError(f"{name} has no attn_drop module, so its attention cannot be read on the graph")
            self._fused.append((module, module.__dict__.get("fused_attn", _ABSENT)))
            module.fused_attn = False
            self._handles.append(module.attn_drop.register_forward_hook(self._on_attention(index)))

    def _remove(self) -> None:
        super()._remove()
        for module, value in reversed(self._fused):
            if value is _ABSENT:
                del module.fused_attn
            else:
                module.fused_attn = value
        self._fused.clear()
        self._attn = [None] * len(self._modules)

    def begin(self) -> None:
        """Start a new pass: forget the previous one's attention."""
        self._attn = [None] * len(self._modules)

    def check_complete(self) -> None:
        """Raise :class:`CaptureError` unless every layer's attention is on the graph."""
        missing = [name for (name, _), attn in zip(self._modules, self._attn) if attn is None]
        if missing:
            raise CaptureError(
                f"attention was not on the autograd graph in {len(missing)} of {len(self._modules)} layers "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); refusing to draw from partial data"
            )

    def first(self) -> torch.Tensor:
        """The first layer's attention: a backward pass down to it reaches every layer's."""
        assert self._attn[0] is not None, "no forward pass since begin()"
        return self._attn[0]

    def _on_attention(self, index: int):
        def forward_hook(_drop, inputs, _output):
            attn = inputs[0]
            if not attn.requires_grad:
                return  # check_complete reports the layer
            self._attn[index] = attn

            # Through the list, not a closure over attn: emptying it on exit frees the matrix.
            def on_grad(grad: torch.Tensor) -> None:
                self._on_gradient(index, self._attn[index].detach(), grad.detach())

            attn.register_hook(on_grad)

        return forward_hook


_ABSENT = object()  # a module whose fused_attn came from its class, not the instance
