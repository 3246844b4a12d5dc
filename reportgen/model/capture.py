"""Capturing attention probabilities from a timm Vision Transformer.

timm's attention modules decide at construction whether to use fused attention
(``F.scaled_dot_product_attention``), and the fused path never materialises the attention matrix,
so hooks on ``attn_drop`` see nothing. Each family is read the cheapest way that reproduces its
own maths exactly:

- Plain multi-head attention (timm's ``Attention``: ViT, DeiT, DeiT-III, DINOv2, CLIP and SigLIP
  image towers): we hook the ``qkv`` projection, whose output the module computes either way, and
  form ``softmax(q_norm(q) k_norm(k)^T * scale)`` from it with the module's own head layout, norms
  and scale. This works fused or not.
- Attention whose logits carry more than ``q kᵀ`` (EVA's rotary position embedding, BEiT's and the
  relative-position ViTs' position bias): recomputing from ``qkv`` would have to copy that maths,
  so instead each such module's own ``fused_attn`` is switched off for the pass (per instance,
  restored on exit) and its softmax output is read where the module hands it to ``attn_drop``,
  as timm's own ``timm.utils.AttentionExtract`` does.

Neither path changes a global setting (timm's fused-attention switch is left alone).

Hooks live only inside :class:`AttentionCapture` and are removed on exit, also when an error is
raised. A forward pass that misses any layer is an error, never a partial result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import Attention
from timm.layers.attention import AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.vision_transformer_relpos import RelPosAttention

from reportgen.errors import CaptureError

LayerCallback = Callable[[int, torch.Tensor], None]

QKV = "qkv"  # softmax recomputed from the qkv projection's output
SOFTMAX = "softmax"  # the module's own softmax output, with its fused attention off

#: Attention classes read from their own unfused path, with what their logits add to q kᵀ.
UNFUSED = {
    EvaAttention: "rotary position embedding, if any",
    AttentionRope: "rotary position embedding",
    BeitAttention: "relative position bias",
    RelPosAttention: "relative position bias",
}

METHODS = {
    QKV: (
        "forward hook on each block's qkv projection; attention recomputed as "
        "softmax(q_norm(q) · k_norm(k)ᵀ · scale) with the block's own heads, norms and scale "
        "(read at the module's own softmax instead where it runs unfused, as in a gradient pass)"
    ),
    SOFTMAX: (
        "the attention module's own softmax output (q kᵀ with its {extra}), read at its attn_drop "
        "with the module's fused attention switched off for the pass"
    ),
}


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


def capture_path(module: torch.nn.Module) -> str | None:
    """How the attention of ``module`` is read: :data:`QKV`, :data:`SOFTMAX`, or None for a
    module that is not a self-attention layer reportgen knows.

    Only timm's ``Attention`` itself is recomputed from ``qkv``; a subclass may change the maths,
    so it is read from its own softmax output like the families in :data:`UNFUSED`.
    """
    if type(module) is Attention:
        return QKV
    if isinstance(module, (Attention, *UNFUSED)):
        return SOFTMAX
    return None


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's self-attention modules in forward order.

    Raises:
        CaptureError: if the model has none we know how to read (windowed, class-attention or
            cross-covariance attention, ...).
    """
    found = [(name, m) for name, m in model.named_modules() if capture_path(m) is not None]
    if not found:
        kinds = {type(m).__name__ for _, m in model.named_modules()}
        others = sorted(kind for kind in kinds if "attn" in kind.lower() or "attention" in kind.lower())
        detail = f" (it has {', '.join(others)}, which reportgen cannot read)" if others else ""
        raise CaptureError(
            f"{type(model).__name__} has no timm Attention modules{detail}; reportgen reads attention from "
            "timm Vision Transformers with global multi-head self-attention (ViT, DeiT, DINOv2, CLIP, "
            "SigLIP, EVA, BEiT)."
        )
    return found


def describe_capture(modules: list[tuple[str, torch.nn.Module]]) -> str:
    """The capture path of ``modules``, in words, for the report."""
    parts = []
    for path in (QKV, SOFTMAX):
        kinds = [m for _, m in modules if capture_path(m) == path]
        if kinds:
            extra = " and ".join(sorted({UNFUSED.get(type(m), "own additions") for m in kinds}))
            parts.append(METHODS[path].format(extra=extra))
    return "; ".join(parts)


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
        self._fused: list[tuple[torch.nn.Module, object]] = []

    def _install(self) -> None:
        raise NotImplementedError

    def _unfuse(self, module: torch.nn.Module) -> None:
        """Switch ``module``'s own fused attention off until exit (timm's global switch stays)."""
        self._fused.append((module, module.__dict__.get("fused_attn", _ABSENT)))
        module.fused_attn = False

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
        for module, value in reversed(self._fused):
            if value is _ABSENT:
                del module.fused_attn
            else:
                module.fused_attn = value
        self._fused.clear()


_ABSENT = object()  # a module whose fused_attn came from its class, not the instance


class AttentionCapture(Hooks):
    """Context manager handing every layer's attention probabilities to a callback.

    Example::

        with AttentionCapture(model, on_layer) as capture:
            capture.begin()
            model.forward_features(x)
            capture.check_complete()

    Args:
        model: a timm ViT (any loaded object; fused attention on or off).
        on_layer: None when nothing reads the attention (the capture then only checks that every
            layer ran, and computes nothing), else called as ``on_layer(layer_index, attn)`` with ``attn`` float32
            ``[B, H, N, N]``, rows summing to 1, during the forward pass.
    """

    def __init__(self, model: torch.nn.Module, on_layer: LayerCallback | None):
        super().__init__()
        self._modules = attention_modules(model)
        self._on_layer = on_layer
        self._seen: set[int] = set()
        self.info = CaptureInfo(
            method=describe_capture(self._modules),
            layers=tuple(name for name, _ in self._modules),
            fused_attention=sum(bool(getattr(m, "fused_attn", False)) for _, m in self._modules),
        )

    def _install(self) -> None:
        for index, (name, module) in enumerate(self._modules):
            if capture_path(module) == QKV:
                self._handles.append(module.register_forward_pre_hook(self._reject_masks(name), with_kwargs=True))
                self._handles.append(module.qkv.register_forward_hook(self._from_qkv(index, module)))
                if isinstance(getattr(module, "attn_drop", None), torch.nn.Module):
                    # Called only on the unfused path, with the softmax the module computed itself.
                    self._handles.append(module.attn_drop.register_forward_hook(self._from_softmax(index)))
                continue
            if not isinstance(getattr(module, "attn_drop", None), torch.nn.Module):
                raise CaptureError(f"{name} has no attn_drop module, so its softmax output cannot be read")
            self._unfuse(module)
            self._handles.append(module.attn_drop.register_forward_hook(self._from_softmax(index)))

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
            if self._on_layer is None:  # nothing reads the attention: only that the layer ran
                self._seen.add(index)
                return
            if not getattr(module, "fused_attn", False) and isinstance(getattr(module, "attn_drop", None), torch.nn.Module):
                return  # the module computes the softmax itself: read there (_from_softmax), not twice
            qkv = qkv.detach()  # in a gradient pass, the copy the methods read stays off the graph
            B, N, _ = qkv.shape
            q, k, _v = qkv.reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = module.q_norm(q), module.k_norm(k)
            scores = (q.float() * module.scale) @ k.float().transpose(-2, -1)
            self._on_layer(index, scores.softmax(dim=-1))
            self._seen.add(index)

        return hook

    def _from_softmax(self, index: int):
        def hook(_drop, inputs, _output):
            # Detached: in a gradient pass, the copy the methods read stays off the graph.
            if self._on_layer is not None:
                self._on_layer(index, inputs[0].detach().float())
            self._seen.add(index)

        return hook
