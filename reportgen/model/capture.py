"""Capturing attention probabilities from a timm Vision Transformer.

timm's ``Attention`` decides at construction whether to use fused attention
(``F.scaled_dot_product_attention``), and the fused path never materialises the attention matrix,
so hooks on ``attn_drop`` see nothing. Instead we hook each block's ``qkv`` projection, whose output
the block computes either way, and form ``softmax(q_norm(q) k_norm(k)^T * scale)`` from it with the
block's own head layout, norms and scale. This works on any loaded model object, fused or not,
and changes no global setting (timm's fused-attention switch is left alone).

Hooks live only inside :class:`AttentionCapture` and are removed on exit, also when an error is
raised. A forward pass that misses any layer is an error, never a partial result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import Attention

from reportgen.errors import CaptureError

LayerCallback = Callable[[int, torch.Tensor], None]

METHOD = (
    "forward hook on each block's qkv projection; attention recomputed as "
    "softmax(q_norm(q) · k_norm(k)ᵀ · scale) with the block's own heads, norms and scale"
)


@dataclass(frozen=True)
class CaptureInfo:
    """How attention was obtained, for the report.

    Attributes:
        method: the capture path, in words.
        layers: names of the attention modules captured, first layer first.
        fused_attention: how many of those modules run timm's fused attention.
    """

    method: str
    layers: tuple[str, ...]
    fused_attention: int


def attention_modules(model: torch.nn.Module) -> list[tuple[str, Attention]]:
    """The model's self-attention modules in forward order.

    Raises:
        CaptureError: if the model has none we know how to read, or has attention modules of a
            kind whose maths differs from plain ``softmax(qk^T)`` (rotary, masked, ...).
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    if not found:
        others = sorted({type(m).__name__ for _, m in model.named_modules() if "attention" in type(m).__name__.lower()})
        detail = f" (it has {', '.join(others)}, which reportgen cannot read)" if others else ""
        raise CaptureError(
            f"{type(model).__name__} has no timm Attention modules{detail}; "
            "reportgen reads attention from timm Vision Transformers with standard multi-head attention."
        )
    return found


def blocks_of(model: torch.nn.Module, attention_names: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of the block holding each attention module (``blocks.3`` for
    ``blocks.3.attn``), first layer first."""
    parents = [name.rpartition(".")[0] for name in attention_names]
    return [(parent, model.get_submodule(parent)) for parent in parents]


def some_names(names: list[str]) -> str:
    """The first five ``names`` for a message, then "..." if there are more."""
    return f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"


class Hooks:
    """Context manager owning a set of module hooks: :meth:`_install` adds them on entry, and they
    are all removed on exit, and at once if installing one of them fails."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _install(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class AttentionCapture(Hooks):
    """Context manager handing every layer's attention probabilities to a callback.

    Example::

        with AttentionCapture(model, on_layer) as capture:
            capture.begin()
            model.forward_features(x)
            capture.check_complete()

    Args:
        model: a timm ViT (any loaded object; fused attention on or off).
        on_layer: called as ``on_layer(layer_index, attn)`` with ``attn`` float32
            ``[B, H, N, N]``, rows summing to 1, during the forward pass.
    """

    def __init__(self, model: torch.nn.Module, on_layer: LayerCallback):
        super().__init__()
        self._modules = attention_modules(model)
        self._on_layer = on_layer
        self._seen: set[int] = set()
        self.info = CaptureInfo(
            method=METHOD,
            layers=tuple(name for name, _ in self._modules),
            fused_attention=sum(bool(getattr(m, "fused_attn", False)) for _, m in self._modules),
        )

    def _install(self) -> None:
        for index, (name, module) in enumerate(self._modules):
            self._handles.append(module.register_forward_pre_hook(self._reject_masks(name), with_kwargs=True))
            self._handles.append(module.qkv.register_forward_hook(self._from_qkv(index, module)))

    def begin(self) -> None:
        """Start a new forward pass: forget which layers were seen."""
        self._seen.clear()

    def check_complete(self) -> None:
        """Raise :class:`CaptureError` unless every layer was captured since :meth:`begin`."""
        missing = [name for i, (name, _) in enumerate(self._modules) if i not in self._seen]
        if missing:
            raise CaptureError(
                f"attention was not captured from {len(missing)} of {len(self._modules)} layers "
                f"({some_names(missing)}); refusing to draw from partial data"
            )

    @staticmethod
    def _reject_masks(name: str):
        def hook(module, args, kwargs):
            mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
            if mask is not None or kwargs.get("is_causal", False):
                raise CaptureError(f"{name} was called with an attention mask, which reportgen does not model")

        return hook

    def _from_qkv(self, index: int, module: Attention):
        def hook(_linear, _inputs, qkv: torch.Tensor):
            qkv = qkv.detach()  # in a gradient pass, the copy the methods read stays off the graph
            B, N, _ = qkv.shape
            q, k, _v = qkv.reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = module.q_norm(q), module.k_norm(k)
            scores = (q.float() * module.scale) @ k.float().transpose(-2, -1)
            self._on_layer(index, scores.softmax(dim=-1))
            self._seen.add(index)

        return hook
