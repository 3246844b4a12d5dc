"""Attention on the autograd graph: each layer's attention probabilities and their gradients.

timm's fused attention never materialises the attention matrix ``A``, and the capture in
:mod:`reportgen.model.capture` recomputes ``A`` from ``qkv`` outside the graph, so its gradient
would be zero. For a gradient pass, :class:`AttentionGradients` switches each attention module's
own ``fused_attn`` off (per instance; timm's global switch is left alone), so the module computes
its softmax itself (with its family's rotary embedding or position bias) and hands it to
``attn_drop``. A forward hook on ``attn_drop`` sees
``A`` as its input, inside the graph, and registers a tensor hook on it that passes ``A`` and its
gradient to a callback as the backward pass reaches that layer (last layer first); nothing per
layer outlives the callback unless the callback keeps it.

:class:`BlockGradients` does the same for the tokens each block's attention reads (the input
of its attention module, which in a pre-norm block is the output of ``norm1``), for methods that
weight tokens rather than attention; it leaves fused attention alone.

Hooks live only inside the context managers; on exit, also when an error is raised, they are
removed and every module's ``fused_attn`` is set back to what it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reportgen.errors import CaptureError
from reportgen.model.capture import Hooks, attention_modules, some_names

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
        self._attn: list[torch.Tensor | None] = [None] * len(self._modules)

    def _install(self) -> None:
        for index, (name, module) in enumerate(self._modules):
            if not isinstance(getattr(module, "attn_drop", None), torch.nn.Module):
                raise CaptureError(f"{name} has no attn_drop module, so its attention cannot be read on the graph")
            self._unfuse(module)
            self._handles.append(module.attn_drop.register_forward_hook(self._on_attention(index)))

    def _remove(self) -> None:
        super()._remove()
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
                f"({some_names(missing)}); refusing to draw from partial data"
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


class BlockGradients(Hooks):
    """Context manager exposing the tokens each block's attention reads, and their gradient.

    The tokens are the input of the block's attention module: in a pre-norm block (ViT, EVA,
    BEiT) the output of its ``norm1``, which is where pytorch-grad-cam's ViT tutorial takes them
    for the last block; in a post-norm block the block's input itself. A block's own output would
    not do for the last block of a model that reads its prediction from the class token: nothing
    after it mixes tokens, so the gradient on every patch token there is exactly zero. A forward
    pre-hook on each attention module registers a tensor hook on its input, which passes the
    tokens and their gradient to a callback as the backward pass reaches that block (last block
    first). Use as :class:`AttentionGradients`; :meth:`first` is the first block's tokens.

    Args:
        model: a timm ViT.
        attention_names: the qualified names of its attention modules, first layer first (their
            parents are the blocks).
        on_gradient: called as ``on_gradient(block_index, tokens, grad)`` with both ``[B, N, C]``
            and detached, once per block during the backward pass.
    """

    def __init__(self, model: torch.nn.Module, attention_names: tuple[str, ...], on_gradient: GradientCallback):
        super().__init__()
        self._names = [name.rpartition(".")[0] or "the block" for name in attention_names]
        self._attention = [model.get_submodule(name) for name in attention_names]
        self._on_gradient = on_gradient
        self._tokens: list[torch.Tensor | None] = [None] * len(self._attention)

    def _install(self) -> None:
        for index, module in enumerate(self._attention):
            self._handles.append(module.register_forward_pre_hook(self._on_input(index), with_kwargs=True))

    def _remove(self) -> None:
        super()._remove()
        self._tokens = [None] * len(self._attention)

    def begin(self) -> None:
        """Start a new pass: forget the previous one's tokens."""
        self._tokens = [None] * len(self._attention)

    def check_complete(self) -> None:
        """Raise :class:`CaptureError` unless every block's tokens are on the autograd graph."""
        missing = [name for name, tokens in zip(self._names, self._tokens) if tokens is None]
        if missing:
            raise CaptureError(
                f"the tokens of {len(missing)} of {len(self._attention)} blocks were not [batch, tokens, channels] "
                f"on the autograd graph ({some_names(missing)}); "
                "refusing to draw from partial data"
            )

    def first(self) -> torch.Tensor:
        """The first block's tokens: a backward pass down to them reaches every block's."""
        assert self._tokens[0] is not None, "no forward pass since begin()"
        return self._tokens[0]

    def _on_input(self, index: int):
        def pre_hook(_attention, args, kwargs):
            tokens = args[0] if args else kwargs.get("x")
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or not tokens.requires_grad:
                return  # check_complete reports the block
            self._tokens[index] = tokens

            # Through the list, not a closure over the tokens: emptying it on exit frees them.
            def on_grad(grad: torch.Tensor) -> None:
                self._on_gradient(index, self._tokens[index].detach(), grad.detach())

            tokens.register_hook(on_grad)

        return pre_hook
